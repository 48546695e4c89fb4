"""Fast checks of examples/train.py and examples/compare.py on scikit-learn's digits."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import compare  # noqa: E402
import train  # noqa: E402
from conftest import assert_same_tensors  # noqa: E402

pytest.importorskip("sklearn")  # the digits data set

# Small, quick HF solves: the tests check the plumbing, not HF's quality.
HF_FAST = ["--cg-max-iterations", "10", "--curvature-batch", "64"]
TIME_KEYS = {"time"}
TRAIN_SIZE = 1259  # training digits: the examples seen in one epoch
HAVE_SOAP = importlib.util.find_spec("pytorch_optimizer") is not None


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


def without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in history]


def events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir))
    accumulator.Reload()
    return accumulator


def steps(accumulator, tag: str) -> list[int]:
    return [e.step for e in accumulator.Scalars(tag)]


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
    with pytest.raises(SystemExit):
        train.parse_args(["--lr", "0.1"])  # HF has no learning rate
    assert train.parse_args(["--optimizer", "sgd"]).warmup_steps == train.DEFAULT_WARMUP_STEPS
    assert compare.parse_args([]).optimizers == ["hf", "sgd", "adam", "soap", "lbfgs", "kfac"]
    lbfgs = train.parse_args(["--optimizer", "lbfgs"])
    assert (lbfgs.batch_size, lbfgs.lr) == (512, 1.0)
    assert isinstance(train.make_optimizer(lbfgs, torch.nn.Linear(2, 2)), torch.optim.LBFGS)
    with pytest.raises(SystemExit):
        train.parse_args(["--optimizer", "lbfgs", "--weight-decay", "1e-4"])  # LBFGS has none
    assert compare.parse_args(["--data", "cifar10"]).hf_args == ""  # HFOptimizer's defaults


def test_soap_defaults():
    pytest.importorskip("pytorch_optimizer", reason="pytorch-optimizer (the examples extra) is not installed")
    soap = train.parse_args(["--optimizer", "soap"])
    assert (soap.batch_size, soap.lr, soap.warmup_steps) == (128, 3e-3, train.DEFAULT_WARMUP_STEPS)


@pytest.mark.parametrize("optimizer, module, words", [
    ("soap", "pytorch_optimizer", ['pip install -e ".[examples]"', "pytorch-optimizer"]),
    ("kfac", "asdl", ['pip install -e ".[examples]"', "asdfghjkl"]),
])
def test_missing_extra_names_it(tmp_path, monkeypatch, capsys, optimizer, module, words):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    with pytest.raises(SystemExit):
        train.parse_args(["--optimizer", optimizer])
    assert words[0] in capsys.readouterr().err
    with pytest.raises(SystemExit, match=words[1]):
        compare.main(["--optimizers", "sgd", optimizer, "--logdir", tmp_path / "runs", "--out", tmp_path / "out"])
    assert not (tmp_path / "out").exists()  # it fails before it writes anything


@pytest.mark.parametrize("optimizer, steps, extra", [
    ("sgd", 10, []),
    ("adam", 10, ["--lr", "0.01"]),
    ("soap", 10, []),
    ("hf", 3, HF_FAST),
    ("lbfgs", 2, []),
    ("kfac", 10, []),
])
def test_short_run_lowers_training_loss(tmp_path, optimizer, steps, extra):
    if optimizer == "soap":
        pytest.importorskip("pytorch_optimizer", reason="pytorch-optimizer (the examples extra) is not installed")
    if optimizer == "kfac":
        pytest.importorskip("asdl", reason="asdfghjkl (ASDL, the examples extra) is not installed")
    summary = run(tmp_path, optimizer, "--optimizer", optimizer, "--max-steps", steps, *extra)
    assert summary["steps"] == steps
    assert summary["stop_reason"] == "max_steps"
    assert summary["train_loss"] < summary["initial_train_loss"]
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["seconds"] > 0
    assert summary["history"][0]["epoch"] == 0 and summary["history"][-1]["step"] == steps
    assert (tmp_path / optimizer / train.CHECKPOINT_NAME).is_file()
    assert list((tmp_path / optimizer).glob("events.out.tfevents.*"))


def test_kfac_factor_it_cannot_invert_ends_the_run_as_diverged(tmp_path, monkeypatch):
    """ASDL raises when a damped Kronecker factor is not positive definite (a run blowing up):
    the step is not taken and the run stops as diverged, instead of crashing compare.py."""
    pytest.importorskip("asdl", reason="asdfghjkl (ASDL, the examples extra) is not installed")
    import kfac
    from asdl import KfacGradientMaker

    calls = {"n": 0}
    original = KfacGradientMaker.forward_and_backward

    def fails_on_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.linalg.LinAlgError("linalg.cholesky: the input is not positive-definite")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(KfacGradientMaker, "forward_and_backward", fails_on_third)
    summary = run(tmp_path, "kfac", "--optimizer", "kfac", "--max-steps", "10")
    assert summary["stop_reason"] == "diverged" and summary["steps"] == 3
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = kfac.KFAC(model, lr=0.1)
    def always_fails(self, *args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.cholesky: the input is not positive-definite")

    monkeypatch.setattr(KfacGradientMaker, "forward_and_backward", always_fails)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    loss, outputs = optimizer.step_batch(model, torch.nn.CrossEntropyLoss(), x, y)
    assert math.isnan(float(loss)) and outputs is None
    assert_same_tensors(list(model.parameters()), before, "parameters")


def test_tensorboard_axes(tmp_path):
    """x = training examples seen; walltime = the run's start + training seconds."""
    summary = run(tmp_path, "hf", "--optimizer", "hf", "--epochs", "1", *HF_FAST)
    board = events(tmp_path / "hf")
    tags = set(board.Tags()["scalars"])
    expected = {"train/loss", "train/accuracy", "time/wall", "train/epoch_loss", "train/epoch_accuracy",
                "val/loss", "val/accuracy", "test/loss", "test/accuracy", "time/epoch_wall",
                "hf/damping", "hf/cg_iterations", "hf/rho", "hf/loss_before"}
    assert expected <= tags, expected - tags
    assert not any(t.startswith("final/") for t in tags)
    assert "summary/final/text_summary" in board.Tags()["tensors"]
    # 1259 digits in batches of 512: the batch losses are the model's before each step ...
    assert steps(board, "train/loss") == [0, 512, 1024]
    # ... the step's own records come once it is done, the evaluations at the examples trained on.
    assert steps(board, "hf/rho") == [512, 1024, TRAIN_SIZE]
    assert steps(board, "time/wall") == [0, 512, 1024, TRAIN_SIZE]
    assert steps(board, "val/accuracy") == steps(board, "train/epoch_loss") == [0, TRAIN_SIZE]

    start = checkpoint(tmp_path, "hf")["state"]["run_start_walltime"]
    clock = [e.value for e in board.Scalars("time/wall")]
    assert [e.wall_time - start for e in board.Scalars("time/wall")] == pytest.approx(clock, abs=1e-4)
    assert clock[0] == 0.0
    assert [e.wall_time - start for e in board.Scalars("train/loss")] == pytest.approx(clock[:-1], abs=1e-4)
    assert [e.wall_time - start for e in board.Scalars("val/accuracy")] == pytest.approx(
        [r["time"] for r in summary["history"]], abs=1e-4)
    assert clock[-1] == pytest.approx(summary["seconds"], rel=1e-5)


