"""Builds evomerge's fused merge kernels (evomerge/merging/_kernels.c); the rest of the package
is configured in pyproject.toml. The kernels are optional: if they fail to build, the package
installs anyway and merges run on the (slower, bit-identical) torch code."""

import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


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


setup(
    ext_modules=[Extension("evomerge.merging._kernels", ["evomerge/merging/_kernels.c"],
                           depends=["evomerge/merging/_kernels_body.h"], optional=True)],
    cmdclass={"build_ext": BuildKernels},
)
