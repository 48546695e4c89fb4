"""K-FAC from a maintained package, as a peer in the examples.

ASDL's K-FAC (PyPI ``asdfghjkl==0.1a5``, imported as ``asdl``; an optional
extra, ``pip install -e ".[examples]"``) preconditions each gradient with
Kronecker-factored blocks of a one-sample Monte-Carlo Fisher: Conv2d and
Linear layers get the K-FAC blocks, BatchNorm's (weight, bias) a 2x2 block per
channel.  The preconditioned gradient then drives SGD with momentum, as
kfac-pytorch and ASDL's own examples do.

ASDL runs the forward and backward itself, with its hooks on, so it cannot take
a ``torch.optim`` closure: the examples call :meth:`KFAC.step_batch` with the
batch instead.  Its curvature and inverses are refreshed at every step (ASDL's
default), which the damping 1e-3 needs to stay stable on c3d3_bn.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from torch import nn

DEFAULT_DAMPING = 1e-3


def load_asdl():
    """``asdl``'s K-FAC gradient maker and its configuration, imported only when asked for."""
    try:
        with warnings.catch_warnings():
            # asdl's module-level torch.jit.script use is deprecated in this torch; harmless.
            warnings.simplefilter("ignore", DeprecationWarning)
            from asdl import KfacGradientMaker, PreconditioningConfig
    except ImportError as err:
        raise ImportError('K-FAC needs the asdfghjkl package (ASDL): pip install -e ".[examples]" '
                          "(or pip install asdfghjkl==0.1a5)") from err
    return KfacGradientMaker, PreconditioningConfig


class KFAC:
    """SGD with momentum on ASDL's K-FAC-preconditioned gradient.

    ``param_groups`` are the SGD optimizer's, so a learning-rate warm-up sets
    ``group["lr"]`` as for any torch optimizer; ``state_dict`` is SGD's (the
    Kronecker factors are recomputed at every step and need no saving).
    """

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.9, damping: float = DEFAULT_DAMPING,
                 weight_decay: float = 0.0) -> None:
        self._maker_class, self._config_class = load_asdl()
        self.model, self.damping = model, damping
        self.sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        self._maker: Optional[Any] = None
        self._batch: Optional[int] = None

    @property
    def param_groups(self) -> list:
        return self.sgd.param_groups

    def _maker_for(self, batch: int):
        # ASDL scales its factors by the data size it was configured with: one per batch size.
        if self._maker is None or self._batch != batch:
            self._maker = self._maker_class(self.model, self._config_class(data_size=batch, damping=self.damping))
            self._batch = batch
        return self._maker

    def step_batch(self, model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One step on ``(x, y)``; returns the loss and outputs before it, or a NaN loss and
        ``None`` where ASDL could not invert a curvature factor (the step is not taken)."""
        maker = self._maker_for(len(x))
        self.sgd.zero_grad(set_to_none=True)
        try:
            with warnings.catch_warnings():
                # ASDL reads output gradients through the deprecated non-full backward hook.
                warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
                dummy = maker.setup_model_call(model, x)
                maker.setup_loss_call(loss_fn, dummy, y)
                outputs, loss = maker.forward_and_backward()
        except torch.linalg.LinAlgError:
            # A damped Kronecker factor that is not positive definite comes from activations or
            # gradients that have blown up (a rate too large): report the run as diverged, as a
            # non-finite loss would, without taking the step.
            self.sgd.zero_grad(set_to_none=True)
            return torch.tensor(math.nan), None
        self.sgd.step()
        return loss.detach(), outputs.detach()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.sgd.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sgd.load_state_dict(state)
