"""Floating types as the shell speaks of them: a dtype's short name, the floating dtype a model computes in."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["dtype_name", "floating_dtype"]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (the name ``--dtype`` takes)."""
    return str(dtype).replace("torch.", "")


def floating_dtype(model: torch.nn.Module, inputs: Iterable = ()) -> torch.dtype | None:
    """The dtype of the first floating tensor among ``model``'s parameters, then its buffers, then the tensors of
    ``inputs``; None when there is none."""
    tensors = [*model.parameters(), *model.buffers(), *(a for a in inputs if isinstance(a, torch.Tensor))]
    return next((t.dtype for t in tensors if t.is_floating_point()), None)
