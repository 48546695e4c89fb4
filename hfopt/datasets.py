"""Datasets used by hfopt's examples and benchmarks: CIFAR-10 and scikit-learn's digits.

Everything is returned as :class:`torch.utils.data.TensorDataset` holding
``(images, labels)`` so that callers (and Hessian-free's full-batch curvature
passes) can reach the raw tensors through ``.tensors``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import TensorDataset

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

DIGITS_SHAPE = (1, 8, 8)
CIFAR10_SHAPE = (3, 32, 32)


class UnsafePickleError(pickle.UnpicklingError):
    """A dataset pickle referenced a global outside the allow-list; nothing from it was called."""


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1").
    # Other codecs are refused so the pickle cannot reach arbitrary codec machinery.
    if not (isinstance(text, str) and isinstance(encoding, str)):
        raise UnsafePickleError("refusing _codecs.encode with non-string arguments")
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1", errors)


def _numpy_multiarray() -> Any:
    # numpy 2 moved numpy.core to numpy._core and warns on the old name; resolve
    # both spellings found in pickles to whichever module this numpy has.
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    multiarray = _numpy_multiarray()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    # Python 2 pickles name the builtins module "__builtin__".
    for module in ("builtins", "__builtin__"):
        for container in (list, dict, tuple, set, frozenset, bytes, bytearray):
            allowed[(module, container.__name__)] = container
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array reconstruction and builtin containers.

    CIFAR-10 ships as pickles, and unpickling runs whatever callables a file
    names; refusing every other global means a tampered file raises instead
    of executing code.
    """

    def __init__(self, file: BinaryIO, source: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name} from {self._source}: "
                "only numpy arrays and builtin containers are allowed in dataset pickles"
            ) from None


def _load_pickle(path: Path) -> Any:
    with path.open("rb") as f:
        return _RestrictedUnpickler(f, path).load()


def _field(batch: dict, key: str, path: Path) -> Any:
    # The official files are Python 2 pickles with bytes keys; re-pickled copies may use str keys.
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise KeyError(f"{path} has no {key!r} entry; is it a CIFAR-10 python batch?")


def _cifar10_folder(root: str | os.PathLike) -> Path:
    root = Path(root).expanduser()
    if root.name != CIFAR10_FOLDER and (root / CIFAR10_FOLDER).is_dir():
        return root / CIFAR10_FOLDER
    batch_files = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    if root.name == CIFAR10_FOLDER or any((root / f).exists() for f in batch_files):
        return root
    return root / CIFAR10_FOLDER


def _split_files(folder: Path, split: str) -> list[Path]:
    names = CIFAR10_TRAIN_FILES if split == "train" else (CIFAR10_TEST_FILE,)
    return [folder / name for name in names if (folder / name).is_file()]


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _safe_extract(archive: Path, destination: Path) -> None:
    destination = destination.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            path = Path(member.name)
            if member.name.startswith(("/", "\\")) or path.is_absolute() or ".." in path.parts:
                raise RuntimeError(f"refusing to extract {archive}: unsafe member path {member.name!r}")
            if not (member.isfile() or member.isdir()):
                raise RuntimeError(f"refusing to extract {archive}: {member.name!r} is not a regular file")
        for member in members:
            target = destination / member.name
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # regular files always have a data stream
            with source, target.open("wb") as out:
                while chunk := source.read(1 << 20):
                    out.write(chunk)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download_cifar10(folder: Path) -> None:
    """Fetch and unpack the official archive next to ``folder`` (``folder.parent``)."""
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    archive = parent / CIFAR10_URL.rsplit("/", 1)[-1]
    if not (archive.is_file() and _md5(archive) == CIFAR10_MD5):
        partial = archive.with_name(archive.name + ".part")
        try:
            with urllib.request.urlopen(CIFAR10_URL, timeout=60) as response:
                with partial.open("wb") as out:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
        except OSError as err:  # URLError, HTTPError and socket timeouts are all OSErrors
            partial.unlink(missing_ok=True)
            # A URLError's str() wraps its reason in "<urlopen error ...>"; HTTPError's names the status.
            is_http = isinstance(err, urllib.error.HTTPError)
            reason = err.reason if isinstance(err, urllib.error.URLError) and not is_http else err
            raise RuntimeError(
                f"could not download CIFAR-10 from {CIFAR10_URL}: {reason}; "
                f"place the extracted {CIFAR10_FOLDER} folder at {folder}"
            ) from None
        actual = _md5(partial)
        if actual != CIFAR10_MD5:
            partial.unlink()
            raise RuntimeError(
                f"downloaded CIFAR-10 archive from {CIFAR10_URL} has MD5 {actual}, "
                f"expected {CIFAR10_MD5}; the download is corrupt or was altered. "
                f"Retry, or place the extracted {CIFAR10_FOLDER} folder at {folder}"
            )
        partial.replace(archive)
    _safe_extract(archive, parent)


def _normalise_cifar(data: np.ndarray) -> torch.Tensor:
    images = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)).reshape(-1, *CIFAR10_SHAPE)
    images = images.to(torch.float32).div_(255.0)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return images.sub_(mean).div_(std)


