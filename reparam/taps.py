"""Which kernel taps of a run's convolutions touch the input: what a check on smaller inputs can vouch for.

A convolution's output on an ``n``-pixel side reads tap ``t`` of its kernel only where ``o * stride + t * dilation -
padding`` falls inside the input for some output position ``o``; on a small input the outer taps of a large kernel
read nothing but padding.  A fused model that agrees with the original on such an input says nothing about those
taps, so a check on smaller inputs (:func:`reparam.verify.centre_crops`) counts only when every tap of every
convolution in both runs was read (:class:`TapCoverage`).

One kind of convolution is exempt: one whose weight tensor the fused model shares with the original, called with
the same geometry on an input of the same shape as often in both runs (:func:`shared_tensors`,
:func:`unmatched_shared`).  Its unread taps hold the same numbers in both models and meet the same padding: no
difference can hide there.  ConvNeXt's 7x7 depthwise convolutions, which no rewrite touches, otherwise ask for a
crop of 128 pixels (4x4 maps at stride 32) where the smallest crop, 64, serves the rewritten ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from .match import computes_as_conv, node_shape
from .snapshot import FrozenNode, GraphSnapshot

aten = torch.ops.aten


def taps_read(n: int, k: int, stride: int, padding: int, dilation: int, out: int) -> list[bool]:
    """For each of the ``k`` taps on one side: does some output position read an input pixel with it?

    ``n`` input pixels, ``out`` output pixels.  Tap ``t`` reads ``o * stride + t * dilation - padding`` at output
    ``o``; positions grow with ``o``, so the first ``o`` that reaches pixel 0 decides.  For a transposed convolution
    pass the sides swapped (``n`` its output, ``out`` its input): input ``i`` writes to ``i * stride + t * dilation -
    padding``, the same progression.
    """
    read = []
    for t in range(k):
        first = max(0, -((t * dilation - padding) // stride))  # the smallest o with o * stride + t * d - p >= 0
        read.append(first <= out - 1 and first * stride + t * dilation - padding <= n - 1)
    return read


def all_taps_read(
    x_shape: Sequence[int], w_shape: Sequence[int], y_shape: Sequence[int], stride, padding, dilation, transposed: bool
) -> bool:
    """Does a convolution of an input of ``x_shape`` by a kernel of ``w_shape`` (output ``y_shape``) read every tap?"""
    spatial = len(w_shape) - 2
    for axis in range(spatial):
        n, k, out = x_shape[2 + axis], w_shape[2 + axis], y_shape[2 + axis]
        s, p, d = stride[axis], padding[axis], dilation[axis]
        if not all(taps_read(out, k, s, p, d, n) if transposed else taps_read(n, k, s, p, d, out)):
            return False
    return True


def tensor_key(t: torch.Tensor) -> tuple | None:
    """What identifies ``t``'s numbers while it is alive: its storage's address, offset, shape, strides and dtype
    (None for an empty tensor, which has no taps and may share an address)."""
    if t.numel() == 0:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def shared_tensors(fused: nn.Module, original: nn.Module) -> frozenset:
    """The :func:`tensor_key` of every parameter and buffer ``fused`` shares with ``original`` (the same tensor, not
    an equal one): the weights no rewrite touched."""

    def keys(module: nn.Module) -> set:
        tensors = [*module.parameters(), *module.buffers()]
        return {tensor_key(t) for t in tensors} - {None}

    return frozenset(keys(fused) & keys(original))


class TapsUnread(Exception):
    """A convolution left a kernel tap unread (:class:`TapCoverage` with ``stop``): the run cannot vouch for it."""


class TapCoverage(TorchDispatchMode):
    """Inside this mode, every convolution is run as usual and ``unread`` collects those some kernel tap of which
    read no input pixel (as ``"k x k kernel on a h x w input"``).  With ``stop``, the first such one also raises
    :class:`TapsUnread`: a run whose result cannot count is not run to its end.

    A convolution whose weight is one of ``shared`` (:func:`shared_tensors`) is not counted unread here: its calls
    are tallied in ``shared_calls`` (by :func:`convolution_call`) and those with unread taps in ``shared_unread``,
    for :func:`unmatched_shared` to compare with the other model's run."""

    def __init__(self, stop: bool = False, shared: frozenset = frozenset()):
        super().__init__()
        self.unread: list[str] = []
        self.stop = stop
        self.shared = shared
        self.shared_calls: Counter = Counter()
        self.shared_unread: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is aten.convolution.default and len(args) >= 7:
            x, w, _, stride, padding, dilation, transposed = args[:7]
            read = all_taps_read(x.shape, w.shape, out.shape, stride, padding, dilation, transposed)
            shared = bool(self.shared) and tensor_key(w) in self.shared
            if shared:
                call = convolution_call(args)
                self.shared_calls[call] += 1
                if not read:
                    self.shared_unread[call] = _unread_text(x, w)
            elif not read:
                self.unread.append(_unread_text(x, w))
                if self.stop:
                    raise TapsUnread(self.unread[-1])
        return out


