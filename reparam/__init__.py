"""reparam: structural re-parameterization compiler for PyTorch.

``reparam.fuse(model)`` traces a model with torch.fx, folds BatchNorms, merges parallel linear
branches, composes linear sequences and collapses linear skips into single convolutions, verifies
the result in float64 and returns a plain deploy model.

The compiler (:mod:`reparam.pipeline`, which needs torch) is imported on first use of one of its names, so that
``import reparam`` — and ``reparam --help`` — stay fast.
"""
from .errors import EquivalenceError, ReparamError
from .report import Report

__all__ = ["fuse", "fuse_with_report", "explain", "Report", "ReparamError", "EquivalenceError",
           "TrainingModeWarning", "VerificationSkippedWarning"]
__version__ = "0.1.0"

_PIPELINE_NAMES = frozenset({"fuse", "fuse_with_report", "explain", "TrainingModeWarning",
                             "VerificationSkippedWarning"})


def __getattr__(name: str):
    """Import :mod:`reparam.pipeline` when one of its names is first asked for (PEP 562)."""
    if name in _PIPELINE_NAMES:
        from . import pipeline

        value = getattr(pipeline, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reparam' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _PIPELINE_NAMES)
