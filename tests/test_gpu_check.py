"""benchmarks/gpu_check.sh: its CPU dry run goes through every step (CUDA parts
skipped) and leaves a log per step, the JSON figures and a summary."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["step"] for s in summary] == ["cuda-tests", "kernels", "curvature-float32",
                                            "mixed-precision-resnet8_bn", "hf-vs-sgd"]
    assert all(s["rc"] == 0 for s in summary), summary
    for name in ("curvature-float32", "mixed-precision-resnet8_bn", "hf-vs-sgd"):
        assert json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / "cuda-tests.xml").is_file()
    if not torch.cuda.is_available():  # the GPU tests skip cleanly
        assert "skipped" in (tmp_path / "cuda-tests.log").read_text()
