"""A test harness that forbids autograd while curvature operators are built and
applied.

Inside :func:`forbid_autograd` every entry point of reverse and forward mode
(``torch.autograd.grad``/``backward``, ``Tensor.backward``, the torch.func
transforms, ``torch.autograd.functional`` and dual tensors) raises
:class:`AutogradCalled`, unless the call comes from one of hfopt's declared
autograd paths:

* ``fallback``: :class:`hfopt.rules.fallback.FallbackRule`, the warned,
  reported rule for modules and functions without a closed form;
* ``loss``: the output Hessian of a loss without a closed form
  (``AutogradCurvature``/``GraphCurvature`` in ``hfopt/losses.py``).

Those calls are allowed and counted per path in the guard's ``calls``, so a
test can require that a closed-form model and loss make none at all.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import torch
import torch.autograd.forward_ad
import torch.autograd.functional
import torch.func

_HFOPT = Path(__import__("hfopt").__file__).resolve().parent
_DECLARED = {
    "fallback": (_HFOPT / "rules" / "fallback.py", None),
    "loss": (_HFOPT / "losses.py", {"AutogradCurvature", "GraphCurvature"}),
}


class AutogradCalled(AssertionError):
    """Autograd was entered outside hfopt's declared autograd paths."""


def _targets() -> List[Tuple[object, str]]:
    """(owner, attribute) of every entry point the guard replaces."""
    func = ["vjp", "jvp", "grad", "grad_and_value", "jacrev", "jacfwd", "hessian", "vmap", "linearize"]
    functional = ["vjp", "jvp", "vhp", "hvp", "jacobian", "hessian"]
    return ([(torch.autograd, "grad"), (torch.autograd, "backward"), (torch.Tensor, "backward"),
             (torch, "vmap"), (torch.autograd.forward_ad, "make_dual")]
            + [(torch.func, n) for n in func if hasattr(torch.func, n)]
            + [(torch.autograd.functional, n) for n in functional])


def _declared_path() -> str:
    """Which declared path is on the stack ('' if none)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        for name, (where, owners) in _DECLARED.items():
            if path == str(where):
                if owners is None:
                    return name
                owner = frame.f_locals.get("self")
                if owner is not None and type(owner).__name__ in owners:
                    return name
        frame = frame.f_back
    return ""


class Guard:
    def __init__(self) -> None:
        self.calls: Counter = Counter()

    def wrap(self, label: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            path = _declared_path()
            if not path:
                raise AutogradCalled(f"{label} called while a curvature operator was built or applied, outside "
                                     "the declared fallback rule and autograd loss path")
            self.calls[path] += 1
            return fn(*args, **kwargs)

        return guarded


@contextlib.contextmanager
def forbid_autograd() -> Iterator[Guard]:
    guard = Guard()
    saved = [(owner, name, getattr(owner, name)) for owner, name in _targets()]
    try:
        for owner, name, fn in saved:
            setattr(owner, name, guard.wrap(f"{getattr(owner, '__name__', type(owner).__name__)}.{name}", fn))
        yield guard
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
