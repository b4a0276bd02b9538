"""Floating types: a dtype's short name as the shell speaks of it, the floating dtype a model computes in, a model
made float32 in place for a while."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["dtype_name", "float32", "floating_dtype", "in_float32"]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (the name ``--dtype`` takes)."""
    return str(dtype).replace("torch.", "")


def floating_dtype(model: torch.nn.Module, inputs: Iterable = ()) -> torch.dtype | None:
    """The dtype of the first floating tensor among ``model``'s parameters, then its buffers, then the tensors of
    ``inputs``; None when there is none."""
    tensors = [*model.parameters(), *model.buffers(), *(a for a in inputs if isinstance(a, torch.Tensor))]
    return next((t.dtype for t in tensors if t.is_floating_point()), None)


def float32(dtypes: dict, main: torch.dtype) -> bool:
    """A float32 model: its main dtype and the dtype of every floating tensor in ``dtypes`` (name -> dtype) are."""
    return main == torch.float32 and all(d == torch.float32 for d in dtypes.values() if d.is_floating_point)


def in_float32(*modules: torch.nn.Module) -> list:
    """Every float64 parameter and buffer of ``modules`` (their submodules' too) made float32 in place; returns
    (tensor, its float64 data) for each, to put back exactly."""
    changed, seen = [], set()
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            if t.dtype == torch.float64 and id(t) not in seen:
                seen.add(id(t))
                changed.append((t, t.data))
                t.data = t.data.to(torch.float32)
    return changed
