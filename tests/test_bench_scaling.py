"""benchmarks/bench_scaling.py --quick: it runs, writes its table, and its
memory columns grow as they must (the caches hold activations: linear in the batch)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_scaling  # noqa: E402


@pytest.fixture(autouse=True)
def restore_threads_and_dtype():
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the benchmark's models are float32
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


def test_quick_run(tmp_path: Path):
    out = tmp_path / "scaling"
    assert bench_scaling.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    batch, width = result["batch"], result["width"]
    assert set(batch) == {"8", "16"} and set(width) == {"1", "2"}
    for p in list(batch.values()) + list(width.values()):
        assert all(p[c] > 0 for c in bench_scaling.COLUMNS)
    ratio = {c: batch["16"][c] / batch["8"][c] for c in ("ggn_cache_mib", "autograd_saved_mib")}
    assert all(1.8 < r < 2.2 for r in ratio.values()), ratio
    assert width["2"]["params"] > 3.5 * width["1"]["params"]  # k^2 weights
    text = out.with_suffix(".md").read_text()
    assert "Exponent p of cost ~ batch^p" in text and "Exponent p of cost ~ k^p" in text


def test_exponent():
    assert bench_scaling.exponent([1, 2, 4], [3, 6, 12]) == pytest.approx(1.0)
    assert bench_scaling.exponent([1, 2, 4], [1, 4, 16]) == pytest.approx(2.0)
