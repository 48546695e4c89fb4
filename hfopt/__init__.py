"""hfopt: Hessian-free optimization with exact curvature through BatchNorm."""
from .curvature import GGN, CurvatureOperator, FlatOperator, Hessian
from .dataset_operator import DatasetOperator
from .guard import ForwardMismatchError
from .rules.fallback import UnsupportedLayerError

__all__ = ["GGN", "Hessian", "CurvatureOperator", "FlatOperator", "DatasetOperator", "ForwardMismatchError",
           "UnsupportedLayerError"]
__version__ = "0.1.0"
from .optimizer import DIAGNOSTICS, HFOptimizer  # noqa: E402
from .spectrum import EigenResult, SpectralDensity, TraceResult, eigenvalues, plot_density, spectral_density, \
    trace  # noqa: E402

__all__ += ["HFOptimizer", "DIAGNOSTICS", "eigenvalues", "trace", "spectral_density", "plot_density",
            "EigenResult", "TraceResult", "SpectralDensity"]
