"""Checkpoints of examples/train.py: atomic writes, refusal of damaged files, resuming after SIGKILL.

The kill test runs train.py's main() as the command line does, in processes of their own
(float32, one thread), and kills one run with SIGKILL inside its second epoch through
train.py's test-only hook ``HFOPT_TRAIN_SIGKILL_AT_STEP``. The resumed run must end bitwise
where an uninterrupted run of the same command ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import train  # noqa: E402
from conftest import assert_same_tensors  # noqa: E402
from test_examples import HF_FAST, events, restore_threads  # noqa: E402,F401

COMMON = ["--threads", "1", "--quiet", "--epochs", "2", "--checkpoint-every", "1"]
# optimizer -> (its arguments, steps per epoch, the step after which the killed run dies)
KILLED = {
    "sgd": (["--optimizer", "sgd"], 10, 14),  # 1259 digits in batches of 128: 10 batches
    "hf": (["--optimizer", "hf", "--batch-size", "420", *HF_FAST], 3, 4),  # 420 + 420 + 419
}
# Clock readings differ between any two runs, and so does the folder.
UNSHARED_KEYS = {"train_time", "run_start_walltime", "time", "seconds", "wall_seconds", "logdir"}


# Runs train.py's main() in forked children of one interpreter that imported torch, train.py and the
# digits once: each run is a real process that SIGKILL ends as it would end the CLI, and the seven
# seconds of imports a fresh interpreter pays (torch, scikit-learn, torch._dynamo) are paid once.
# Jobs: {name: [argv, kill_at, after]}; a job with ``after`` starts once that job has ended. Each
# child's stdout and stderr go to <folder>/<name>.out and .err, the checkpoint it left to
# <folder>/<name>.pt; the exit codes (-9: SIGKILL) come back as one JSON line.
LAUNCHER = r"""
import json, os, shutil, sys, traceback
import torch
torch.set_num_threads(1)  # before any op, so no child inherits a thread pool across fork
repo, folder, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, os.path.join(repo, "examples"))
import common, train, torch._dynamo, torch.utils.tensorboard  # noqa: what every run imports
common.load_data("digits")

def start(name):
    argv, kill_at, _ = jobs[name]
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for fd, suffix in ((1, ".out"), (2, ".err")):
            os.dup2(os.open(os.path.join(folder, name + suffix), os.O_WRONLY | os.O_CREAT), fd)
        os.environ["HFOPT_TRAIN_SIGKILL_AT_STEP"] = str(kill_at)
        train.main(argv)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)

running = {start(n): n for n, job in jobs.items() if job[2] is None}
codes = {}
while running:
    pid, status = os.wait()
    done = running.pop(pid)
    codes[done] = os.waitstatus_to_exitcode(status)
    logdir = jobs[done][0][jobs[done][0].index("--logdir") + 1]
    if os.path.isfile(os.path.join(logdir, "checkpoint.pt")):  # as the job left it
        shutil.copy(os.path.join(logdir, "checkpoint.pt"), os.path.join(folder, done + ".pt"))
    running.update({start(n): n for n, job in jobs.items() if job[2] == done})