def convolution_call(args: Sequence) -> tuple:
    """An ``aten.convolution`` call as a key: its weight's :func:`tensor_key`, its input's shape and every geometry
    argument (stride, padding, dilation, transposed, output padding, groups)."""
    x, w, *geometry = args[:9]
    del geometry[0]  # the bias: a wrong one shows on every pixel, whatever taps are read
    return (tensor_key(w), tuple(x.shape), *(tuple(g) if isinstance(g, (list, tuple)) else g for g in geometry))


def unmatched_shared(first: TapCoverage, second: TapCoverage) -> list[str]:
    """The convolutions with a shared weight that left taps unread in either run and were not called as often, with
    the same weight, geometry and input shape, in the other: the ones their exemption does not cover."""
    unread = {**first.shared_unread, **second.shared_unread}
    return [text for call, text in unread.items() if first.shared_calls[call] != second.shared_calls[call]]


def _unread_text(x: torch.Tensor, w: torch.Tensor) -> str:
    return f"{'x'.join(map(str, w.shape[2:]))} kernel on a {'x'.join(map(str, x.shape[2:]))} input"


def least_side(k: int, stride: int, padding: int, dilation: int) -> int | None:
    """The smallest input side on which a convolution (not transposed) reads every one of its ``k`` taps; None
    when none up to ``64 * k`` does (taps that only ever read padding)."""
    for n in range(1, 64 * k + 1):
        out = (n + 2 * padding - dilation * (k - 1) - 1) // stride + 1
        if out > 0 and all(taps_read(n, k, stride, padding, dilation, out)):
            return n
    return None


def least_fraction(
    graphs: Iterable[tuple[fx.Graph | GraphSnapshot, dict]],
    convolutions: Iterable[tuple] = (),
    shared: frozenset = frozenset(),
) -> float | None:
    """The smallest fraction of the recorded input sides at which every convolution of ``graphs`` (each a graph
    with recorded shapes and its ``target -> module`` map) and of ``convolutions`` (the geometry a shape run saw:
    :attr:`reparam.shape_run.StandIns.convolutions`, those inside modules called as they are included) still reads
    every tap, taking each map to shrink in proportion to the input (so a crop chosen from it must still be checked:
    :class:`TapCoverage`); None when some convolution's needs are unknown (no recorded shape, a transposed one, taps
    never read).  Convolutions whose weight is one of ``shared`` (:func:`shared_tensors`) need nothing: the runs'
    :class:`TapCoverage` holds them to the same calls in both models instead."""
    worst = 0.0
    for geometry in (*_graph_convolutions(graphs), *convolutions):
        need = None if geometry is None else _need(geometry, shared)
        if need is None:
            return None
        worst = max(worst, need)
    return worst


def _graph_convolutions(graphs: Iterable[tuple[fx.Graph | GraphSnapshot, dict]]) -> Iterable[tuple | None]:
    """The geometry of each convolution module ``graphs`` call, as :attr:`reparam.shape_run.StandIns.convolutions`
    records it (None where it is unknown: no recorded input shape, or padding given as a string)."""
    for graph, modules in graphs:
        for node in graph.nodes:
            m = modules.get(node.target) if node.op == "call_module" else None
            if not computes_as_conv(m):
                continue
            arg = node.args[0] if node.args else None
            shape = node_shape(arg) if isinstance(arg, (fx.Node, FrozenNode)) else None
            if shape is None or isinstance(m.padding, str):
                yield None
            else:
                yield shape, tuple(m.weight.shape), m.stride, m.padding, m.dilation, False, tensor_key(m.weight)


def reads_every_tap(geometry: tuple, shared: frozenset = frozenset()) -> bool | None:
    """Does a convolution of ``geometry`` (as :attr:`reparam.shape_run.StandIns.convolutions` records it) read every
    kernel tap on its input, or need not (its weight is one of ``shared``)?  None when that is not known here (a
    transposed one, an unbatched input)."""
    need = _need(geometry, shared)
    return None if need is None else need <= 1


def _need(geometry: tuple, shared: frozenset) -> float | None:
    """:func:`_needed_fraction` of a recorded ``geometry``: 0 when its weight is one of ``shared`` (no tap of it needs
    reading), None for a transposed convolution (not known here)."""
    x_shape, w_shape, stride, padding, dilation, transposed, weight = geometry
    if weight in shared:
        return 0.0
    return None if transposed else _needed_fraction(x_shape, w_shape, stride, padding, dilation)


def _needed_fraction(x_shape, w_shape, stride, padding, dilation) -> float | None:
    """The fraction of its input's sides at which a convolution (not transposed, of any rank) still reads every tap
    (0 for a one-tap kernel, read on any map); None for an unbatched input or taps never read.  An axis that does not
    shrink with the image (ECA's 1-d convolution along the channels) only needs less than this."""
    if len(x_shape) != len(w_shape) or len(w_shape) < 3:
        return None
    worst = 0.0
    for axis in range(len(w_shape) - 2):
        least = least_side(w_shape[2 + axis], stride[axis], padding[axis], dilation[axis])
        if least is None:
            return None
        if least > 1:
            worst = max(worst, least / x_shape[2 + axis])
    return worst
