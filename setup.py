"""Builds evomerge's fused merge kernels (evomerge/merging/_kernels.c); the rest of the package
is configured in pyproject.toml. The kernels are optional: if they fail to build, the package
installs anyway and merges run on the (slower, bit-identical) torch code."""

import os
import shutil
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """Ships the repository's recipes/ (recipes, templates, prompt files) as evomerge/recipes,
    where an installed evomerge finds them."""

    def run(self) -> None:
        super().run()
        shutil.copytree("recipes", Path(self.build_lib) / "evomerge" / "recipes", dirs_exist_ok=True)


class BuildKernels(build_ext):
    """Compiler flags the kernels need: -O3 so every loop vectorizes, IEEE arithmetic with no
    FMA contraction (results must match torch bit for bit), and no FP traps so comparisons can
    become vector selects. MSVC's default /fp:precise already leaves FMAs alone."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type != "msvc":
            flags = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
            if sysconfig.get_platform().endswith(("x86_64", "amd64")):  # the target, not the host
                flags.append("-mprefer-vector-width=512")  # only affects the AVX-512 build
            for ext in self.extensions:
                ext.extra_compile_args = flags
        super().build_extensions()


KERNELS = [Extension("evomerge.merging._kernels", ["evomerge/merging/_kernels.c"],
                     depends=["evomerge/merging/_kernels_body.h"], optional=True)]

setup(
    # EVOMERGE_KERNELS=0 at build time: a pure-Python build (merges run the torch code)
    ext_modules=[] if os.environ.get("EVOMERGE_KERNELS") == "0" else KERNELS,
    cmdclass={"build_ext": BuildKernels, "build_py": BuildPy},
)
