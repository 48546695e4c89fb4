import _codecs
import builtins
import hashlib
import io
import os
import pickle
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from hfopt import datasets
from hfopt.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    UnsafePickleError,
    cifar10_classes,
    digits_splits,
    load_cifar10,
    load_dataset,
    load_digits,
    train_val_split,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-10-batches-py"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCH_SIZES = {"data_batch_1": 5, "data_batch_2": 3, "test_batch": 4}


def _write_pickle(path: Path, obj: object) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def _write_cifar(folder: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write a tiny CIFAR-10 folder in the official format; return each batch's raw contents."""
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    raw = {}
    for name, n in BATCH_SIZES.items():
        data = rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)
        labels = [int(v) for v in rng.randint(0, 10, size=n)]
        _write_pickle(
            folder / name,
            {b"batch_label": name.encode(), b"labels": labels, b"data": data,
             b"filenames": [f"img{i}.png".encode() for i in range(n)]},
        )
        raw[name] = (data, labels)
    _write_pickle(
        folder / "batches.meta",
        {b"num_cases_per_batch": 10000, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072},
    )
    return raw


def _normalised(data: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(data.astype(np.float32) / 255.0).reshape(-1, 3, 32, 32)
    return (x - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)


@pytest.fixture
def tiny_cifar(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    return folder, _write_cifar(folder)


def test_cifar_train_concatenates_batches_and_normalises(tiny_cifar):
    folder, raw = tiny_cifar
    images, labels = load_cifar10(folder, "train").tensors
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (8,) and labels.dtype == torch.int64
    expected = np.concatenate([raw["data_batch_1"][0], raw["data_batch_2"][0]])
    torch.testing.assert_close(images, _normalised(expected))
    assert labels.tolist() == raw["data_batch_1"][1] + raw["data_batch_2"][1]


def test_cifar_test_split_and_parent_folder(tiny_cifar):
    folder, raw = tiny_cifar
    images, labels = load_cifar10(folder.parent, split="test").tensors
    torch.testing.assert_close(images, _normalised(raw["test_batch"][0]))
    assert labels.tolist() == raw["test_batch"][1]
    assert cifar10_classes(folder.parent) == CLASSES


def test_cifar_missing_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="data_batch_1") as info:
        load_cifar10(folder)
    assert str(folder) in str(info.value)
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_cifar10(tmp_path, split="test")
    with pytest.raises(ValueError, match="split"):
        load_cifar10(folder, split="validation")


class _Exploit:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("attack", ["system", "eval"])
def test_malicious_pickle_is_refused_without_side_effects(tmp_path, attack):
    marker = tmp_path / "pwned"
    payload = (
        _Exploit(os.system, f"touch {marker}")
        if attack == "system"
        else _Exploit(builtins.eval, f"__import__('pathlib').Path({str(marker)!r}).touch()")
    )
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write_pickle(folder / "data_batch_1", {b"data": payload, b"labels": [0]})
    with pytest.raises(UnsafePickleError, match=rf"\.{attack} from .*data_batch_1"):
        load_cifar10(folder)
    assert not marker.exists()


def test_pickle_codecs_encode_only_allows_latin1(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write_pickle(folder / "batches.meta", {b"label_names": [_Exploit(_codecs.encode, "x")]})
    with pytest.raises(UnsafePickleError, match="encode"):
        cifar10_classes(folder)


def _offline(*args, **kwargs):
    raise urllib.error.URLError("no network here")


def test_download_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    expected = "could not download CIFAR-10 from https://.*no network here"
    with pytest.raises(RuntimeError, match=expected) as info:
        load_cifar10(tmp_path, download=True)
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert list(tmp_path.iterdir()) == []


def _serve(payload: bytes):
    return lambda *args, **kwargs: io.BytesIO(payload)


def test_download_md5_mismatch(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _serve(b"definitely not the CIFAR archive"))
    with pytest.raises(RuntimeError, match="MD5"):
        load_cifar10(tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


def _tarball(add) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        add(tar)
    return buffer.getvalue()


def _serve_verified(monkeypatch, payload: bytes) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _serve(payload))
    monkeypatch.setattr(datasets, "CIFAR10_MD5", hashlib.md5(payload).hexdigest())


def test_download_extracts_verified_archive(tmp_path, monkeypatch):
    source = tmp_path / "source"
    raw = _write_cifar(source / "cifar-10-batches-py")
    archive = _tarball(lambda tar: tar.add(source / "cifar-10-batches-py", "cifar-10-batches-py"))
    _serve_verified(monkeypatch, archive)
    data_dir = tmp_path / "data"
    _, labels = load_cifar10(data_dir / "cifar-10-batches-py", "test", download=True).tensors
    assert labels.tolist() == raw["test_batch"][1]
    assert (data_dir / "cifar-10-python.tar.gz").is_file()


def test_download_rejects_path_traversal(tmp_path, monkeypatch):
    def add(tar):
        info = tarfile.TarInfo("../escaped")
        content = b"gotcha"
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))

    _serve_verified(monkeypatch, _tarball(add))
    data_dir = tmp_path / "data"
    with pytest.raises(RuntimeError, match="unsafe member"):
        load_cifar10(data_dir, download=True)
    assert not (tmp_path / "escaped").exists()


