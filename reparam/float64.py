"""A faster float64 depthwise convolution for reparam's private float64 runs (verification, proofs, recording).

PyTorch's CPU kernel for a float64 depthwise convolution (``groups == in_channels == out_channels``) runs 5-30x
slower than its float32 one; in a ConvNeXt, whose blocks open with a 7x7 depthwise convolution, it is at least
60 % of a float64 forward pass.  Inside :class:`FastFloat64`, such a convolution is computed as a sum of ``kh * kw``
shifted, per-channel scaled copies of the (padded, channels-last) input instead: the same products and sums,
in another order, so the result differs from PyTorch's by float64 rounding only (relative 1e-16), at 1.5-3x
the speed (except a stride-1 one on a map of 24x24 pixels or more, and a 3x3 one on a large map, where PyTorch's
is as fast or faster: those are left to it).
Every other op, and every depthwise convolution this does not cover (transposed, channel multipliers, other dtypes
and devices), runs as PyTorch has it.  (Autograd sits above this mode: a gradient
through such a convolution is still PyTorch's own.)
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


#: a 3x3 (or smaller) strided depthwise convolution on a map of at least this many pixels runs as PyTorch has it
#: (stride 1 is :data:`NATIVE_STRIDE_ONE_PIXELS`'s, a smaller size): measured on one core, PyTorch's kernel is as
#: fast from 48x48 and up to 1.5x faster from 96x96 on an AMD EPYC VM, 1.2-1.3x at stride 2 and 96x96 or more on an
#: Intel Xeon VM (the two layout copies here cost more than its taps save)
NATIVE_SMALL_KERNEL_PIXELS = 64 * 64
#: a stride-1 depthwise convolution of any kernel on a map of at least this many pixels runs as PyTorch has it: on an
#: Intel Xeon VM (one core) PyTorch's is 1.1-1.6x faster at 24x24 to 32x32 and 1.2-3x at 48x48 to 112x112 (each tap
#: here streams the whole map through memory), while the taps here stay 1.4-8x faster at 16x16 and below, and up to
#: 11x at stride 2 (a 3x3 on a large map excepted)
NATIVE_STRIDE_ONE_PIXELS = 24 * 24


def _is_plain_depthwise(x, w, transposed: bool, groups: int) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and x.dtype == torch.float64
        and x.device.type == "cpu"
        and x.dim() == 4
        and not transposed
        and groups > 1
        and x.shape[1] == groups
        and w.shape[0] == groups
        and w.shape[1] == 1
        and w.dtype == torch.float64
    )


def depthwise_conv2d(x: torch.Tensor, w: torch.Tensor, bias, stride, padding, dilation) -> torch.Tensor:
    """``F.conv2d(x, w, bias, stride, padding, dilation, groups=C)`` for ``x`` (N, C, H, W) and ``w`` (C, 1, kh, kw),
    as a sum of shifted, per-channel scaled views of the channels-last padded input; contiguous NCHW output."""
    n, c, h, wid = x.shape
    kh, kw = w.shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wid + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    padded = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1).contiguous()  # N, H, W, C: channel scale innermost
    taps = w.reshape(c, kh * kw).t().contiguous()
    out = torch.zeros(n, ho, wo, c, dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            window = padded[:, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw, :]
            out.addcmul_(window, taps[i * kw + j])
    if bias is not None:
        out += bias
    return out.permute(0, 3, 1, 2).contiguous()


class FastFloat64(TorchDispatchMode):
    """Inside this mode, float64 CPU depthwise convolutions run :func:`depthwise_conv2d`; everything else as usual."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.convolution.default and not kwargs:
            x, w, bias, stride, padding, dilation, transposed, _, groups = args
            if (
                _is_plain_depthwise(x, w, transposed, groups)
                and len(stride) == len(padding) == len(dilation) == 2
                and not _native_is_faster(x, w, stride)
            ):
                return depthwise_conv2d(x, w, bias, stride, padding, dilation)
        return func(*args, **kwargs)


def _native_is_faster(x: torch.Tensor, w: torch.Tensor, stride) -> bool:
    pixels = x.shape[-2] * x.shape[-1]
    if all(s == 1 for s in stride) and pixels >= NATIVE_STRIDE_ONE_PIXELS:
        return True
    return w.shape[-2] * w.shape[-1] <= 9 and pixels >= NATIVE_SMALL_KERNEL_PIXELS


def fast_float64_for(model: nn.Module) -> contextlib.AbstractContextManager:
    """:class:`FastFloat64` when ``model`` has a depthwise ``nn.Conv2d`` (one the mode covers), else a context that
    does nothing: the mode's Python dispatch costs every other op a few microseconds, up to a quarter of the
    float64 runs of a ResNet-50 for nothing."""
    if any(
        isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels
        for m in model.modules()
    ):
        return FastFloat64()
    return contextlib.nullcontext()
