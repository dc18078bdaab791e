"""benchmarks/gpu_check.sh on a machine without a GPU: it says what it would run, and runs nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_help_names_every_part() -> None:
    out = _run("--help")
    assert out.returncode == 0
    for part in ("pytest -m cuda", "gpu-step", "gpu-tta", "gpu-ensemble", "gpu-bn_folding", "8 minutes"):
        assert part in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_gpu_one_line_and_nothing_run() -> None:
    before = (REPO / "benchmarks" / "RESULTS.md").read_text()
    out = _run()
    assert out.returncode == 1
    assert out.stdout.strip().count("\n") == 0 and "no NVIDIA GPU found" in out.stdout
    assert (REPO / "benchmarks" / "RESULTS.md").read_text() == before


def test_unknown_argument_is_refused() -> None:
    out = _run("--fast")
    assert out.returncode == 2 and "--fast" in out.stderr
