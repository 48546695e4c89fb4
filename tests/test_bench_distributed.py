"""benchmarks/bench_distributed.py's projection: K-worker time to target from a scaling study, and
which optimizer it says finishes first (a bound never decides against a run that reached)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_distributed as bd  # noqa: E402


def test_first_to_target():
    info = {"hf_reached": True, "sgd_reached": True}
    assert bd.first_to_target({"hf_time": 10.0, "sgd_time": 20.0}, info) == "HF"
    assert bd.first_to_target({"hf_time": 30.0, "sgd_time": 20.0}, info) == "SGD"
    # SGD did not reach: its time is a lower bound, so HF below it is first, HF above it is open.
    lower = {"hf_reached": True, "sgd_reached": False}
    assert bd.first_to_target({"hf_time": 10.0, "sgd_time": 20.0}, lower) == "HF"
    assert bd.first_to_target({"hf_time": 30.0, "sgd_time": 20.0}, lower) == "open"
    neither = {"hf_reached": False, "sgd_reached": False}
    assert bd.first_to_target({"hf_time": 10.0, "sgd_time": 20.0}, neither) == "open"


def test_projection_scales_compute_and_adds_all_reduces(tmp_path):
    study = {"runs": {"2048": {"hf": {"steps": 4, "seconds": 400.0, "reached": True, "hf_mean_cg_iterations": 20},
                               "sgd": {"steps": 20, "seconds": 100.0, "reached": True}}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(study))
    one = {"wall_time": 10.0, "time_other": 1.0, "evaluations": 2}
    proj = bd.projection(one, params=1000, alpha=1e-5, bandwidth=1e9, network="test", scaling=path)
    rows = {r["K"]: r for r in proj["batches"]["2048"]["rows"]}
    assert rows[1]["hf_step"] == pytest.approx(100.0) and rows[1]["sgd_step"] == pytest.approx(5.0)
    # 90% of HF's step divides by K; SGD's all of it; both pay the modelled all-reduces.
    ring8 = bd.ring(8, 4000.0, 1e-5, 1e9)
    assert rows[8]["hf_step"] == pytest.approx(100 * (0.9 / 8 + 0.1) + 23 * ring8 + 2 * bd.ring(8, 16.0, 1e-5, 1e9))
    assert rows[8]["sgd_step"] == pytest.approx(5.0 / 8 + ring8)
    assert rows[8]["hf_time"] == pytest.approx(4 * rows[8]["hf_step"])
    assert bd.projection(one, 1000, 1e-5, 1e9, "test", scaling=tmp_path / "absent.json") is None
