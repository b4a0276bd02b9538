"""Plain modules the compiler emits besides torch.nn's own (importable, so fused models pickle)."""
from __future__ import annotations

import torch
import torch.nn as nn


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
