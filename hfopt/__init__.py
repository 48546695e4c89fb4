"""hfopt: Hessian-free optimization with exact curvature through BatchNorm."""
from .curvature import GGN, CurvatureOperator, Hessian

__all__ = ["GGN", "Hessian", "CurvatureOperator"]
__version__ = "0.1.0"
from .optimizer import DIAGNOSTICS, HFOptimizer  # noqa: E402

__all__ += ["HFOptimizer", "DIAGNOSTICS"]
