"""Cross-layer equalization (Nagel et al. 2019, *Data-Free Quantization through Weight Equalization and Bias
Correction*): an exact re-parameterization that balances per-channel weight ranges before int8 quantization.

before -> after::

    conv1 -> h -> conv2          conv1' -> h -> conv2'
    W1[c], b1[c]          ->     W1[c] / s_c, b1[c] / s_c          (output channel c of the producer)
    W2[:, c]                     W2[:, c] * s_c                    (input channel c of every consumer)
    s_c = sqrt(r1_c / r2_c)      so that both ranges become sqrt(r1_c · r2_c)

``r1_c = max |W1[c, ...]|``, ``r2_c = max |W2[:, c, ...]|`` (over every consumer), ``s_c = 1`` where either is
0.  This is the paper's ``s = (1 / r2) · sqrt(r1 · r2)``.

Precondition (:func:`find_links`, refused with a reason otherwise): every path from the producer's output to a
reader passes only through ops ``h`` with ``h(x / s) = h(x) / s`` for per-channel ``s > 0`` — ReLU, LeakyReLU
(positively homogeneous), max / average / adaptive pooling, mean over spatial axes, identity, dropout (eval),
flatten, channel concat, channel split (``torch.split`` / ``chunk``) — and ends in a conv or linear layer that
reads it as its input (grouped and depthwise convs included: a depthwise conv's input channel c is its channel
c, and as a producer it passes scales on to the next layer in the following round).

Residual adds: ``a + b`` scales like its operands only if both carry the same ``1 / s``.  So producers whose
outputs meet in adds (of whole channel sets) form one group with one scale vector — ``r1`` the maximum over the
group's producers, ``r2`` over every reader of any tensor in the group — and every producer and reader is
rescaled (a ResNet stage's residual stream is one group).  An add whose other operand cannot be rescaled (the
model input, a constant, a tensor with another channel layout) refuses the whole group.

A tensor also read by anything else (a model output, ReLU6 / hardswish / SiLU / GELU, a BatchNorm left unfolded,
a module called twice) is left alone, and the report says why.  Groups are equalized round after round until no
scale moves by more than :data:`CONVERGED`.

:func:`equalize_graph` rewrites the weights of one ``fx.GraphModule`` in place (its layers must not be shared
with another model); :func:`reparam.equalization.equalize` (``reparam.equalize``) is the public entry point that
copies, verifies in float64 and reports per-layer int8 SNR before -> after.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..match import (
    ADD_FUNCTIONS_WITH_INPLACE,
    CONCAT_FUNCTIONS,
    POOL_MODULES,
    arg,
    called_module,
    node_name,
    node_shape,
)

__all__ = ["CONVERGED", "MAX_ROUNDS", "Span", "Use", "Link", "find_links", "equalize_graph", "balance"]

#: Equalization stops when every scale of a round is within this relative distance of 1.
CONVERGED = 1e-2
#: At most this many rounds over all producer -> consumer links.
MAX_ROUNDS = 200

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_HOMOGENEOUS_MODULES = (
    *POOL_MODULES,
    nn.ReLU,
    nn.LeakyReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Flatten,
)
_HOMOGENEOUS_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.leaky_relu,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.dropout,
    torch.flatten,
    torch.mean,
}
_HOMOGENEOUS_METHODS = {"relu", "relu_", "flatten", "mean", "contiguous"}
_SPLITS = {torch.split, torch.chunk, torch.tensor_split}
Layer = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear  # what equalization rescales


@dataclass(frozen=True)
class Span:
    """Where producer channels ``lo <= c < hi`` sit in a tensor of ``total`` channels: at channel ``offset + c``
    (a concat shifts ``offset``; a channel split narrows ``lo, hi``; ``flattened``: after ``flatten(x, 1)``)."""

    offset: int
    total: int
    lo: int
    hi: int
    flattened: bool = False


@dataclass
class Use:
    """A layer reading producer channel ``c`` (``span.lo <= c < span.hi``) at its input channel ``span.offset + c``
    (features ``(offset + c) * repeat ...`` of a linear layer after a flatten; ``repeat`` from the layer's size)."""

    node: fx.Node
    module: Layer
    span: Span


@dataclass
class Link:
    """Producer layers sharing one scale vector and every layer that reads their outputs through scale-equivariant
    ops.  One producer, unless residual adds join several (``add(conv_a(x), conv_b(y))``, a ResNet stage's
    stream): then every producer and every reader of the sum is rescaled consistently."""

    producers: list[tuple[fx.Node, Layer]]
    uses: list[Use] = field(default_factory=list)

    @property
    def producer(self) -> fx.Node:
        """The first producer (the one the walk started from)."""
        return self.producers[0][0]

    @property
    def module(self) -> Layer:
        return self.producers[0][1]


# ------------------------------------------------------------------------------------------ the graph walk


class _Refused(Exception):
    """A reader of the producer's output is not scale-equivariant (the message says which and why).

    ``quiet``: nothing but the model output reads it (the last layer): nothing to equalize, nothing to report."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def _is_layer(module: nn.Module | None) -> TypeGuard[Layer]:
    return isinstance(module, _LAYERS) and type(module).forward in (
        nn.Conv1d.forward,
        nn.Conv2d.forward,
        nn.Conv3d.forward,
        nn.Linear.forward,
    )


def _out_channels(module: Layer) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _reduces_channels(dims: Any) -> bool:
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return any(not isinstance(d, int) or d in (0, 1) or d < -2 for d in dims)


def _homogeneous(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """None when ``node`` (reading the tracked tensor as its first argument) satisfies ``h(x/s) = h(x)/s`` for
    per-channel ``s > 0`` and keeps channels on axis 1; otherwise why not."""
    module = called_module(node, gm)
    if module is not None:
        if isinstance(module, nn.Flatten):
            return None if module.start_dim == 1 else f"flattens from axis {module.start_dim}"
        if type(module) in _HOMOGENEOUS_MODULES:  # exact types: a subclass may override forward
            return None
        return f"{type(module).__name__} is not positively homogeneous per channel (h(x/s) != h(x)/s)"
    if (node.op == "call_function" and node.target in _HOMOGENEOUS_FUNCTIONS) or (
        node.op == "call_method" and node.target in _HOMOGENEOUS_METHODS
    ):
        if node.target in (torch.flatten, "flatten"):
            start = arg(node, 1, "start_dim", 0)
            return None if start == 1 else f"flattens from axis {start}"
        if node.target in (torch.mean, "mean"):
            dims = arg(node, 1, "dim")
            return f"mean over {dims} mixes channels" if dims is None or _reduces_channels(dims) else None
        return None
    if node.op == "output":
        return "it is a model output"
    what = getattr(node.target, "__name__", str(node.target))
    if what in ("add", "iadd", "sub", "add_"):
        return f"{what} (a residual add / sum: its other operand is not rescaled)"
    return f"{what} is not known to be scale-equivariant"


def _channels(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """Channels (axis 1) of ``node``'s value, from layer sizes through channel-preserving ops; None if unknown."""
    module = called_module(node, gm)
    if _is_layer(module):
        return _out_channels(module)
    if node.op == "call_function" and node.target in CONCAT_FUNCTIONS:
        parts = [_channels(gm, n) for n in _cat_inputs(node)]
        known = [p for p in parts if p is not None]
        return None if len(known) != len(parts) or _cat_dim(node) != 1 else sum(known)
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and isinstance(node.args[1], int):
        split = node.args[0]
        total = _channels(gm, split.args[0]) if split.args and isinstance(split.args[0], fx.Node) else None
        bounds = (
            _split_bounds(split, total)
            if total is not None and (split.target in _SPLITS or split.target in ("split", "chunk"))
            else None
        )
        if bounds is not None and node.args[1] < len(bounds):
            start, end = bounds[node.args[1]]
            return end - start
    elif node.args and isinstance(node.args[0], fx.Node) and _homogeneous(gm, node) is None:
        return _channels(gm, node.args[0])
    shape = node_shape(node)
    return int(shape[1]) if shape is not None and len(shape) > 1 else None


def _cat_dim(node: fx.Node) -> Any:
    return arg(node, 1, "dim", 0)


def _cat_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensors a concatenation reads (its nodes; a constant among them is not followed)."""
    tensors = arg(node, 0, "tensors")
    return [t for t in tensors if isinstance(t, fx.Node)] if isinstance(tensors, (list, tuple)) else []


def _reads_metadata_only(node: fx.Node) -> bool:
    """``x.size()``, ``x.dim()``, ``x.shape``: readers that a per-channel scale cannot change."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "dtype", "device")


def _split_bounds(node: fx.Node, total: int) -> list[tuple[int, int]] | None:
    """The channel ranges of the pieces of ``torch.split`` / ``chunk`` (``x.split`` ...) along axis 1, or None."""
    dim = arg(node, 2, "dim", 0)
    size = arg(node, 1, "split_size_or_sections", node.kwargs.get("split_size", node.kwargs.get("chunks")))
    if dim != 1 or size is None:
        return None
    if node.target in (torch.chunk, "chunk"):
        if not isinstance(size, int):
            return None
        size = -(-total // size)
    if node.target in (torch.tensor_split, "tensor_split"):
        return None
    sizes = [size] * (-(-total // size)) if isinstance(size, int) else list(size)
    if not all(isinstance(n, int) for n in sizes):
        return None
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(a, min(a + n, total)) for a, n in zip(starts, sizes, strict=True)]


@dataclass
class _Walk:
    """What one walk from a producer found: the producers sharing its scales, their readers, what was visited."""

    gm: fx.GraphModule
    owners: dict[int, int]  # id(module) -> how many nodes call it
    channels: int
    producers: list[tuple[fx.Node, Layer]] = field(default_factory=list)
    uses: list[Use] = field(default_factory=list)
    followed: set[tuple[fx.Node, Span]] = field(default_factory=set)  # (node, span) pairs whose readers are collected
    pending: list[fx.Node] = field(default_factory=list)  # residual-add operands still to trace back to producers

    @property
    def whole(self) -> Span:
        return Span(0, self.channels, 0, self.channels)


def _is_add(node: fx.Node) -> bool:
    adds = (
        node.op == "call_function"
        and node.target in ADD_FUNCTIONS_WITH_INPLACE
        and "alpha" not in node.kwargs
        and len(node.args) == 2
    )
    adds = adds or (
        node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs
    )
    return adds and all(isinstance(a, fx.Node) for a in node.args)


def _follow_split(walk: _Walk, user: fx.Node, span: Span) -> None:
    """Each piece of a channel split that holds producer channels, followed on with its narrowed span."""
    bounds = _split_bounds(user, span.total) if not span.flattened else None
    if bounds is None:
        raise _Refused(f"{user.name} splits other than along channels (or by sizes not known when tracing)")
    for piece in user.users:
        if not (piece.target is operator.getitem and isinstance(piece.args[1], int)):
            raise _Refused(f"{user.name}'s pieces are read as a whole by {piece.name}")
        start, end = bounds[piece.args[1]]
        lo, hi = max(span.lo, start - span.offset), min(span.hi, end - span.offset)
        if lo < hi:
            _follow(walk, piece, Span(span.offset - start, end - start, lo, hi))


def _follow(walk: _Walk, node: fx.Node, span: Span) -> None:
    """Every reader of ``node`` (producer channels placed as ``span`` says) into ``walk.uses``; a residual add of
    whole, unflattened channels joins its other operand to the walk (``walk.pending``)."""
    if (node, span) in walk.followed:
        return
    walk.followed.add((node, span))
    gm, owners = walk.gm, walk.owners
    for user in node.users:
        module = called_module(user, gm)
        if _reads_metadata_only(user):
            continue
        if _is_layer(module):
            if user.args[0] is not node or len(user.args) + len(user.kwargs) != 1:
                raise _Refused(f"{node_name(user)} reads it other than as its input")
            if owners.get(id(module), 1) != 1:
                raise _Refused(f"{node_name(user)} is called {owners[id(module)]} times (shared weights)")
            walk.uses.append(Use(user, module, span))
        elif user.op == "call_function" and user.target in CONCAT_FUNCTIONS:
            if _cat_dim(user) != 1:
                raise _Refused(f"{user.name} concatenates along axis {_cat_dim(user)}, not channels")
            if span.flattened:
                raise _Refused(f"{user.name} concatenates flattened features")
            inputs = _cat_inputs(user)
            if inputs.count(node) != 1:
                raise _Refused(f"{user.name} reads it twice")
            sizes = [c for c in (_channels(gm, n) for n in inputs) if c is not None]
            if len(sizes) != len(inputs):
                raise _Refused(f"{user.name}: the channel count of an input is unknown")
            before = sum(sizes[: inputs.index(node)])
            _follow(walk, user, Span(span.offset + before, sum(sizes), span.lo, span.hi))
        elif user.target in _SPLITS or (user.op == "call_method" and user.target in ("split", "chunk")):
            _follow_split(walk, user, span)
        elif _is_add(user) and span == walk.whole:
            walk.pending += [a for a in user.args if isinstance(a, fx.Node) and a is not node]
            _follow(walk, user, span)
        else:
            reason = _homogeneous(gm, user)
            if reason is None and user.args[0] is not node:
                reason = f"{user.name} reads it other than as its first argument"
            if reason is not None:
                quiet = user.op == "output" and not walk.uses and len(walk.producers) == 1
                raise _Refused(f"read by {node_name(user)}: {reason}", quiet=quiet)
            is_flatten = isinstance(called_module(user, gm), nn.Flatten) or user.target in (torch.flatten, "flatten")
            _follow(walk, user, Span(span.offset, span.total, span.lo, span.hi, span.flattened or is_flatten))


def _trace_back(walk: _Walk, node: fx.Node) -> None:
    """``node`` (an operand of a residual add in the walk) must carry the walk's channels scaled like the rest:
    it is a producer layer, a residual add, or a positively homogeneous op of such a tensor; all its readers join."""
    if (node, walk.whole) in walk.followed:
        return
    module = called_module(node, walk.gm)
    if _is_layer(module):
        if walk.owners.get(id(module), 1) != 1:
            raise _Refused(f"residual operand {node_name(node)} is called more than once (shared weights)")
        if _out_channels(module) != walk.channels:
            raise _Refused(
                f"residual operand {node_name(node)} has {_out_channels(module)} channels, not {walk.channels}"
            )
        walk.producers.append((node, module))
    elif _is_add(node):
        walk.pending += [a for a in node.args if isinstance(a, fx.Node)]
    elif (
        node.args
        and isinstance(node.args[0], fx.Node)
        and _homogeneous(walk.gm, node) is None
        and not (isinstance(module, nn.Flatten) or node.target in (torch.flatten, "flatten"))
    ):
        walk.pending.append(node.args[0])
    else:
        what = "the model input" if node.op == "placeholder" else node_name(node)
        raise _Refused(f"a residual add's other operand comes from {what}, which cannot be rescaled with it")
    _follow(walk, node, walk.whole)


def _walk(gm: fx.GraphModule, node: fx.Node, module: Layer, owners: dict[int, int]) -> _Walk:
    """Producers joined to ``node`` through residual adds and all their readers (raises :class:`_Refused`)."""
    walk = _Walk(gm, owners, _out_channels(module), producers=[(node, module)])
    _follow(walk, node, walk.whole)
    while walk.pending:
        _trace_back(walk, walk.pending.pop())
    for use in walk.uses:
        _check_size(use)
    return walk


def find_links(gm: fx.GraphModule, refuse: Callable[[str, str], None]) -> list[Link]:
    """Every conv / linear producer of ``gm`` whose output reaches only equalizable consumers (see the module
    docstring), grouped with the producers residual adds join it to; ``refuse(where, reason)`` is called for
    each producer that does not qualify."""
    owners: dict[int, int] = {}
    for node in gm.graph.nodes:
        module = called_module(node, gm)
        if module is not None:
            owners[id(module)] = owners.get(id(module), 0) + 1
    links: list[Link] = []
    claimed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        module = called_module(node, gm)
        if not _is_layer(module) or node in claimed:
            continue
        where = node_name(node)
        if owners[id(module)] != 1:
            refuse(where, "equalization: the layer is called more than once (shared weights)")
            continue
        try:
            walk = _walk(gm, node, module, owners)
        except _Refused as why:
            if why.quiet:
                continue
            refuse(
                where,
                f"equalization refused: its output is {why}"
                if str(why).startswith("read by")
                else f"equalization refused: {why}",
            )
            continue
        claimed.update(n for n, _ in walk.producers)
        if walk.uses:
            links.append(Link(walk.producers, walk.uses))
    return links


def _check_size(use: Use) -> None:
    module = use.module
    total = use.span.total
    if isinstance(module, nn.Linear):
        if module.in_features % total:
            raise _Refused(f"{node_name(use.node)} has {module.in_features} inputs, not a multiple of {total} channels")
    elif use.span.flattened or module.in_channels != total:
        raise _Refused(f"{node_name(use.node)} does not read the {total} channels as its input channels")


# ----------------------------------------------------------------------------------------------- the math


def _producer_range(module: Layer) -> torch.Tensor:
    """r1: ``max |W[c, ...]|`` per output channel."""
    return module.weight.detach().abs().flatten(1).amax(1)


def _input_ranges(use: Use, channels: int) -> torch.Tensor:
    """r2 of one consumer: ``max |W[:, offset + c, ...]|`` per producer channel ``c`` (``channels`` of them; 0
    for the channels this consumer does not read)."""
    w, span = use.module.weight.detach().abs(), use.span
    if isinstance(use.module, nn.Linear):
        per_input = w.amax(0).reshape(span.total, -1).amax(1)
    else:
        groups = use.module.groups
        per_column = w.flatten(2).amax(2)  # (Cout, Cin / groups)
        per_input = per_column.reshape(groups, -1, per_column.shape[1]).amax(1).reshape(-1)
    ranges = torch.zeros(channels, dtype=per_input.dtype, device=per_input.device)
    ranges[span.lo : span.hi] = per_input[span.offset + span.lo : span.offset + span.hi]
    return ranges


def _scale_inputs(use: Use, s: torch.Tensor) -> None:
    """``W[:, offset + c] *= s_c`` (every output of the group that reads input channel ``offset + c``)."""
    w, span = use.module.weight, use.span
    full = torch.ones(span.total, dtype=s.dtype, device=s.device)
    full[span.offset + span.lo : span.offset + span.hi] = s[span.lo : span.hi]
    with torch.no_grad():
        if isinstance(use.module, nn.Linear):
            w.mul_(full.repeat_interleave(w.shape[1] // span.total)[None, :].to(w.dtype))
        else:
            groups = use.module.groups
            shaped = full.reshape(groups, 1, -1, *([1] * (w.ndim - 2)))  # (g, 1, Cin/g, 1...)
            w.view(groups, -1, *w.shape[1:]).mul_(shaped.to(w.dtype))


def _scale_outputs(module: Layer, s: torch.Tensor) -> None:
    """``W[c] /= s_c``, ``b[c] /= s_c``."""
    with torch.no_grad():
        module.weight.div_(s.reshape(-1, *([1] * (module.weight.ndim - 1))).to(module.weight.dtype))
        if module.bias is not None:
            module.bias.div_(s.to(module.bias.dtype))


def balance(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """``s = sqrt(r1 / r2)`` (both ranges become ``sqrt(r1 · r2)``); 1 where either range is 0 or not finite."""
    s = torch.sqrt(r1 / r2)
    return torch.where((r1 > 0) & (r2 > 0) & torch.isfinite(s), s, torch.ones_like(s))


def _step(link: Link) -> float:
    """Equalize one link once; returns ``max_c |s_c - 1|``."""
    r1 = torch.stack([_producer_range(module) for _, module in link.producers]).amax(0)
    r2 = torch.stack([_input_ranges(use, len(r1)) for use in link.uses]).amax(0)
    s = balance(r1.double(), r2.double())
    for _, module in link.producers:
        _scale_outputs(module, s)
    for use in link.uses:
        _scale_inputs(use, s)
    return float((s - 1).abs().max()) if len(s) else 0.0


def equalize_graph(gm: fx.GraphModule, refuse: Callable[[str, str], None]) -> tuple[list[Link], int, float]:
    """Cross-layer equalization of ``gm``'s weights in place, iterated to convergence.

    before -> after: conv/linear producers and their consumers -> the same layers with ``W1[c] / s_c``,
    ``b1[c] / s_c`` and ``W2[:, c] * s_c`` (module docstring).  Precondition: :func:`find_links` (refusals go to
    ``refuse``).  Returns the links equalized, the rounds run and the last round's largest ``|s_c - 1|``
    (below :data:`CONVERGED` unless :data:`MAX_ROUNDS` stopped it).
    """
    links = find_links(gm, refuse)
    rounds, change = 0, 0.0
    while links and rounds < MAX_ROUNDS:
        rounds += 1
        change = max([_step(link) for link in links])
        if change < CONVERGED:
            break
    return links, rounds, change
