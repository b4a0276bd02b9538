"""reparam: structural re-parameterization compiler for PyTorch.

``reparam.fuse(model)`` traces a model with torch.fx, folds BatchNorms, merges parallel linear
branches, composes linear sequences and collapses linear skips into single convolutions, verifies
the result in float64 and returns a plain deploy model.
"""
from .equalization import equalize
from .errors import EquivalenceError, ReparamError
from .pipeline import TrainingModeWarning, VerificationSkippedWarning, explain, fuse, fuse_with_report
from .report import Report

__all__ = ["fuse", "equalize", "fuse_with_report", "explain", "Report", "ReparamError", "EquivalenceError",
           "TrainingModeWarning", "VerificationSkippedWarning"]
__version__ = "0.1.0"
