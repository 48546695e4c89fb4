"""LayerNorm, GroupNorm and InstanceNorm (module and functional forms)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import Tensor, nn

from .base import Rule


def module_normalization(module: nn.Module) -> Optional[Rule]:
    return None


def function_normalization(target: Callable, args: tuple, kwargs: dict, values: Sequence[Tensor],
                           active: Sequence[bool]) -> Optional[Rule]:
    return None