print(json.dumps(codes))
"""


def run_jobs(folder: Path, jobs: dict) -> dict[str, tuple[int, str, str]]:
    """``{name: (exit code, stdout, stderr)}`` of the :data:`LAUNCHER` jobs."""
    result = subprocess.run([sys.executable, "-c", LAUNCHER, str(REPO), str(folder), json.dumps(jobs)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    codes = json.loads(result.stdout.splitlines()[-1])
    return {name: (codes[name], (folder / f"{name}.out").read_text(), (folder / f"{name}.err").read_text())
            for name in jobs}


def summary_line(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("summary ")]
    assert len(lines) == 1, out
    return json.loads(lines[0][len("summary "):])


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def untimed(obj):
    """``obj`` without what two runs of one command never share."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if k not in UNSHARED_KEYS}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """For each optimizer: an uninterrupted run, and a run SIGKILLed mid-epoch then resumed.

    The runs overlap (the machine has two cores); each resume starts once its killed run is dead.
    ``at_kill`` holds the checkpoint each killed run left."""
    root = tmp_path_factory.mktemp("killed")
    jobs = {}
    for name, (argv, _, kill_at) in KILLED.items():
        for part, logdir, extra, kill, after in (("straight", "straight", [], 0, None),
                                                 ("killed", "killed", [], kill_at, None),
                                                 ("resumed", "killed", ["--resume"], 0, f"{name}-killed")):
            jobs[f"{name}-{part}"] = [["--logdir", str(root / name / logdir), *COMMON, *argv, *extra], kill, after]
    done = run_jobs(root, jobs)
    results = {(name, part): done[f"{name}-{part}"] for name in KILLED for part in ("straight", "killed", "resumed")}
    at_kill = {}
    for name in KILLED:
        rc, out, err = results[name, "killed"]
        assert rc == -signal.SIGKILL, err
        assert "summary " not in out
        at_kill[name] = load(root / f"{name}-killed.pt")
    return root, results, at_kill


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
@pytest.mark.parametrize("name", sorted(KILLED))
def test_sigkilled_run_resumes_bitwise(killed_runs, name):
    root, results, at_kill = killed_runs
    _, steps_per_epoch, kill_at = KILLED[name]
    for part in ("straight", "resumed"):
        rc, _, err = results[name, part]
        assert rc == 0, err
    # It died inside epoch 2, after the end-of-epoch-1 checkpoint and before the next one.
    assert 0 < kill_at - steps_per_epoch < steps_per_epoch
    assert {k: at_kill[name]["state"][k] for k in ("epoch", "batch_in_epoch", "global_step")} == {
        "epoch": 1, "batch_in_epoch": 0, "global_step": steps_per_epoch}

    straight = load(root / name / "straight" / train.CHECKPOINT_NAME)
    resumed = load(root / name / "killed" / train.CHECKPOINT_NAME)
    for key in ("model", "optimizer", "rng", "loader_generator"):
        assert_same_tensors(resumed[key], straight[key], key)
    assert_same_tensors(untimed(resumed["state"]), untimed(straight["state"]), "state")
    assert resumed["state"]["global_step"] == 2 * steps_per_epoch
    assert untimed(summary_line(results[name, "resumed"][1])) == untimed(summary_line(results[name, "straight"][1]))


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
@pytest.mark.parametrize("name", sorted(KILLED))
def test_sigkilled_run_tensorboard_records(killed_runs, name):
    """Nothing logged up to the checkpoint is lost, and what the killed run logged after it is purged.

    The one allowed difference: the killed run's pre-step loss and accuracy of the batch after the
    checkpoint sit at the checkpoint's own x, which the purge keeps, so they may appear twice,
    with the same value."""
    root, _, at_kill = killed_runs
    boundary = at_kill[name]["state"]["examples"]
    whole, parts = events(root / name / "straight"), events(root / name / "killed")
    tags = set(whole.Tags()["scalars"])
    assert set(parts.Tags()["scalars"]) == tags
    for tag in (t for t in tags if "time" not in t):  # time/*, hf/time_*, hf/wall_time...: clock readings
        expected = [(e.step, e.value) for e in whole.Scalars(tag)]
        got = [(e.step, e.value) for e in parts.Scalars(tag)]
        if tag in ("train/loss", "train/accuracy") and len(got) == len(expected) + 1:
            at = [s for s, _ in got].index(boundary)
            assert got[at] == got[at + 1], tag
            del got[at]
        assert got == expected, tag


@pytest.mark.parametrize("name", sorted(KILLED))
def test_checkpoint_payload_is_weights_only(killed_runs, name):
    root, _, _ = killed_runs
    for part in ("straight", "killed"):
        path = root / name / part / train.CHECKPOINT_NAME
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
        assert set(train.CHECKPOINT_KEYS) <= load(path).keys()
        # the atomic writes left no temporary file behind
        assert sorted(p.name for p in path.parent.iterdir() if not p.name.startswith("events.")) == [path.name]


# --------------------------------------------------------------------------- atomic writes
def test_save_fsyncs_then_replaces_in_place(tmp_path, monkeypatch):
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(train.os, "fsync", lambda fd: (calls.append(("fsync", fd)), fsync(fd))[1])
    monkeypatch.setattr(train.os, "replace", lambda a, b: (calls.append(("replace", Path(a), Path(b))),
                                                           replace(a, b))[1])
    path = tmp_path / train.CHECKPOINT_NAME
    train.save_checkpoint(path, {"x": torch.arange(3)})
    assert calls[0][0] == "fsync" and calls[1][0] == "replace" and calls[2][0] == "fsync"  # file, rename, folder
    _, tmp, target = calls[1]
    assert target == path and tmp.parent == path.parent and tmp != path
    assert torch.equal(load(path)["x"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / train.CHECKPOINT_NAME
    train.save_checkpoint(path, {"x": torch.zeros(3)})
    before = path.read_bytes()

    def dies_half_way(payload, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(train.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, {"x": torch.ones(3)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file is gone


# --------------------------------------------------------------------------- damaged checkpoints
SGD_QUICK = ["--optimizer", "sgd", "--max-steps", "1", "--precise-bn", "0", "--quiet", "--threads", "1"]


def good_checkpoint(tmp_path: Path) -> Path:
    train.main(["--logdir", tmp_path / "good", *SGD_QUICK])
    return tmp_path / "good" / train.CHECKPOINT_NAME


def flip_member_byte(data: bytes, path: Path, member_suffix: str) -> bytes:
    """``data`` with one byte inside the first archive member whose name ends in ``member_suffix``
    flipped (its CRC no longer matches)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    header = data[info.header_offset:info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    at = start + info.file_size // 2
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def damage(kind: str, path: Path) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif kind == "flipped tensor byte":  # torch.load alone would load this without complaint
        path.write_bytes(flip_member_byte(data, path, "data/0"))
    elif kind == "flipped pickle byte":
        path.write_bytes(flip_member_byte(data, path, "data.pkl"))
    elif kind == "text file":
        path.write_text("not a checkpoint\n")
    elif kind == "a tensor":
        torch.save(torch.ones(3), path)
    elif kind == "a folder":
        path.unlink()
        path.mkdir()
    elif kind == "another version":  # an older one may lack some of today's keys
        checkpoint = load(path)
        checkpoint["version"] = train.CHECKPOINT_VERSION - 1
        del checkpoint["loader_generator"]
        torch.save(checkpoint, path)
    elif kind == "missing keys":
        checkpoint = load(path)
        del checkpoint["rng"]
        torch.save(checkpoint, path)
    elif kind == "foreign state":
        checkpoint = load(path)
        checkpoint["model"] = {"weight": torch.zeros(2)}
        torch.save(checkpoint, path)
    else:
        raise AssertionError(kind)


DAMAGE = ["truncated", "empty", "random bytes", "flipped tensor byte", "flipped pickle byte", "text file",
          "a tensor", "a folder", "another version", "missing keys", "foreign state"]


def test_damaged_checkpoints_are_refused(tmp_path):
    path = good_checkpoint(tmp_path)
    good = path.read_bytes()
    for kind in DAMAGE:
        logdir = tmp_path / kind.replace(" ", "_")
        logdir.mkdir()
        damaged = logdir / train.CHECKPOINT_NAME
        damaged.write_bytes(good)
        damage(kind, damaged)
        snapshot = damaged.read_bytes() if damaged.is_file() else None
        with pytest.raises(train.CheckpointError) as caught:
            train.main(["--logdir", logdir, *SGD_QUICK, "--max-steps", "2", "--resume"])
        message = str(caught.value)
        assert str(damaged) in message and "delete it" in message and "\n" not in message, (kind, message)
        if kind == "another version":
            assert "another version of train.py" in message
        # Refused, not started afresh over it: the file and the folder are as they were.
        assert (damaged.read_bytes() if damaged.is_file() else None) == snapshot, kind
        assert sorted(p.name for p in logdir.iterdir()) == [train.CHECKPOINT_NAME], kind


def test_cli_refuses_a_damaged_checkpoint_in_one_line(tmp_path):
    path = good_checkpoint(tmp_path)
    damage("truncated", path)
    result = subprocess.run([sys.executable, str(REPO / "examples" / "train.py"), "--logdir", str(path.parent),
                             *SGD_QUICK, "--resume"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "Warning" not in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"train.py: error: cannot resume from {path}: it is not a readable train.py "
                                "checkpoint (BadZipFile: "), errors[0]
    assert errors[0].endswith("truncated or corrupted?); delete it (or run without --resume) to start this run "
                              "from scratch"), errors[0]
