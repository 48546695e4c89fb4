"""Fast checks of examples/scaling.py: a --quick run on scikit-learn's digits, and the ratio logic."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import scaling  # noqa: E402

pytest.importorskip("sklearn")  # the digits data set


@pytest.fixture(autouse=True)
def restore_threads():
    """--threads sets torch's global thread count; undo it after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_defaults_and_quick():
    args = scaling.parse_args([])
    assert (args.data, args.model, args.batch_sizes) == ("cifar10", "c3d3_bn", [128, 512, 2048])
    assert args.optimizers == list(scaling.CONTENDERS) and args.hf_option == []
    quick = scaling.parse_args(["--quick", "--data", "digits", "--target", "1.5", "--optimizers", "sgd", "hf"])
    assert (quick.model, quick.batch_sizes, quick.target) == ("digits_convnet_bn", [16, 32, 64], 1.5)
    assert quick.optimizers == ["hf", "sgd"] and quick.train_samples == 256
    assert scaling.lr_grid(args, "sgd", 512) == [0.06, 0.2, 0.6]  # the batch-128 grid times sqrt(4)
    with pytest.raises(SystemExit):
        scaling.parse_args(["--hf-option", "no-equals-sign"])


def test_ratio_and_claim():
    reached = {"reached": True, "steps": 10}
    assert scaling.step_ratio(reached, {"reached": True, "steps": 100}) == {"value": 0.1, "kind": "exact"}
    upper = scaling.step_ratio(reached, {"reached": False, "steps": 40})
    assert upper["kind"] == "upper" and scaling.format_ratio(upper) == "< 0.25"
    lower = scaling.step_ratio({"reached": False, "steps": 30}, {"reached": True, "steps": 100})
    assert lower["kind"] == "lower" and scaling.format_ratio(lower) == "> 0.3"
    unknown = scaling.step_ratio({"reached": False, "steps": 3}, {"reached": False, "steps": 4})
    assert unknown["value"] is None
    assert scaling.claim_verdict({512: upper}).startswith("not tested")
    assert scaling.claim_verdict({2048: {"value": 0.1, "kind": "exact"}}).startswith("holds")
    assert scaling.claim_verdict({2048: lower, 4096: {"value": 0.1, "kind": "exact"}}).startswith("fails")
    assert scaling.claim_verdict({2048: upper}).startswith("undetermined")  # < 0.25 says nothing about <= 0.2


def test_quick_run_writes_outputs(tmp_path: Path):
    out = tmp_path / "scaling"
    report = scaling.main(["--quick", "--data", "digits", "--threads", "1", "--out", out,
                           "--optimizers", "hf", "sgd", "adam"])
    for name in ("scaling.png", "results.md", "results.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) >= {"config", "tuning", "runs", "ratios", "claim", "total_seconds"}
    config = saved["config"]
    assert config["batch_sizes"] == [16, 32, 64] and config["threads"] == 1
    assert config["torch"] == torch.__version__ and config["model"] == "digits_convnet_bn"
    assert set(saved["runs"]) == set(saved["ratios"]) == {"16", "32", "64"}
    for batch, runs in saved["runs"].items():
        assert set(runs) == {"hf", "sgd", "adam"}
        for name, run in runs.items():
            assert {"lr", "reached", "stop_reason", "steps", "epochs", "seconds", "history"} <= set(run)
            assert run["history"][0]["step"] == 0 and len(run["step_log"]) == run["steps"]
            assert (run["lr"] is None) == (name == "hf")
            assert run["lr"] in (None, *(p["lr"] for p in saved["tuning"][batch][name]["points"]))
        assert len(saved["tuning"][batch]["sgd"]["points"]) == 3
    markdown = (out / "results.md").read_text()
    assert "HF steps / SGD steps" in markdown and "| 64 | Hessian-free |" in markdown
    assert report["claim"].startswith("not tested")  # no batch >= 2048 in a quick run