def test_digits_tensors():
    images, labels = load_digits().tensors
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    assert abs(images.mean().item()) < 1e-4 and abs(images.std().item() - 1) < 1e-4


def _rows(*splits) -> np.ndarray:
    """Each sample as one row (pixels then label), rows sorted, to compare splits as multisets."""
    rows = np.concatenate(
        [torch.cat([s.tensors[0].reshape(len(s), -1), s.tensors[1][:, None].float()], 1).numpy() for s in splits]
    )
    return rows[np.lexsort(rows.T[::-1])]


def test_digits_splits_partition_and_determinism():
    train, val, test = digits_splits(seed=0)
    assert (len(train), len(val), len(test)) == (1259, 179, 359)
    np.testing.assert_array_equal(_rows(train, val, test), _rows(load_digits()))
    again = digits_splits(seed=0)
    for a, b in zip((train, val, test), again):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))
    assert not torch.equal(digits_splits(seed=1)[2].tensors[1], test.tensors[1])
    counts = torch.bincount(test.tensors[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_train_val_split():
    full = load_digits()
    train, val = train_val_split(full, val_fraction=0.25, seed=3)
    assert (len(train), len(val)) == (1348, 449)
    np.testing.assert_array_equal(_rows(train, val), _rows(full))
    again_train, _ = train_val_split(full, val_fraction=0.25, seed=3)
    assert torch.equal(train.tensors[0], again_train.tensors[0])
    with pytest.raises(ValueError):
        train_val_split(full, val_fraction=1.0)


def test_load_dataset_digits():
    data = load_dataset("digits")
    assert data["num_classes"] == 10 and data["input_shape"] == (1, 8, 8)
    assert sum(len(data[k]) for k in ("train", "val", "test")) == 1797
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


def test_load_dataset_cifar10(tiny_cifar):
    folder, _ = tiny_cifar
    data = load_dataset("cifar10", data_dir=folder.parent)
    assert (len(data["train"]), len(data["val"]), len(data["test"])) == (7, 1, 4)
    assert data["input_shape"] == (3, 32, 32) and data["num_classes"] == 10


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'pip install "hfopt\[examples\]"'):
        load_digits()


@pytest.mark.skipif(
    not SHARED.exists(), reason="../shared/data/cifar-10-batches-py is absent (a user's clone); CI has it"
)
def test_shared_cifar10():
    train_labels = load_cifar10(SHARED, "train").tensors[1]
    test_images, test_labels = load_cifar10(SHARED, "test").tensors
    assert len(train_labels) == 10_000 and len(test_labels) == 10_000
    assert test_images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(test_labels, minlength=10).tolist() == [1000] * 10
    train_counts = torch.bincount(train_labels, minlength=10)
    assert train_counts.min() >= 900 and train_counts.max() <= 1100
    assert cifar10_classes(SHARED) == CLASSES
