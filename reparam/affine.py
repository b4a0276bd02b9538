"""The whole algebra: affine convolutions and the exact operations on them.

An :class:`Affine` is ``y = conv(x, weight, bias, stride, padding, dilation, groups)`` for a fixed
layout: channels-first with ``nd`` spatial axes (Conv1d/2d/3d), or channels-last (``nd == 0``,
``nn.Linear`` over the last axis; a 2-D ``(N, C)`` tensor is channels-last too).  Padding is kept
per axis as ``(lo, hi)`` so asymmetric pads compose exactly.

Every formula of reparam lives here once.  Each operation states ``before -> after`` and its
precondition; a violated precondition raises :class:`Refusal` with a sentence a user can read, and
the caller leaves that part of the graph exact and unmerged.

Weights are expected in float64 (the pipeline folds on a float64 copy of the model).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from functools import reduce

import torch
import torch.nn.functional as F


class Refusal(Exception):
    """A merge the math does not allow here; the message says why (one sentence)."""


# --------------------------------------------------------------------------------------------
# layout


@dataclass(frozen=True)
class Layout:
    """Where the channels are: ``nd`` spatial axes after a channel axis at 1, or channels last."""

    nd: int  # number of spatial axes; 0 for channels-last (Linear)

    @property
    def channels_last(self) -> bool:
        return self.nd == 0

    @staticmethod
    def of_rank(rank: int, channels_last: bool = False) -> "Layout":
        """Layout for a tensor of ``rank`` whose channels are at axis 1 (or last)."""
        if channels_last or rank <= 2:
            return Layout(0)
        return Layout(rank - 2)

    def channel_axis(self, rank: int) -> int:
        return rank - 1 if self.channels_last else 1

    def __str__(self) -> str:
        return "channels-last" if self.channels_last else f"{self.nd}-d channels-first"


# --------------------------------------------------------------------------------------------
# the affine convolution


class Kind(str, Enum):
    """What an :class:`Affine` is known to be, tracked symbolically so that no operation has to scan a weight
    to find structure.  Its value is the word reports and tests use (``Kind.DENSE == "dense"``)."""

    IDENTITY = "identity"  # y = x (a depthwise 1x1 of ones)
    DIAGONAL = "diagonal"  # one scale per channel (1x1, groups == channels)
    PAD = "pad"  # an identity with zero padding
    DENSE = "dense"  # anything else

    def __str__(self) -> str:
        return self.value

    @property
    def channelwise(self) -> bool:
        """Each output channel is its own input channel times a number (identity or diagonal)."""
        return self in (Kind.IDENTITY, Kind.DIAGONAL)


class Lazy:
    """A weight known by its shape, computed on first use (planning needs only geometry)."""

    __slots__ = ("shape", "_fn", "_value")

    def __init__(self, shape: Sequence[int], fn: Callable[[], torch.Tensor]):
        self.shape: tuple[int, ...] = tuple(shape)
        self._fn = fn
        self._value: torch.Tensor | None = None

    def resolve(self) -> torch.Tensor:
        if self._value is None:
            self._value = self._fn()
        return self._value

    def take(self) -> torch.Tensor:
        """The value, handed over: the caller may write into it; a later read recomputes it."""
        value, self._value = self.resolve(), None
        return value


@dataclass(frozen=True)
class Affine:
    """``y = conv_nd(pad(x, lo, hi, padding_mode), weight, bias, stride, dilation, groups)``.

    w: weight ``(out, in // groups, *kernel)``, a tensor or a :class:`Lazy` one (read ``.weight``);
    bias: ``(out,)`` or None (structurally zero).
    kind: a :class:`Kind` (given as a member or its word).
    """

    w: torch.Tensor | Lazy
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    pad_lo: tuple[int, ...]
    pad_hi: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    layout: Layout
    padding_mode: str = "zeros"
    kind: Kind = Kind.DENSE

    def __post_init__(self) -> None:
        if not isinstance(self.kind, Kind):
            object.__setattr__(self, "kind", Kind(self.kind))

    # -- shape facts --------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.w.resolve() if isinstance(self.w, Lazy) else self.w

    @property
    def nd(self) -> int:
        return self.layout.nd

    @property
    def out_channels(self) -> int:
        return self.w.shape[0]

    @property
    def in_channels(self) -> int:
        return self.w.shape[1] * self.groups

    @property
    def kernel(self) -> tuple:
        return tuple(self.w.shape[2:])

    @property
    def extent(self) -> tuple:
        """Input span of one output position per axis: ``d * (k - 1) + 1``."""
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel, strict=True))

    @property
    def pads(self) -> bool:
        return any(self.pad_lo) or any(self.pad_hi)

    @property
    def is_pointwise(self) -> bool:
        """1x1 kernel, stride 1, no padding: acts on each position alone."""
        return all(e == 1 for e in self.extent) and all(s == 1 for s in self.stride) and not self.pads

    def out_size(self, n: Sequence[int]) -> tuple:
        """Spatial output size for spatial input size ``n`` (PyTorch's floor rule)."""
        return tuple(
            (ni + lo + hi - e) // s + 1
            for ni, lo, hi, e, s in zip(n, self.pad_lo, self.pad_hi, self.extent, self.stride, strict=False)
        )

    def macs(self) -> float:
        """Multiply-accumulates per input position of the region root (stride-normalised)."""
        if self.kind in (Kind.IDENTITY, Kind.PAD):
            return 0.0
        per_out = math.prod(self.w.shape)
        return per_out / math.prod(self.stride) if self.nd else float(per_out)

    def bias_is_zero(self) -> bool:
        return self.bias is None or not bool(torch.any(self.bias != 0))

    def describe(self) -> str:
        if self.layout.channels_last:
            return f"linear {self.in_channels}->{self.out_channels}"
        k = "x".join(map(str, self.kernel))
        extra = ""
        if any(s != 1 for s in self.stride):
            extra += f" stride {'x'.join(map(str, self.stride))}"
        if self.groups != 1:
            extra += f" groups {self.groups}"
        return f"{k} conv {self.in_channels}->{self.out_channels}{extra}"


# --------------------------------------------------------------------------------------------
# constructors


def _tuple(v, nd: int) -> tuple:
    if isinstance(v, (list, tuple)):
        assert len(v) == nd, (v, nd)
        return tuple(int(x) for x in v)
    return (int(v),) * nd


def same_padding(kernel: tuple, dilation: tuple) -> tuple[tuple, tuple]:
    """PyTorch's ``padding='same'`` (stride 1): total ``d*(k-1)``, the odd pixel on the high side."""
    total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
    lo = tuple(t // 2 for t in total)
    return lo, tuple(t - low for t, low in zip(total, lo, strict=True))


def from_conv(weight, bias, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros") -> Affine:
    """ConvNd module or ``F.conv{n}d`` call -> Affine. ``padding`` may be int, tuple, 'same' or 'valid'."""
    nd = weight.dim() - 2
    kernel = tuple(weight.shape[2:])
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    if padding == "valid":
        lo = hi = (0,) * nd
    elif padding == "same":
        if any(s != 1 for s in stride):
            raise Refusal("padding='same' with stride > 1 is not a fixed padding")
        lo, hi = same_padding(kernel, dilation)
    else:
        lo = hi = _tuple(padding, nd)
    if padding_mode != "zeros" and not (any(lo) or any(hi)):
        padding_mode = "zeros"  # no padding read: the mode is irrelevant
    return Affine(weight, bias, stride, lo, hi, dilation, int(groups), Layout(nd), padding_mode)


def from_linear(weight, bias) -> Affine:
    """``nn.Linear`` / ``F.linear`` -> channels-last Affine."""
    return Affine(weight, bias, (), (), (), (), 1, Layout(0))


def _unit(layout: Layout, channels: int, scale: torch.Tensor, shift: torch.Tensor | None, kind: Kind) -> Affine:
    weight = scale.reshape(channels, 1, *([1] * layout.nd))
    ones = (1,) * layout.nd
    zeros = (0,) * layout.nd
    return Affine(weight, shift, ones, zeros, zeros, ones, channels, layout, "zeros", kind)


def identity(channels: int, layout: Layout, dtype=torch.float64, device=None) -> Affine:
    """``y = x`` as a depthwise 1x1 conv with weight 1 at ``[i, 0, centre]`` (groups == channels)."""
    return _unit(layout, channels, torch.ones(channels, dtype=dtype, device=device), None, Kind.IDENTITY)


def channelwise(scale: torch.Tensor, shift: torch.Tensor | None, layout: Layout) -> Affine:
    """``y = scale[c] * x + shift[c]`` (BatchNorm, layer scale, per-channel bias)."""
    return _unit(layout, scale.numel(), scale.reshape(-1), None if shift is None else shift.reshape(-1), Kind.DIAGONAL)


def batchnorm(mean, var, weight, bias, eps: float, layout: Layout) -> Affine:
    """Inference BatchNorm ``(x - mean) / sqrt(var + eps) * weight + bias`` -> channelwise."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return channelwise(scale, shift, layout)


def avgpool(channels: int, kernel, stride, padding, layout: Layout, dtype=torch.float64, device=None) -> Affine:
    """``AvgPool(count_include_pad=True)`` -> depthwise conv of ``1 / prod(kernel)``.

    Precondition (checked by the caller): count_include_pad=True or no padding, ceil_mode=False,
    no divisor_override.
    """
    nd = layout.nd
    kernel = _tuple(kernel, nd)
    stride = _tuple(kernel if stride is None or stride == [] else stride, nd)
    pad = _tuple(padding, nd)
    weight = torch.full((channels, 1, *kernel), 1.0 / math.prod(kernel), dtype=dtype, device=device)
    return Affine(weight, None, stride, pad, pad, (1,) * nd, channels, layout)


def zero_pad(channels: int, lo: tuple, hi: tuple, layout: Layout, dtype=torch.float64, device=None) -> Affine:
    """``F.pad(x, ..., value=0)`` -> identity with padding (negative pads are not supported)."""
    if any(p < 0 for p in lo + hi):
        raise Refusal("negative padding (cropping) is not a convolution")
    base = identity(channels, layout, dtype, device)
    return replace(base, pad_lo=tuple(lo), pad_hi=tuple(hi), kind=Kind.PAD)


# --------------------------------------------------------------------------------------------
# structural helpers


def regroup(a: Affine, groups: int) -> Affine:
    """Same map with fewer groups: ``groups`` must divide ``a.groups``; the weight becomes block-diagonal."""
    if groups == a.groups:
        return a
    assert a.groups % groups == 0
    out, in_per_old = a.weight.shape[0], a.weight.shape[1]
    in_per_new = a.in_channels // groups
    ratio = a.groups // groups
    old_group_of_out = torch.arange(out, device=a.weight.device) // (out // a.groups)
    offset = (old_group_of_out % ratio) * in_per_old  # where the old group's inputs sit in the new group
    cols = offset[:, None] + torch.arange(in_per_old, device=a.weight.device)[None, :]
    w = a.weight.new_zeros((out, in_per_new, *a.kernel))
    index = cols.reshape(out, in_per_old, *([1] * a.nd)).expand_as(a.weight)
    w.scatter_(1, index, a.weight)
    return replace(a, w=w, groups=groups, kind=Kind.DENSE)


def _embed(weight: torch.Tensor, nd: int, offsets: tuple, step: tuple, size: tuple) -> torch.Tensor:
    """Place kernel taps ``t`` at ``offsets + t * step`` inside a zero kernel of ``size``."""
    out = weight.new_zeros((*weight.shape[:2], *size))
    index = (slice(None), slice(None)) + tuple(
        slice(o, o + s * (k - 1) + 1, s) for o, s, k in zip(offsets, step, weight.shape[2:], strict=True)
    )
    out[index] = weight
    return out


def _kernel_sum(weight: torch.Tensor) -> torch.Tensor:
    """``(O, I, *kernel) -> (O, I)``: each kernel's taps summed (what a constant input meets); a kernel of one tap is
    its own sum (a view: no new tensor for the 1x1 convs whose bias a composition asks for, refused or not)."""
    if all(k == 1 for k in weight.shape[2:]):
        return weight.reshape(weight.shape[:2])
    return weight.sum(tuple(range(2, weight.dim())))


def _grouped_matvec(weight2d: torch.Tensor, vector: torch.Tensor, groups: int) -> torch.Tensor:
    """``out[o] = sum_c weight2d[o, c] * vector[group(o) * C_g + c]`` for a grouped weight ``(O, C_g)``."""
    out, per = weight2d.shape
    v = vector.reshape(groups, per)
    return torch.einsum("gop,gp->go", weight2d.reshape(groups, out // groups, per), v).reshape(out)


def _total(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``t1 + t2 + ...`` in that order (at least one term)."""
    return reduce(torch.add, tensors)


def _add_bias(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


# --------------------------------------------------------------------------------------------
# parallel: add and concat


def _common_padding_mode(branches: Sequence[Affine]) -> str:
    """Reflect/replicate/circular padding merges only with branches that read no padding at all."""
    modes = {a.padding_mode for a in branches if a.pads and a.padding_mode != "zeros"}
    if not modes:
        return "zeros"
    if len(modes) > 1:
        raise Refusal(f"branches pad with different modes ({', '.join(sorted(modes))})")
    mode = modes.pop()
    for a in branches:
        if a.padding_mode == "zeros" and a.pads:
            raise Refusal(f"a zero-padded {a.describe()} cannot share a {mode}-padded kernel")
    return mode


@dataclass(frozen=True)
class _Grid:
    """Common kernel grid of parallel branches: geometry plus where each branch's taps land."""

    geometry: dict  # stride, pad_lo, pad_hi, dilation, groups, layout, padding_mode
    kernel: tuple
    offsets: list  # per branch: first tap index per axis in the common kernel
    steps: list  # per branch: tap spacing per axis in the common kernel


def _align(branches: Sequence[Affine], same_input: bool = True) -> _Grid:
    """Bring parallel branches on one input to one kernel grid.

    Precondition (each violation refused): same layout, in-channels and stride, and the same output
    grid: per axis ``hi - (extent - 1 - lo)`` equal, so every branch produces the same output size for
    every input size and output ``o`` of each reads around input ``o * stride``.  Kernels are centred
    per axis (non-square kernels too); groups become the gcd, dilation the gcd of all tap spacings.
    """
    first = branches[0]
    for a in branches[1:]:
        if a.layout != first.layout:
            raise Refusal(f"branches have different layouts ({a.layout} vs {first.layout})")
        if same_input and a.in_channels != first.in_channels:
            raise Refusal("branches read different channel counts")
        if a.stride != first.stride:
            raise Refusal(f"branches have different strides ({a.stride} vs {first.stride})")
    nd = first.nd
    mode = _common_padding_mode(branches)
    right = [tuple(hi - (e - 1 - lo) for hi, e, lo in zip(a.pad_hi, a.extent, a.pad_lo, strict=True)) for a in branches]
    if any(r != right[0] for r in right):
        raise Refusal("branches' output positions do not align (kernel centre minus padding differs)")
    lo = tuple(max(a.pad_lo[i] for a in branches) for i in range(nd))
    offsets = [tuple(lo[i] - a.pad_lo[i] for i in range(nd)) for a in branches]
    extent = tuple(max(o[i] + a.extent[i] for o, a in zip(offsets, branches, strict=True)) for i in range(nd))
    dil = tuple(
        reduce(math.gcd, [a.dilation[i] for a in branches if a.kernel[i] > 1] + [o[i] for o in offsets], 0) or 1
        for i in range(nd)
    )
    kernel = tuple((e - 1) // d + 1 for e, d in zip(extent, dil, strict=True))
    hi = tuple(right[0][i] + extent[i] - 1 - lo[i] for i in range(nd))
    groups = reduce(math.gcd, [a.groups for a in branches])
    geometry = dict(
        stride=first.stride, pad_lo=lo, pad_hi=hi, dilation=dil, groups=groups, layout=first.layout, padding_mode=mode
    )
    return _Grid(
        geometry,
        kernel,
        [tuple(o // d for o, d in zip(off, dil, strict=True)) for off in offsets],
        [tuple(ad // d if k > 1 else 1 for ad, d, k in zip(a.dilation, dil, a.kernel, strict=True)) for a in branches],
    )


def _scatter_diagonal(weight: torch.Tensor, a: Affine, groups: int, offset: tuple) -> None:
    """``weight[i, i mod (C/groups), offset] += scale[i]``: a channelwise branch added in place."""
    channels = a.out_channels
    rows = torch.arange(channels, device=weight.device)
    index = (rows, rows % (channels // groups)) + tuple(torch.full_like(rows, o) for o in offset)
    weight.index_put_(index, a.weight.reshape(-1), accumulate=True)


def _fills_grid(a: Affine, grid: _Grid, offset: tuple, groups: int) -> bool:
    """Is ``a``'s weight already laid out on the common kernel in ``groups`` groups (nothing to embed)?"""
    return a.groups == groups and tuple(a.kernel) == grid.kernel and all(o == 0 for o in offset)


def _on_grid(a: Affine, grid: _Grid, offset: tuple, step: tuple, groups: int, writable: bool = False) -> torch.Tensor:
    """``a``'s weight in ``groups`` groups on the common kernel, to read (when it already is that: ``a``'s own tensor,
    which the callers that concatenate copy anyway); ``writable``: a new tensor, safe to mutate."""
    if _fills_grid(a, grid, offset, groups):
        if isinstance(a.w, Lazy):
            return a.w.take()
        return a.weight.clone() if writable else a.weight
    return _embed(regroup(a, groups).weight, a.nd, offset, step, grid.kernel)


def _accumulate(weight: torch.Tensor, a: Affine, offset: tuple, step: tuple, groups: int) -> None:
    """``weight[taps of a] += a`` in place, without building ``a`` on the full kernel."""
    index = (slice(None), slice(None)) + tuple(
        slice(o, o + s * (k - 1) + 1, s) for o, s, k in zip(offset, step, a.kernel, strict=True)
    )
    weight[index] += regroup(a, groups).weight


def add(branches: Sequence[Affine]) -> Affine:
    """``A1(x) + ... + An(x) -> A(x)``: kernels centred per axis in the largest, weights and biases summed.

    Precondition: see :func:`_align` (same input, stride, output grid; compatible padding modes).
    Identity / channelwise branches are added on the diagonal ``[i, i mod (C/g), centre]``.
    """
    if len(branches) == 1:
        return branches[0]
    if len({a.out_channels for a in branches}) != 1:
        raise Refusal("summed branches have different channel counts")
    bias = reduce(_add_bias, [a.bias for a in branches])
    if all(a.kind.channelwise for a in branches):
        return channelwise(_total([a.weight.reshape(-1) for a in branches]), bias, branches[0].layout)
    grid = _align(branches)
    groups = grid.geometry["groups"]

    def start(i: int) -> tuple:
        # channelwise branches last: they are scattered onto the diagonal of the others' sum (the first branch
        # is not channelwise: sums of channelwise branches alone returned above); first a weight already on the
        # common kernel, computed for this sum (a RepVGG block's BN-scaled 3x3): it is the sum's storage, and the
        # 1x1 is added into its centre, where starting from the 1x1 costs a zero kernel and the 3x3 besides
        a = branches[i]
        return a.kind.channelwise, not _fills_grid(a, grid, grid.offsets[i], groups), not isinstance(a.w, Lazy)

    def summed() -> torch.Tensor:
        first, *rest = sorted(range(len(branches)), key=start)
        weight = _on_grid(branches[first], grid, grid.offsets[first], grid.steps[first], groups, writable=True)
        for i in rest:
            a = branches[i]
            if a.kind.channelwise and not a.pads:
                _scatter_diagonal(weight, a, groups, grid.offsets[i])
            else:
                _accumulate(weight, a, grid.offsets[i], grid.steps[i], groups)
        return weight

    shape = (branches[0].out_channels, branches[0].in_channels // groups) + grid.kernel
    return Affine(Lazy(shape, summed), bias, **grid.geometry)


def concat(branches: Sequence[Affine]) -> Affine:
    """``cat([A1(x), ..., An(x)], channel_axis) -> A(x)`` with the output channels stacked.

    Precondition: as :func:`add`.  Concatenated outputs interleave the branches' groups, so the
    result has groups 1.
    """
    grid = _align(branches)

    def stacked() -> torch.Tensor:
        return torch.cat(
            [_on_grid(a, grid, off, st, 1) for a, off, st in zip(branches, grid.offsets, grid.steps, strict=True)]
        )

    biases = [a.bias if a.bias is not None else torch.zeros(a.out_channels, dtype=torch.float64) for a in branches]
    bias = None if all(a.bias is None for a in branches) else torch.cat(biases)
    shape = (sum(a.out_channels for a in branches), branches[0].in_channels) + grid.kernel
    return Affine(Lazy(shape, stacked), bias, **dict(grid.geometry, groups=1))


def strided_identity(channels: int, layout: Layout, stride: tuple, sign: float = 1.0) -> Affine:
    """``y[o] = sign * x[o * stride]``: the centre tap of a strided conv, as a depthwise 1x1."""
    base = identity(channels, layout)
    return replace(base, w=base.weight * sign, stride=tuple(stride), kind=Kind.DENSE)


def sum_over_inputs(branches: Sequence[Affine]) -> Affine:
    """``[x1, ..., xn] -> A1(x1) + ... + An(xn)``: weights stacked along the input axis, biases summed.

    Precondition: the same geometry (kernel, stride, padding, dilation, padding mode) and out-channels.
    """
    first = branches[0]
    geometry = lambda a: (a.kernel, a.stride, a.pad_lo, a.pad_hi, a.dilation, a.padding_mode, a.layout)  # noqa: E731
    if any(geometry(a) != geometry(first) or a.out_channels != first.out_channels for a in branches):
        raise Refusal("paths end in convolutions of different shapes")
    weight = torch.cat([regroup(a, 1).weight for a in branches], 1)
    bias = reduce(_add_bias, [a.bias for a in branches])
    return replace(first, w=weight, bias=bias, groups=1, kind=Kind.DENSE)


def widen_inputs(a: Affine, extra: int) -> Affine:
    """``A`` reading ``extra`` more input channels (appended, zero weights): groups become 1."""
    dense = regroup(a, 1)
    w = torch.cat([dense.weight, dense.weight.new_zeros((a.out_channels, extra, *a.kernel))], 1)
    return replace(dense, w=w, kind=Kind.DENSE)


def _merge_factors(a: Affine, b: Affine) -> tuple | None:
    """Smallest (ka, kb) merging ka groups of ``a`` and kb of ``b`` into groups of one shape."""
    ia, oa = a.w.shape[1], a.out_channels // a.groups
    ib, ob = b.w.shape[1], b.out_channels // b.groups
    for ka in (k for k in range(1, a.groups + 1) if a.groups % k == 0):
        if (ka * ia) % ib:
            continue
        kb = ka * ia // ib
        if kb <= b.groups and b.groups % kb == 0 and ka * oa == kb * ob:
            return ka, kb
    return None


def direct_sum(a: Affine, b: Affine) -> Affine:
    """``[x1, x2] -> [A(x1), B(x2)]``, block-diagonal; stays grouped when the groups can share a shape.

    Precondition: as :func:`add` for the geometry (same stride and output grid).
    """
    grid = _align([a, b], same_input=False)
    factors = _merge_factors(a, b)
    if factors is not None:
        ga, gb = a.groups // factors[0], b.groups // factors[1]
        wa = _on_grid(a, grid, grid.offsets[0], grid.steps[0], ga)
        wb = _on_grid(b, grid, grid.offsets[1], grid.steps[1], gb)
        weight, groups = torch.cat([wa, wb]), ga + gb
    else:
        wa = _on_grid(a, grid, grid.offsets[0], grid.steps[0], 1)
        wb = _on_grid(b, grid, grid.offsets[1], grid.steps[1], 1)
        weight = wa.new_zeros((a.out_channels + b.out_channels, a.in_channels + b.in_channels) + grid.kernel)
        weight[: a.out_channels, : a.in_channels] = wa
        weight[a.out_channels :, a.in_channels :] = wb
        groups = 1
    zeros = lambda t: torch.zeros(t.out_channels, dtype=torch.float64)  # noqa: E731
    bias = (
        None
        if a.bias is None and b.bias is None
        else torch.cat([a.bias if a.bias is not None else zeros(a), b.bias if b.bias is not None else zeros(b)])
    )
    return Affine(weight, bias, **dict(grid.geometry, groups=groups))


# --------------------------------------------------------------------------------------------
# sequential: compose


def reads_only_zero_border(a: Affine, axis: int) -> bool:
    """True when ``a``'s outputs just outside its output range would be exactly zero on ``axis``.

    That is what a zero-padded conv after ``a`` reads, and what the composite must reproduce:
    ``a``'s taps for output index ``-1`` and ``n_out`` must all fall in zero padding of the input
    (``extent - 1 - lo < stride`` and ``extent - 1 <= hi``), ``a`` pads with zeros, and its bias is 0.
    """
    e, lo, hi, s = a.extent[axis], a.pad_lo[axis], a.pad_hi[axis], a.stride[axis]
    return e - 1 - lo < s and e - 1 <= hi and (a.padding_mode == "zeros" or not a.pads)


def _check_composable(a: Affine, b: Affine) -> None:
    if a.layout != b.layout:
        raise Refusal(f"layouts differ ({a.layout} then {b.layout})")
    if a.out_channels != b.in_channels:
        raise Refusal("channel counts do not chain")
    if not b.pads:
        return
    if b.padding_mode != "zeros":
        if not a.is_pointwise:
            raise Refusal(f"the {b.describe()} after it pads with {b.padding_mode} and {a.describe()} is not pointwise")
        return
    for axis in range(b.nd):
        if (b.pad_lo[axis] or b.pad_hi[axis]) and not reads_only_zero_border(a, axis):
            raise Refusal(
                f"the {b.describe()} after {a.describe()} pads with zeros, but {a.describe()} "
                f"would not produce zeros there"
            )
    if not a.bias_is_zero():
        raise Refusal(f"{a.describe()} has a bias and the {b.describe()} after it pads with zeros")


def compose(a: Affine, b: Affine) -> Affine:
    """``B(A(x)) -> C(x)``: stride ``sa*sb``, padding ``lo_a + sa*lo_b``, kernel taps at
    ``ta*da + sa*db*tb``, bias ``b_B + sum(W_B) @ b_A``.

    Precondition: layouts and channels chain; if ``B`` pads with zeros, ``A``'s out-of-range outputs
    are zero (:func:`reads_only_zero_border` on each padded axis and a zero bias); if ``B`` pads with
    another mode, ``A`` is pointwise.
    """
    _check_composable(a, b)
    if a.kind is Kind.IDENTITY and not a.pads:
        return b
    if b.kind is Kind.IDENTITY:
        return a
    if a.kind is Kind.PAD and b.kind is Kind.PAD:  # pads of pads: one pad
        return replace(
            a,
            pad_lo=tuple(x + y for x, y in zip(a.pad_lo, b.pad_lo, strict=True)),
            pad_hi=tuple(x + y for x, y in zip(a.pad_hi, b.pad_hi, strict=True)),
        )
    mode = b.padding_mode if b.pads and b.padding_mode != "zeros" else a.padding_mode
    if b.kind is Kind.DIAGONAL:  # channelwise after: scale rows
        scale = b.weight.reshape(-1)
        weight = Lazy(a.w.shape, lambda: a.weight * scale.reshape(-1, *([1] * (len(a.w.shape) - 1))))
        bias = b.bias if a.bias is None else _add_bias(a.bias * scale, b.bias)
        return replace(a, w=weight, bias=bias, kind=Kind.DIAGONAL if a.kind.channelwise else Kind.DENSE)
    if a.kind is Kind.DIAGONAL and not a.pads:  # channelwise before: scale input columns
        scale = a.weight.reshape(-1)
        scaled = Lazy(b.w.shape, lambda: b.weight * _columns(scale, b))
        bias = b.bias
        if a.bias is not None:
            bias = _add_bias(_grouped_matvec(_kernel_sum(b.weight), a.bias, b.groups), b.bias)
        return replace(b, w=scaled, bias=bias, padding_mode=mode, kind=Kind.DENSE if b.kind is Kind.PAD else b.kind)
    return _compose_general(a, b, mode)


def _columns(scale: torch.Tensor, b: Affine) -> torch.Tensor:
    """``scale`` (one number per input channel of ``b``) as the factor of each of ``b``'s weight columns:
    ``(O, I/g, 1, ...)`` with ``[o, j] = scale[group(o) * I/g + j]``, a broadcast view for one group (no index
    tensor the size of the weight)."""
    per, spread = b.w.shape[1], (1,) * b.nd
    if b.groups == 1:
        return scale.reshape(1, per, *spread)
    rows = b.out_channels // b.groups
    return scale.reshape(b.groups, 1, per).expand(b.groups, rows, per).reshape(b.out_channels, per, *spread)


def _compose_general(a: Affine, b: Affine, mode: str) -> Affine:
    groups = math.gcd(a.groups, b.groups)
    step = tuple(sa * db for sa, db in zip(a.stride, b.dilation, strict=True))
    dil = tuple(
        (math.gcd(da if ka > 1 else 0, st if kb > 1 else 0) or 1)
        for da, ka, st, kb in zip(a.dilation, a.kernel, step, b.kernel, strict=True)
    )
    extent = tuple(ea + st * (kb - 1) for ea, st, kb in zip(a.extent, step, b.kernel, strict=True))
    kernel = tuple((e - 1) // d + 1 for e, d in zip(extent, dil, strict=True))
    stride = tuple(sa * sb for sa, sb in zip(a.stride, b.stride, strict=True))
    lo = tuple(la + sa * lb for la, sa, lb in zip(a.pad_lo, a.stride, b.pad_lo, strict=True))
    hi = tuple(ha + sa * hb for ha, sa, hb in zip(a.pad_hi, a.stride, b.pad_hi, strict=True))
    bias = b.bias
    if a.bias is not None:
        bias = _add_bias(_grouped_matvec(regroup_2d(_kernel_sum(b.weight), b, groups), a.bias, groups), b.bias)
    shape = (b.out_channels, a.in_channels // groups) + kernel
    return Affine(
        Lazy(shape, lambda: _composite_weight(a, b, groups, step, dil)),
        bias,
        stride,
        lo,
        hi,
        dil,
        groups,
        a.layout,
        mode,
    )


def regroup_2d(summed: torch.Tensor, b: Affine, groups: int) -> torch.Tensor:
    """``b``'s kernel-summed weight ``(O, M/b.groups)`` expressed with ``groups`` groups."""
    if groups == b.groups:
        return summed
    return regroup(Affine(summed, None, (), (), (), (), b.groups, Layout(0)), groups).weight


def _composite_weight(a: Affine, b: Affine, groups: int, step: tuple, dil: tuple) -> torch.Tensor:
    """Kernel of ``B(A(x))``: ``sum_m,tb W_B[o, m, tb] * W_A[m, i, p - step * tb]`` at dilation ``dil``."""
    nd = a.nd
    if nd == 0:
        a, b = regroup(a, groups), regroup(b, groups)
        out, mid, in_g = b.out_channels, a.out_channels, a.w.shape[1]
        return torch.einsum(
            "gom,gmi->goi",
            b.weight.reshape(groups, out // groups, mid // groups),
            a.weight.reshape(groups, mid // groups, in_g),
        ).reshape(out, in_g)
    w = _depthwise_composite(a, b, step)
    if w is None:
        a, b = regroup(a, groups), regroup(b, groups)
        out, mid = b.out_channels, a.out_channels
        # conv_transpose with weight W_B^T computes sum_m,t W_B[o, m, t] * W_A[m, i, p - step*t]
        wt = b.weight.reshape(groups, out // groups, mid // groups, *b.kernel).transpose(1, 2)
        wt = wt.reshape(mid, out // groups, *b.kernel)
        conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
        w = conv_t(_spelled_out(a).transpose(0, 1), wt, groups=groups, dilation=step).transpose(0, 1)
    if any(d != 1 for d in dil):
        w = w[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dil)]
    return w.contiguous()


def _spelled_out(a: Affine) -> torch.Tensor:
    """``a``'s kernel at dilation 1 (its taps in a zero kernel of its extent)."""
    if all(d == 1 for d in a.dilation):
        return a.weight
    return _embed(a.weight, a.nd, (0,) * a.nd, a.dilation, a.extent)


def _depthwise_composite(a: Affine, b: Affine, step: tuple) -> torch.Tensor | None:
    """:func:`_composite_weight` at dilation 1 when one side is depthwise, without densifying it; None otherwise.

    B depthwise (each output ``o`` reads mid channel ``o // k``, channel multiplier ``k``): ``W[o, i] = sum_t
    W_B[o, 0, t] * W_A[o // k, i]`` shifted by ``step * t``, with ``a.groups`` groups.  A depthwise with one output
    per input: ``W[o, j] = sum_t W_B[o, j, t] * W_A[m(o, j), 0]`` shifted alike, ``m`` the mid channel B's
    ``j``-th input of ``o``'s group is, with ``b.groups`` groups.  Regrouping the depthwise side to the common
    groups instead (the general path) makes it dense: a DenseNet transition's 1x1 conv then 2x2 pool cost
    ``C^3`` multiply-adds in float64, 0.7 s at 1792 channels."""
    mid, out = a.out_channels, b.out_channels
    if b.w.shape[1] == 1 and b.groups == mid:  # output m * k + j reads mid channel m
        taps = b.weight.reshape(mid, out // mid, 1, *b.kernel)
        return _shifted_sum(_spelled_out(a).unsqueeze(1), taps, step).flatten(0, 1)
    if a.w.shape[1] == 1 and a.groups == a.in_channels == mid:  # B's group g reads mid channels g * M/g ...
        per = mid // b.groups
        taps = b.weight.reshape(b.groups, out // b.groups, per, *b.kernel)
        rows = _spelled_out(a).reshape(b.groups, 1, per, *a.extent)
        return _shifted_sum(rows, taps, step).flatten(0, 1)
    return None


def _shifted_sum(rows: torch.Tensor, taps: torch.Tensor, step: tuple) -> torch.Tensor:
    """``W[..., step * t + q] += taps[..., t] * rows[..., q]`` over ``taps``' kernel positions ``t`` (the last
    ``len(step)`` sides), the leading sides broadcast against each other (views, no copies of either)."""
    nd = len(step)
    extent, kernel = rows.shape[-nd:], taps.shape[-nd:]
    lead = torch.broadcast_shapes(rows.shape[:-nd], taps.shape[:-nd])
    size = tuple(e + s * (k - 1) for e, s, k in zip(extent, step, kernel, strict=True))
    out = rows.new_zeros((*lead, *size))
    spread = (1,) * nd
    for t in itertools.product(*(range(k) for k in kernel)):
        window: tuple = (Ellipsis, *(slice(s * i, s * i + e) for s, i, e in zip(step, t, extent, strict=True)))
        tap: tuple = (Ellipsis, *t)
        out[window] += taps[tap].reshape(*taps.shape[:-nd], *spread) * rows
    return out


# --------------------------------------------------------------------------------------------
# fixed-size samples: an affine op as a matrix over each sample's flattened values


@dataclass(frozen=True)
class RowMap:
    """``y.flatten() = M @ x.flatten() + bias`` per sample (row-major flattening), ``M`` block-diagonal:
    ``blocks`` ``(g, out/g, in/g)`` (group ``k`` maps the ``k``-th chunk of the values), or ``diag``
    ``(n,)`` when the map is channelwise; the other one is None."""

    blocks: torch.Tensor | None
    diag: torch.Tensor | None
    bias: torch.Tensor

    @property
    def dense(self) -> torch.Tensor:
        """``blocks``, of a map that is not diagonal."""
        if self.blocks is None:
            raise TypeError("a diagonal RowMap has no blocks")
        return self.blocks

    @property
    def size(self) -> tuple[int, int]:
        """(values out, values in)."""
        if self.diag is not None:
            return (self.diag.numel(),) * 2
        g, o, i = self.dense.shape
        return (g * o, g * i)

    @property
    def groups(self) -> int:
        return self.diag.numel() if self.diag is not None else self.dense.shape[0]

    def in_groups(self, g: int) -> torch.Tensor:
        """The blocks for ``g`` groups (``g`` divides :attr:`groups`): ``r`` blocks side by side on a diagonal."""
        if self.diag is not None:
            return torch.diag_embed(self.diag.reshape(g, -1))
        r = self.groups // g
        if r == 1:
            return self.dense
        return torch.stack([torch.block_diag(*self.dense[k * r : (k + 1) * r]) for k in range(g)])

    def times(self, v: torch.Tensor) -> torch.Tensor:
        """``M @ v``."""
        if self.diag is not None:
            return self.diag * v
        g, _, i = self.dense.shape
        return (self.dense @ v.reshape(g, i, 1)).reshape(-1)


def unroll(a: Affine, sample: tuple) -> RowMap:
    """``a`` on samples of the fixed shape ``sample`` (``(c, *spatial)``, or ``(c,)`` channels-last)
    -> its :class:`RowMap`: ``bias = a(0)``, column ``j`` of ``M`` is ``a(e_j) - a(0)`` (what RepMLP's
    ``locality_injection`` computes for a conv over an h x w partition).  Groups do not mix, so one
    basis image per in-group position probes every group at once.  A channelwise ``a`` stays
    diagonal (scale and shift repeated over the spatial positions); a pointwise ``a`` on samples of
    one position is its own weight."""
    per = math.prod(sample[1:])
    bias = torch.zeros(a.out_channels, dtype=torch.float64) if a.bias is None else a.bias.reshape(-1)
    g = a.groups
    if a.kind.channelwise and not a.pads:
        return RowMap(None, a.weight.reshape(-1).repeat_interleave(per), bias.repeat_interleave(per))
    if per == 1 and a.is_pointwise:  # a 1x1 conv / Linear on single positions: its weight is the matrix
        return RowMap(a.weight.reshape(g, a.out_channels // g, -1), None, bias)
    n = math.prod(sample) // g  # values per group
    basis = torch.eye(n, dtype=torch.float64)[:, None, :].expand(n, g, n).reshape(n, *sample)
    zero = apply(a, basis.new_zeros((1, *sample)))
    columns = (apply(a, basis) - zero).reshape(n, g, -1)  # [j, group, out value in group]
    return RowMap(columns.permute(1, 2, 0).contiguous(), None, zero.reshape(-1))


def compose_rows(first: RowMap, then: RowMap) -> RowMap:
    """``then(first(x))`` per sample, in the groups both share (their gcd).
    Precondition: ``then`` reads as many values as ``first`` writes."""
    if then.size[1] != first.size[0]:
        raise Refusal("per-sample maps do not chain (value counts differ)")
    bias = then.times(first.bias) + then.bias
    if then.diag is not None and first.diag is not None:
        return RowMap(None, then.diag * first.diag, bias)
    if then.diag is not None:
        g, o, _ = first.dense.shape
        return RowMap(first.dense * then.diag.reshape(g, o, 1), None, bias)
    if first.diag is not None:
        g, _, i = then.dense.shape
        return RowMap(then.dense * first.diag.reshape(g, 1, i), None, bias)
    g = math.gcd(first.groups, then.groups)
    return RowMap(then.in_groups(g) @ first.in_groups(g), None, bias)


def add_rows(maps: Sequence[RowMap]) -> RowMap:
    """``M1(x) + ... + Mn(x)`` per sample, in the groups all share.  Precondition: the same sizes."""
    if len({r.size for r in maps}) != 1:
        raise Refusal("summed per-sample maps have different sizes")
    bias = _total([r.bias for r in maps])
    diagonals = [r.diag for r in maps if r.diag is not None]
    if len(diagonals) == len(maps):
        return RowMap(None, _total(diagonals), bias)
    g = reduce(math.gcd, [r.groups for r in maps])
    return RowMap(_total([r.in_groups(g) for r in maps]), None, bias)


def from_rows(r: RowMap) -> Affine:
    """A :class:`RowMap` as a grouped 1x1 conv over ``(N, values, 1, 1)``."""
    blocks = r.in_groups(r.groups)
    g, o, i = blocks.shape
    return from_conv(blocks.reshape(g * o, i, 1, 1).contiguous(), r.bias, groups=g)


# --------------------------------------------------------------------------------------------
# evaluation (tests and verification)


def torch_pads(lo: Sequence[int], hi: Sequence[int]) -> tuple[int, ...]:
    """Per-axis ``(lo, hi)`` -> ``F.pad``'s order: last axis first, ``(lo, hi)`` per axis."""
    return tuple(p for low, high in zip(reversed(lo), reversed(hi), strict=True) for p in (low, high))


def apply(a: Affine, x: torch.Tensor) -> torch.Tensor:
    """Run ``a`` on ``x`` with eager PyTorch (the reference semantics of an Affine)."""
    if a.layout.channels_last:
        w = regroup(a, 1).weight if a.groups != 1 else a.weight
        return F.linear(x, w, a.bias)
    pads = list(torch_pads(a.pad_lo, a.pad_hi))
    if any(pads):
        x = F.pad(x, pads, mode="constant" if a.padding_mode == "zeros" else a.padding_mode)
    conv = (F.conv1d, F.conv2d, F.conv3d)[a.nd - 1]
    return conv(x, a.weight, a.bias, a.stride, 0, a.dilation, a.groups)
