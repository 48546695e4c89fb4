"""Fast checks of examples/train.py and examples/compare.py on scikit-learn's digits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import compare  # noqa: E402
import train  # noqa: E402

pytest.importorskip("sklearn")  # the digits data set

# Small, quick HF solves: the tests check the plumbing, not HF's quality.
HF_FAST = ["--cg-max-iterations", "10", "--curvature-batch", "64"]
TIME_KEYS = {"time"}


@pytest.fixture(autouse=True)
def restore_threads():
    """train.py's --threads sets torch's global thread count; undo it after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(tmp_path: Path, name: str, *argv) -> dict:
    # One thread: these models are tiny, and on a busy machine oversubscribed
    # threads make the runs several times slower.
    return train.main(["--logdir", tmp_path / name, "--quiet", "--threads", "1", *argv])


def checkpoint(tmp_path: Path, name: str) -> dict:
    return torch.load(tmp_path / name / train.CHECKPOINT_NAME, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where: str = "") -> None:
    """Recursively require bitwise-equal tensors and equal plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # nan == nan here


def without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in history]


def test_defaults():
    args = train.parse_args([])
    assert (args.optimizer, args.data, args.model, args.batch_size) == ("hf", "digits", "digits_convnet_bn", 512)
    assert Path(args.logdir) == Path("runs/digits-digits_convnet_bn-hf-s0")
    sgd = train.parse_args(["--optimizer", "sgd", "--data", "cifar10", "--seed", "3"])
    assert (sgd.model, sgd.batch_size, sgd.lr, sgd.momentum) == ("c3d3_bn", 128, 0.1, 0.9)
    assert Path(sgd.logdir) == Path("runs/cifar10-c3d3_bn-sgd-s3")
    assert train.parse_args(["--optimizer", "adam"]).lr == 1e-3
    hf = train.parse_args(["--curvature-batch", "0.25", "--hf-option", "preconditioner=False",
                           "--hf-option", "cg_eps=1e-3", "--damping", "3"])
    assert train.hf_options(hf) == {"curvature_batch": 0.25, "damping": 3.0, "weight_decay": 0.0,
                                    "preconditioner": False, "cg_eps": 1e-3}
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "c3d3_bn"])  # a CIFAR model on 8x8 digits


@pytest.mark.parametrize("optimizer, steps, extra", [
    ("sgd", 10, []),
    ("adam", 10, ["--lr", "0.01"]),
    ("hf", 3, HF_FAST),
])
def test_short_run_lowers_training_loss(tmp_path, optimizer, steps, extra):
    summary = run(tmp_path, optimizer, "--optimizer", optimizer, "--max-steps", steps, *extra)
    assert summary["steps"] == steps
    assert summary["stop_reason"] == "max_steps"
    assert summary["train_loss"] < summary["initial_train_loss"]
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["seconds"] > 0
    assert summary["history"][0]["epoch"] == 0 and summary["history"][-1]["step"] == steps
    assert (tmp_path / optimizer / train.CHECKPOINT_NAME).is_file()
    assert list((tmp_path / optimizer).glob("events.out.tfevents.*"))


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, "hf", "--optimizer", "hf", "--epochs", "1", *HF_FAST)
    events = EventAccumulator(str(tmp_path / "hf"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/accuracy", "time/wall", "train/epoch_loss", "train/epoch_accuracy",
                "val/loss", "val/accuracy", "test/loss", "test/accuracy", "time/epoch_wall",
                "hf/damping", "hf/cg_iterations", "hf/rho", "hf/loss_before"}
    assert expected <= tags, expected - tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]  # 1259 digits, batches of 512
    assert [e.step for e in events.Scalars("val/accuracy")] == [0, 1]


@pytest.mark.parametrize("optimizer, extra", [
    ("sgd", []),
    # two HF steps per epoch (1259 training digits)
    ("hf", ["--batch-size", "630", *HF_FAST]),
])
def test_resume_continues_identically(tmp_path, optimizer, extra):
    base = ["--optimizer", optimizer, *extra]
    straight = run(tmp_path, "straight", *base, "--epochs", "2")
    run(tmp_path, "parts", *base, "--epochs", "1")
    resumed = run(tmp_path, "parts", *base, "--epochs", "2", "--resume")
    assert resumed["steps"] == straight["steps"] and resumed["epochs"] == straight["epochs"] == 2
    assert resumed["train_loss"] == straight["train_loss"]
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    assert_same_tensors(without_times(resumed["history"]), without_times(straight["history"]), "history")
    a, b = checkpoint(tmp_path, "straight"), checkpoint(tmp_path, "parts")
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")
    assert_same_tensors(a["rng"], b["rng"], "rng")


def test_resume_mid_epoch(tmp_path):
    # Stop inside epoch 1 (10 batches per epoch), then go on into epoch 2.
    base = ["--optimizer", "sgd"]
    straight = run(tmp_path, "straight", *base, "--max-steps", "14")
    first = run(tmp_path, "parts", *base, "--max-steps", "6")
    assert first["epochs"] == pytest.approx(0.6) and first["history"][-1]["off_schedule"]
    resumed = run(tmp_path, "parts", *base, "--max-steps", "14", "--resume")
    assert_same_tensors(without_times(resumed["history"]), without_times(straight["history"]), "history")
    assert_same_tensors(checkpoint(tmp_path, "straight")["model"], checkpoint(tmp_path, "parts")["model"])


def test_eval_every(tmp_path):
    summary = run(tmp_path, "run", "--optimizer", "sgd", "--epochs", "5", "--eval-every", "2")
    assert [r["epoch"] for r in summary["history"]] == [0, 2, 4, 5]
    summary = run(tmp_path, "run2", "--optimizer", "sgd", "--epochs", "5", "--eval-every", "2",
                  "--max-steps", "30")
    assert [(r["epoch"], r["off_schedule"]) for r in summary["history"]] == [(0, False), (2, False), (3, True)]


def test_resume_refuses_other_settings(tmp_path):
    run(tmp_path, "run", "--optimizer", "sgd", "--max-steps", "2")
    with pytest.raises(ValueError, match="--lr"):
        run(tmp_path, "run", "--optimizer", "sgd", "--max-steps", "4", "--lr", "0.05", "--resume")


def test_time_budget_stops(tmp_path):
    summary = run(tmp_path, "budget", "--optimizer", "sgd", "--epochs", "100000", "--time-budget", "0.3")
    assert summary["stop_reason"] == "time_budget" and summary["seconds"] >= 0.3


def test_compare_quick_writes_outputs(tmp_path):
    out = tmp_path / "out"
    report = compare.main(["--quick", "--threads", "1", "--budget", "1", "--grid-budget", "0.2",
                           "--sgd-lrs", "0.1", "0.03",
                           "--hf-args", " ".join(HF_FAST), "--logdir", tmp_path / "runs", "--out", out])
    for name in ("curves.png", "results.md", "results.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "| Hessian-free |" in table and "| SGD + momentum |" in table
    saved = json.loads((out / "results.json").read_text())
    assert saved["chosen_lr"]["sgd"] in (0.1, 0.03)
    assert {r["lr"] for r in saved["grids"]["sgd"]} == {0.1, 0.03}
    assert set(saved["runs"]) == {"hf", "sgd"} == set(report["runs"])
    for name in ("hf", "sgd"):
        assert (tmp_path / "runs" / f"{name}-s0" / train.CHECKPOINT_NAME).is_file()