def load_cifar10(root: str | os.PathLike, split: str = "train", download: bool = False) -> TensorDataset:
    """Load CIFAR-10 from the official python layout as normalised float32 images.

    ``root`` is the ``cifar-10-batches-py`` folder or its parent. The training
    split concatenates whichever of ``data_batch_1`` .. ``data_batch_5`` are
    present, in order; the test split reads ``test_batch``. Images are
    ``[N, 3, 32, 32]``, scaled to [0, 1] and then standardised per channel with
    the fixed constants ``CIFAR10_MEAN``/``CIFAR10_STD``; labels are int64.

    Local files are not checksummed (re-pickled copies are legitimate), but
    every pickle is read with an allow-list unpickler, so a tampered file
    raises :class:`UnsafePickleError` instead of running code. With
    ``download=True`` and the split's files missing, the official archive is
    downloaded into the folder's parent, verified by MD5 and extracted.
    """
    _check_split(split)
    folder = _cifar10_folder(root)
    files = _split_files(folder, split)
    if not files and download:
        _download_cifar10(folder)
        files = _split_files(folder, split)
    if not files:
        expected = ", ".join(CIFAR10_TRAIN_FILES) if split == "train" else CIFAR10_TEST_FILE
        raise FileNotFoundError(
            f"no CIFAR-10 {split} batches in {folder}: expected "
            f"{'at least one of ' if split == 'train' else ''}{expected} "
            "(the official python version); pass download=True or point root at an existing copy"
        )
    images, labels = [], []
    for path in files:
        batch = _load_pickle(path)
        images.append(_normalise_cifar(_field(batch, "data", path)))
        labels.append(torch.as_tensor(np.asarray(_field(batch, "labels", path), dtype=np.int64)))
    return TensorDataset(torch.cat(images), torch.cat(labels))


def cifar10_classes(root: str | os.PathLike) -> list[str]:
    """Class names from ``batches.meta``, indexed by label."""
    path = _cifar10_folder(root) / CIFAR10_META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected the official CIFAR-10 python layout")
    names = _field(_load_pickle(path), "label_names", path)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def load_digits() -> TensorDataset:
    """scikit-learn's 1,797 handwritten 8x8 digits as ``[N, 1, 8, 8]`` float32 and int64 labels.

    Pixel values 0..16 are scaled to [0, 1] and then standardised with the
    single mean and standard deviation of all pixels of the whole set (one
    scalar each, since many border pixels are constant). Using the whole set,
    test images included, leaks only these two numbers.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError:
        raise ImportError(
            'the digits dataset needs scikit-learn; install it with pip install "hfopt[examples]"'
        ) from None
    bunch = sklearn_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0)
    images = ((images - images.mean()) / images.std()).unsqueeze(1)
    return TensorDataset(images, torch.as_tensor(bunch.target, dtype=torch.int64))


def _check_fractions(**fractions: float) -> None:
    for name, value in fractions.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if sum(fractions.values()) >= 1.0:
        raise ValueError(f"fractions {fractions} leave no training data")


def _take(dataset: TensorDataset, index: torch.Tensor) -> TensorDataset:
    return TensorDataset(*(t[index] for t in dataset.tensors))


def _tensors_of(dataset: TensorDataset) -> tuple[torch.Tensor, ...]:
    tensors = getattr(dataset, "tensors", None)
    if tensors is None:
        raise TypeError(f"expected a TensorDataset, got {type(dataset).__name__}")
    return tensors


def train_val_split(
    dataset: TensorDataset, val_fraction: float = 0.1, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """Randomly hold out ``round(val_fraction * N)`` samples as a validation set.

    The permutation comes from a ``torch.Generator`` seeded with ``seed``, so
    the split is reproducible and independent of the global RNG state.
    """
    _check_fractions(val_fraction=val_fraction)
    n = len(_tensors_of(dataset)[0])
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    n_val = round(val_fraction * n)
    return _take(dataset, order[n_val:]), _take(dataset, order[:n_val])


def digits_splits(
    seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Stratified, reproducible train/validation/test split of :func:`load_digits`.

    Each class contributes ``round(fraction * class_size)`` samples to the
    validation and test sets, so all three keep the classes' proportions. Each
    split is returned in a seeded random order, not grouped by class.
    """
    _check_fractions(val_fraction=val_fraction, test_fraction=test_fraction)
    dataset = load_digits()
    labels = dataset.tensors[1]
    generator = torch.Generator().manual_seed(seed)
    parts: tuple[list[torch.Tensor], ...] = ([], [], [])
    for cls in torch.unique(labels):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = round(test_fraction * len(members))
        n_val = round(val_fraction * len(members))
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test : n_test + n_val])
        parts[0].append(members[n_test + n_val :])
    splits = []
    for part in parts:
        index = torch.cat(part)
        splits.append(_take(dataset, index[torch.randperm(len(index), generator=generator)]))
    return splits[0], splits[1], splits[2]


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, seed: int = 0, download: bool = False
) -> dict[str, Any]:
    """Train/validation/test sets plus ``num_classes`` and per-sample ``input_shape``.

    ``"digits"`` uses :func:`digits_splits` (``data_dir`` is ignored).
    ``"cifar10"`` carves a 10% validation set out of the training batches with
    :func:`train_val_split` and tests on ``test_batch``; ``data_dir`` is the
    ``cifar-10-batches-py`` folder or its parent and defaults to ``./data``.
    """
    if name == "digits":
        train, val, test = digits_splits(seed=seed)
        return {"train": train, "val": val, "test": test, "num_classes": 10, "input_shape": DIGITS_SHAPE}
    if name == "cifar10":
        root = Path("data") if data_dir is None else Path(data_dir)
        train, val = train_val_split(load_cifar10(root, "train", download=download), 0.1, seed)
        test = load_cifar10(root, "test", download=download)
        return {"train": train, "val": val, "test": test, "num_classes": 10,
                "input_shape": CIFAR10_SHAPE}
    raise ValueError(f"unknown dataset {name!r}; choose 'digits' or 'cifar10'")