def test_warmup(tmp_path):
    args = train.parse_args(["--optimizer", "sgd", "--lr", "0.1", "--warmup-steps", "4"])
    assert [train.learning_rate(args, k) for k in range(1, 7)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    run(tmp_path, "sgd", "--optimizer", "sgd", "--lr", "0.1", "--warmup-steps", "4", "--max-steps", "6")
    board = events(tmp_path / "sgd")
    assert steps(board, "train/lr") == [128 * k for k in range(1, 7)]
    assert [e.value for e in board.Scalars("train/lr")] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    run(tmp_path, "flat", "--optimizer", "sgd", "--lr", "0.1", "--warmup-steps", "0", "--max-steps", "2")
    assert [e.value for e in events(tmp_path / "flat").Scalars("train/lr")] == pytest.approx([0.1, 0.1])


def test_hf_logs_nan_rho(tmp_path, monkeypatch):
    import hfopt

    step = hfopt.HFOptimizer.step

    def nan_rho_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        self.last_step = {**self.last_step, "rho": math.nan}
        return result

    monkeypatch.setattr(hfopt.HFOptimizer, "step", nan_rho_step)
    run(tmp_path, "hf", "--optimizer", "hf", "--max-steps", "1", *HF_FAST)
    rho = events(tmp_path / "hf").Scalars("hf/rho")
    assert [e.step for e in rho] == [512] and math.isnan(rho[0].value)


@pytest.mark.parametrize("optimizer, extra", [
    ("sgd", []),
    ("soap", []),  # its eigenbasis, refreshed every 10th step (the epoch's last), must survive the checkpoint
    # two HF steps per epoch (1259 training digits)
    ("hf", ["--batch-size", "630", *HF_FAST]),
])
def test_resume_continues_identically(tmp_path, optimizer, extra):
    if optimizer == "soap":
        pytest.importorskip("pytorch_optimizer", reason="pytorch-optimizer (the examples extra) is not installed")
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
    start = checkpoint(tmp_path, "parts")["state"]["run_start_walltime"]
    resumed = run(tmp_path, "parts", *base, "--max-steps", "14", "--resume")
    assert_same_tensors(without_times(resumed["history"]), without_times(straight["history"]), "history")
    assert_same_tensors(checkpoint(tmp_path, "straight")["model"], checkpoint(tmp_path, "parts")["model"])
    # The event files of both parts read as one run: one point per step, the same
    # losses, and a training clock that goes on from where the first part stopped.
    assert checkpoint(tmp_path, "parts")["state"]["run_start_walltime"] == start
    whole, parts = events(tmp_path / "straight"), events(tmp_path / "parts")
    # 10 batches per epoch: nine of 128 and one of 107 training digits
    seen = [128 * k for k in range(10)] + [TRAIN_SIZE + 128 * k for k in range(4)]
    assert steps(parts, "train/loss") == steps(whole, "train/loss") == seen
    assert [e.value for e in parts.Scalars("train/loss")] == [e.value for e in whole.Scalars("train/loss")]
    clock = [e.wall_time - start for e in parts.Scalars("time/wall")]
    assert clock == sorted(clock) and clock[-1] == pytest.approx(resumed["seconds"], abs=1e-4)


def test_eval_every(tmp_path):
    summary = run(tmp_path, "run", "--optimizer", "sgd", "--epochs", "5", "--eval-every", "2")
    assert [r["epoch"] for r in summary["history"]] == [0, 2, 4, 5]
    summary = run(tmp_path, "run2", "--optimizer", "sgd", "--epochs", "5", "--eval-every", "2",
                  "--max-steps", "30")
    assert [(r["epoch"], r["off_schedule"]) for r in summary["history"]] == [(0, False), (2, False), (3, True)]


def test_eval_every_steps(tmp_path):
    # 10 batches per epoch; evaluations after every 4th step, mid-epoch too, and at the end.
    base = ["--optimizer", "sgd", "--eval-every", "5", "--eval-every-steps", "4"]
    summary = run(tmp_path, "run", *base, "--epochs", "2")
    assert [r["step"] for r in summary["history"]] == [0, 4, 8, 12, 16, 20]
    assert [r["epoch"] for r in summary["history"]] == pytest.approx([0, 0.4, 0.8, 1.2, 1.6, 2])
    assert not any(r["off_schedule"] for r in summary["history"])
    examples = [0, 512, 1024, TRAIN_SIZE + 256, TRAIN_SIZE + 768, 2 * TRAIN_SIZE]
    assert steps(events(tmp_path / "run"), "train/epoch_loss") == examples
    # Interrupted between two evaluations and resumed: the same evaluations as one run.
    straight = run(tmp_path, "straight", *base, "--max-steps", "14")
    run(tmp_path, "parts", *base, "--max-steps", "6")
    resumed = run(tmp_path, "parts", *base, "--max-steps", "14", "--resume")
    assert [r["step"] for r in straight["history"]] == [0, 4, 8, 12, 14]
    assert_same_tensors(without_times(resumed["history"]), without_times(straight["history"]), "history")
    with pytest.raises(SystemExit):
        train.parse_args(["--eval-every-steps", "-1"])


def test_resume_refuses_other_settings(tmp_path):
    run(tmp_path, "run", "--optimizer", "sgd", "--max-steps", "2")
    with pytest.raises(ValueError, match="--lr"):
        run(tmp_path, "run", "--optimizer", "sgd", "--max-steps", "4", "--lr", "0.05", "--resume")


def test_time_budget_stops(tmp_path):
    summary = run(tmp_path, "budget", "--optimizer", "sgd", "--epochs", "100000", "--time-budget", "0.3")
    assert summary["stop_reason"] == "time_budget" and summary["seconds"] >= 0.3


def test_compare_quick_writes_outputs(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    names = ["hf", "sgd", "adam"] + (["soap"] if HAVE_SOAP else [])
    out = tmp_path / "out"
    report = compare.main(["--quick", "--threads", "1", "--budget", "1", "--grid-budget", "0.2",
                           "--optimizers", *names, "--sgd-lrs", "0.1", "0.03", "--adam-lrs", "1e-3",
                           "--soap-lrs", "3e-3", "--warmup-steps", "5",
                           "--hf-args", " ".join(HF_FAST), "--logdir", tmp_path / "runs", "--out", out])
    for name in ("curves.png", "results.md", "results.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    for name in names:
        assert f"| {compare.LABELS[name]} |" in table
    saved = json.loads((out / "results.json").read_text())
    assert saved["chosen_lr"]["sgd"] in (0.1, 0.03)
    assert {r["lr"] for r in saved["grids"]["sgd"]} == {0.1, 0.03}
    assert set(saved["runs"]) == set(names) == set(report["runs"])
    assert all(run["reach"] is not None for run in saved["runs"]["sgd"])  # SGD reaches its own best

    runs = {name: tmp_path / "runs" / f"{name}-s0" for name in names}
    for logdir in runs.values():
        assert (logdir / train.CHECKPOINT_NAME).is_file()
    # The grid is a sibling logdir: TensorBoard on runs/ shows only the compared runs.
    assert not (tmp_path / "runs" / "grid").exists()
    grid = {p.name for p in (tmp_path / "runs-grid").iterdir()}
    assert {"sgd-lr0.1", "sgd-lr0.03", "adam-lr0.001"} <= grid
    first = [e.value for e in events(tmp_path / "runs-grid" / "sgd-lr0.1").Scalars("train/lr")][:5]
    # The grid warms up too.  Its runs have a time budget: on a loaded machine they may end sooner.
    assert len(first) >= 2 and first == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1][:len(first)])

    # One Custom Scalars layout in runs/ itself; every chart's regex (matched the
    # plugin's way, re.match) picks out a tag in every compared run.
    top = events(tmp_path / "runs")
    layout = layout_pb2.Layout()
    layout.ParseFromString(top.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {(category.title, tag) for category in layout.category for chart in category.chart
              for tag in chart.multiline.tag}
    regexes = {tag for _, tag in charts}
    assert {"^train/epoch_loss$", "^train/log10_epoch_loss$", "^train/loss$", "^val/accuracy$", "^test/accuracy$",
            "^val/loss$", "^test/loss$", "^hf/log10_damping$", "^hf/rho$"} <= regexes
    for name, logdir in runs.items():
        tags = events(logdir).Tags()["scalars"]
        for title, regex in charts:
            if title.startswith("Hessian-free") and name != "hf":
                continue  # HF's diagnostics: drawn for the HF run alone
            assert [t for t in tags if re.match(regex, t)], (name, regex)


@pytest.mark.parametrize("optimizer, extra", [("sgd", []), ("hf", ["--batch-size", "256", *HF_FAST])])
def test_sharpness_logging_leaves_training_alone(tmp_path, optimizer, extra):
    """--sharpness-every logs the top Hessian and GGN eigenvalues without changing
    the parameters, buffers, optimizer state or RNG stream of the run."""
    base = ["--optimizer", optimizer, "--max-steps", "4", *extra]
    plain = run(tmp_path, "plain", *base)
    sharp = run(tmp_path, "sharp", *base, "--sharpness-every", "2", "--sharpness-samples", "64",
                "--sharpness-batch-size", "32")
    a, b = checkpoint(tmp_path, "plain"), checkpoint(tmp_path, "sharp")
    for key in ("model", "optimizer", "rng"):
        assert_same_tensors(a[key], b[key], key)
    assert_same_tensors(without_times(plain["history"]), without_times(sharp["history"]), "history")
    acc = events(tmp_path / "sharp")
    batch = 128 if optimizer == "sgd" else 256
    for tag in ("sharpness/hessian_top", "sharpness/ggn_top"):
        assert steps(acc, tag) == [0, 2 * batch, 4 * batch]
        assert all(math.isfinite(e.value) and e.value > 0 for e in acc.Scalars(tag))
    assert ("sharpness/two_over_lr" in acc.Tags()["scalars"]) == (optimizer == "sgd")
    assert "sharpness/hessian_top" not in events(tmp_path / "plain").Tags()["scalars"]


def test_sharpness_bad_values(tmp_path):
    for argv in (["--sharpness-every", "-1"], ["--sharpness-samples", "1"], ["--sharpness-tol", "0"],
                 ["--sharpness-batch-size", "1"]):
        with pytest.raises(SystemExit):
            train.parse_args(argv)


def test_spectrum_example_writes_json_and_png(tmp_path):
    cifar = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-10-batches-py"
    if not cifar.is_dir():
        pytest.skip(f"CIFAR-10 is not in {cifar}")
    import spectrum

    record = spectrum.main(["--batch-size", "8", "--batches", "2", "--k", "2", "--trace-samples", "6",
                            "--steps", "4", "--curvature", "ggn", "--threads", "1", "--out", tmp_path])
    saved = json.loads((tmp_path / "spectrum.json").read_text())
    assert saved["top_eigenvalues"] == pytest.approx(record["top_eigenvalues"])
    assert saved["top_eigenvalues"][0] >= saved["top_eigenvalues"][1] > 0  # a GGN is PSD
    assert saved["condition_proxy_top_over_kth"] >= 1
    assert (tmp_path / "density.png").read_bytes()[:4] == b"\x89PNG"
    # A digits checkpoint is refused by name.
    run(tmp_path, "digits", "--optimizer", "sgd", "--max-steps", "1")
    with pytest.raises(ValueError, match="not cifar10"):
        spectrum.main(["--checkpoint", tmp_path / "digits" / train.CHECKPOINT_NAME, "--out", tmp_path])
