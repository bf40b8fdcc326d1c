"""Session fixtures: tiny model families built once per test session (no downloads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_llm_family  # noqa: E402


@pytest.fixture(scope="session")
def llama_fp32(tmp_path_factory) -> dict[str, Path]:
    return make_llm_family(tmp_path_factory.mktemp("llama_fp32"), arch="llama", n=3,
                           dtype=torch.float32)


@pytest.fixture(scope="session")
def llama_bf16(tmp_path_factory) -> dict[str, Path]:
    return make_llm_family(tmp_path_factory.mktemp("llama_bf16"), arch="llama", n=3,
                           dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def mistral_fp32(tmp_path_factory) -> dict[str, Path]:
    return make_llm_family(tmp_path_factory.mktemp("mistral_fp32"), arch="mistral", n=2,
                           dtype=torch.float32)


def _run_cli(*args) -> tuple[int, str, str]:
    """Run the ``evomerge`` console entry in-process: (exit code, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout
    from unittest import mock

    from evomerge.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with mock.patch.object(sys, "argv", ["evomerge", *map(str, args)]), \
            redirect_stdout(out), redirect_stderr(err):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def evomerge_cli():
    """``evomerge_cli("merge", cfg, "--out", out)`` -> (exit code, stdout, stderr)."""
    return _run_cli
