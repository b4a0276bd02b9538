"""reparam: structural re-parameterization compiler for PyTorch.

``reparam.fuse(model)`` traces a model with torch.fx, folds BatchNorms, merges parallel linear
branches, composes linear sequences and collapses linear skips into single convolutions, verifies
the result in float64 and returns a plain deploy model.

The compiler (:mod:`reparam.pipeline`, :mod:`reparam.equalization`: they need torch) is imported on first use of one of
its names, so that
``import reparam`` — and ``reparam --help`` — stay fast.
"""

from .errors import EquivalenceError, ReparamError
from .report import Report

__all__ = [
    "fuse",
    "equalize",
    "fuse_with_report",
    "explain",
    "Report",
    "ReparamError",
    "EquivalenceError",
    "TrainingModeWarning",
    "VerificationSkippedWarning",
    "MacCost",
    "LatencyCost",
    "LatencyCache",
]
__version__ = "0.1.0"

_LAZY = {
    "fuse": "pipeline",
    "fuse_with_report": "pipeline",
    "explain": "pipeline",
    "TrainingModeWarning": "pipeline",
    "VerificationSkippedWarning": "pipeline",
    "equalize": "equalization",
    "MacCost": "cost",
    "LatencyCost": "cost",
    "LatencyCache": "latency_cache",
}


def __getattr__(name: str):
    """Import the module behind one of reparam's names (they need torch) when it is first asked for (PEP 562)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reparam' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
