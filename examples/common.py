"""Helpers shared by ``examples/train.py`` and ``examples/compare.py``.

Importing this module puts the repository root on ``sys.path`` so the examples
run from a plain checkout (``python examples/train.py``) as well as after
``pip install -e ".[examples]"``; the checkout's ``hfopt`` and ``models`` win
over any other installed copy, since the examples document this checkout.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
# The shared data folder lives next to the checkout: <repo>/../shared/data.
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

if (REPO_ROOT / "hfopt" / "__init__.py").is_file() and str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

_DATA_CACHE: dict[tuple, dict[str, Any]] = {}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help text does not already say it and X means something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def load_data(name: str, data_dir: Optional[str] = None, seed: int = 0) -> dict[str, Any]:
    """``hfopt.datasets.load_dataset`` memoised per (name, folder, split seed).

    ``compare.py`` trains many runs in one process; this avoids re-reading
    CIFAR-10's pickles for every one. Callers must not modify the tensors.
    """
    from hfopt.datasets import load_dataset

    folder = None if name == "digits" else str(Path(data_dir or DEFAULT_DATA_DIR).expanduser().resolve())
    key = (name, folder, int(seed))
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_dataset(name, data_dir=folder, seed=seed)
    return _DATA_CACHE[key]


def parse_hf_options(items: Iterable[str]) -> dict[str, Any]:
    """``--hf-option KEY=VALUE`` items as HFOptimizer keywords, each VALUE a
    Python literal (a bare word such as ggn stays a string)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ValueError(f"--hf-option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            options[key] = text.strip()
    return options


def warmup_lr(lr: float, warmup_steps: int, step: int) -> float:
    """The learning rate of the ``step``-th step (1-based): linear warm-up
    from lr / W to lr over the first W = ``warmup_steps`` steps."""
    if warmup_steps and step < warmup_steps:
        return lr * step / warmup_steps
    return lr


def hf_available() -> bool:
    """Whether ``hfopt.HFOptimizer`` can be imported."""
    try:
        import hfopt

        return hasattr(hfopt, "HFOptimizer")
    except ImportError:
        return False


def first_reaching(history: Iterable[dict], key: str, target: float) -> Optional[dict]:
    """The first record of ``history`` whose ``key`` is at or below ``target`` (None if none)."""
    for record in history:
        value = record.get(key)
        if value is not None and math.isfinite(value) and value <= target:
            return record
    return None


def to_jsonable(obj: Any) -> Any:
    """Recursively turn tensors, numpy scalars, paths and tuples into JSON types."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):  # torch / numpy scalars
        return to_jsonable(obj.item())
    return str(obj)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(obj), indent=2) + "\n")
