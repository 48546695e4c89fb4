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
    assert scaling.claim_verdict({2048: {"value": 0.3, "kind": "exact"}}, 1 / 3).startswith("holds")


def test_critical_batch():
    def runs(steps, reached=None):
        reached = reached or [True] * len(steps)
        return {b: {"steps": s, "reached": r} for b, s, r in zip((128, 512, 2048, 8192), steps, reached)}

    # Perfect scaling, then none: critical at 512.
    c = scaling.critical_batch(runs([400, 100, 100, 100]))
    assert c["critical"] == 512 and not c["at_least"] and c["exponents"][512] == pytest.approx(1.0)
    assert c["exponents"][2048] == pytest.approx(0.0)
    # Exponent 0.5 at every quadrupling (halving the steps): still scaling at the largest batch.
    c = scaling.critical_batch(runs([64, 32, 16, 8]))
    assert c["critical"] == 8192 and c["at_least"] and scaling.format_critical(c).startswith(">= 8192")
    # No gain from the start: the smallest batch is already past it.
    assert scaling.critical_batch(runs([10, 9, 9, 9]))["critical"] == 128
    # A run that did not reach the target leaves its segment unknown and ends the search there.
    c = scaling.critical_batch(runs([400, 100, 30, 20], [True, True, False, True]))
    assert c["critical"] == 512 and c["exponents"][2048] is None and c["exponents"][8192] is None
    assert scaling.format_critical(scaling.critical_batch(runs([5, 4], [False, True]))) == "unknown"


def test_quick_run_writes_outputs(tmp_path: Path):
    out = tmp_path / "scaling"
    report = scaling.main(["--quick", "--data", "digits", "--threads", "1", "--out", out,
                           "--optimizers", "hf", "sgd", "adam"])
    for name in ("scaling.png", "results.md", "results.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) >= {"config", "tuning", "runs", "ratios", "claims", "critical", "total_seconds"}
    config = saved["config"]
    assert config["batch_sizes"] == [16, 32, 64] and config["threads"] == 1
    assert config["torch"] == torch.__version__ and config["model"] == "digits_convnet_bn"
    assert set(saved["runs"]) == set(saved["ratios"]["sgd"]) == set(saved["ratios"]["adam"]) == {"16", "32", "64"}
    assert set(saved["critical"]) == {"hf", "sgd", "adam"}
    for batch, runs in saved["runs"].items():
        assert set(runs) == {"hf", "sgd", "adam"}
        for name, run in runs.items():
            assert {"lr", "reached", "stop_reason", "steps", "epochs", "seconds", "history"} <= set(run)
            assert run["history"][0]["step"] == 0 and len(run["step_log"]) == run["steps"]
            assert (run["lr"] is None) == (name == "hf")
            assert run["lr"] in (None, *(p["lr"] for p in saved["tuning"][batch][name]["points"]))
        assert len(saved["tuning"][batch]["sgd"]["points"]) == 3
    markdown = (out / "results.md").read_text()
    assert "| HF / SGD + momentum | HF / Adam |" in markdown and "| 64 | Hessian-free |" in markdown
    assert "| critical batch |" in markdown
    assert all(v.startswith("not tested") for v in report["claims"].values())  # no batch >= 2048 here


def test_lbfgs_and_kfac_and_merge(tmp_path: Path):
    """The two peers run in the study's protocol, each in its own process's folder, and --merge
    joins the folders into the report one run would have written."""
    common = ["--quick", "--data", "digits", "--threads", "1", "--batch-sizes", "16", "32"]
    first = scaling.main([*common, "--out", tmp_path / "a", "--optimizers", "hf", "lbfgs"])
    peers = ["sgd"] + (["kfac"] if scaling.kfac_available() else [])
    scaling.main([*common, "--out", tmp_path / "b", "--optimizers", *peers])
    for b, runs in first["runs"].items():
        lbfgs = runs["lbfgs"]
        assert lbfgs["closure_calls"] >= lbfgs["steps"] and lbfgs["lr"] in (0.1, 0.3, 1.0)  # not batch-scaled
    merged = scaling.main(["--merge", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "m"])
    assert merged["config"]["optimizers"] == [n for n in scaling.CONTENDERS if n in ["hf", "lbfgs", *peers]]
    assert set(merged["ratios"]) == {"lbfgs", *peers}
    assert merged["runs"][32]["lbfgs"] == first["runs"][32]["lbfgs"]
    assert (tmp_path / "m" / "scaling.png").stat().st_size > 0
    # Folders of other batch sizes: a contender absent at some sizes is left out there, not an error.
    scaling.main([*common[:-2], "64", "--out", tmp_path / "d", "--optimizers", "sgd"])
    merged = scaling.main(["--merge", tmp_path / "a", tmp_path / "d", "--out", tmp_path / "m3"])
    assert merged["config"]["batch_sizes"] == [16, 32, 64] and set(merged["runs"][64]) == {"sgd"}
    assert "sgd" not in merged["runs"][16] and (tmp_path / "m3" / "scaling.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="other settings"):
        scaling.main([*common, "--target", "1.9", "--out", tmp_path / "c", "--optimizers", "sgd"])
        scaling.main(["--merge", tmp_path / "a", tmp_path / "c", "--out", tmp_path / "m2"])
