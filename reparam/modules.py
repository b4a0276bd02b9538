"""Plain modules reparam builds besides torch.nn's own (importable, so models holding them pickle).

- :class:`ChannelAffine`: what the compiler emits for a folded chain of channel-wise ops with no convolution.
- :class:`CastInputs`: a model fed inputs of another floating dtype (a float16 deploy model's inputs given to its
  float32 original, to compare the two on the same inputs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["ChannelAffine", "CastInputs"]


class ChannelAffine(nn.Module):
    """``y = x * scale[c] + shift[c]`` in one kernel (``torch.addcmul``; ``x * scale`` without shift): a folded chain of
    channel-wise ops (BatchNorms, layer scales, skips) with no convolution to absorb them.

    ``scale``/``shift`` are stored already shaped for broadcasting: ``(C, 1, ..., 1)`` for channels-first
    tensors with ``nd`` spatial axes, ``(C,)`` for channels-last.
    """

    def __init__(self, scale: torch.Tensor, shift, nd: int):
        super().__init__()
        shape = (-1,) + (1,) * nd
        self.scale = nn.Parameter(scale.reshape(shape).clone(), requires_grad=False)
        # no shift (a pure layer scale): one multiply instead of addcmul with zeros
        self.shift = None if shift is None else nn.Parameter(shift.reshape(shape).clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift is None:
            return x * self.scale
        return torch.addcmul(self.shift, x, self.scale)


class CastInputs(nn.Module):
    """``module`` called with its floating tensor inputs cast to ``dtype`` (outputs as ``module`` returns them)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, *args: Any) -> Any:
        cast = [a.to(self.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        return self.module(*cast)
