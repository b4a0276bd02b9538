"""In-place writes into a tensor the graph has just created, read as what they compute.

``t[index] = v`` (``operator.setitem``), ``t[index].copy_(v)``, ``t[index].fill_(c)`` and
``t[index].zero_()`` (``index`` omitted: all of ``t``) update ``t`` in place.  When ``t`` is
*private*, i.e. created by a pad / clone / arithmetic op of this graph, and every other reader of ``t`` runs after the
last write, nothing can observe the difference between updating ``t`` and building a new tensor
``t' = write(t, box, v)``: :func:`private_writes` proves that and lists the writes as boxes (the
functional reading, what ``torch.export`` would spell ``slice_scatter``).  Rules then replace the
writes by plain ops when they compute one:

- pad_border:    ``F.pad(A(x))`` whose whole border is overwritten with the per-channel constant
                 ``A(0)``, ``A`` a pointwise affine op (BatchNorm, channel affine, 1x1 conv)
                 -> ``A(F.pad(x))``.  ``A`` acts on each position alone, so on the border it maps the
                 zero padding to ``A(0)``; inside it is ``A(x)`` either way.  The official DBB's
                 ``BNAndPadLayer`` (BN, pad, border := the BN's shift = BN(0)) is this rule.
- redundant:     writes that put the pad's own fill value into its border -> the pad alone.

Constants are evaluated from parameter-only subgraphs (the pipeline runs on a float64 copy).
Anything else stays as it is, with the reason in the report (the in-place code is cheaper than a
functional copy, and :mod:`.mutation` keeps the passes from reordering reads around it).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import affine as A
from ..lift import NOT_CONSTANT, Constants, Lifter, NotAffine, Op, OpKind, Unary, pad_pairs
from ..match import ADD_FUNCTIONS, CONCAT_FUNCTIONS, MUL_FUNCTIONS, arg, called_module, node_shape, shape_meta
from ..proofs import no_origin
from ..report import Report, Rewrite
from . import PassResult
from .cleanup import regenerate
from .mutation import eliminate_dead_code, updated_storage
from .naming import where

# float64 rounding of two spellings of one constant (BN(0) as ``bias - mean * w / sqrt(var + eps)``
# vs the algebra's ``bias - mean * (rsqrt(var + eps) * w)``) differs by a few ulps of its terms
ROUNDING = 1e-12
MAX_BORDER_MASK = 1 << 24  # spatial positions checked for coverage

_PAD_FUNCTIONS = {F.pad, torch._C._nn.pad}
_FRESH_FUNCTIONS = (
    _PAD_FUNCTIONS
    | ADD_FUNCTIONS
    | MUL_FUNCTIONS
    | CONCAT_FUNCTIONS
    | {torch.clone, operator.sub, operator.truediv, operator.neg, torch.sub, torch.div}
)
_FRESH_METHODS = {"clone", "add", "sub", "mul", "div", "neg"}
_WRITE_METHODS = {"copy_", "fill_", "zero_"}


class Decline(Exception):
    """The writes are left in place; the message says why (one sentence)."""


@dataclass(frozen=True)
class Write:
    """One in-place write into ``box`` (per axis ``(start, stop)``, step 1) of the written tensor."""

    box: tuple[tuple[int, int], ...]
    value: object  # an fx.Node or a number
    nodes: tuple[fx.Node, ...]  # the write and the view it writes through, erased when the write is read functionally


def _creates_tensor(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``node``'s result is new storage that nothing else holds (a pad, clone or arithmetic result)."""
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    if node.op == "call_module":
        return isinstance(called_module(node, modules), nn.modules.padding._ConstantPadNd)
    return False


def _index_of(user: fx.Node, t: fx.Node) -> tuple | None:
    """(index, value, nodes) when ``user`` writes into ``t``; None when it only reads ``t``."""
    if user.op == "call_function" and user.target is operator.setitem and user.args[0] is t:
        return user.args[1], user.args[2], (user,)
    if user.op == "call_method" and user.target in _WRITE_METHODS and user.args[0] is t and not user.users:
        return Ellipsis, _written_value(user), (user,)
    if user.op == "call_function" and user.target is operator.getitem and user.args[0] is t and len(user.users) == 1:
        (write,) = user.users
        if write.op == "call_method" and write.target in _WRITE_METHODS and write.args[0] is user and not write.users:
            return user.args[1], _written_value(write), (write, user)
    return None


def _written_value(write: fx.Node):
    if write.target == "zero_":
        return 0.0
    return arg(write, 1, "value", write.kwargs.get("src"))  # fill_(value) / copy_(src)


def _box(index, shape: tuple) -> tuple:
    """Basic slicing (slices and one Ellipsis) of ``shape`` -> per-axis ``(start, stop)``."""
    index = index if isinstance(index, tuple) else (index,)
    if sum(i is Ellipsis for i in index) > 1 or not all(isinstance(i, slice) or i is Ellipsis for i in index):
        raise Decline("the write's index is not basic slicing (slices and ...)")
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1 :]
    if len(index) > len(shape):
        raise Decline("the write's index has more axes than the tensor")
    index = index + (slice(None),) * (len(shape) - len(index))
    box = []
    for s, n in zip(index, shape, strict=True):
        if not all(v is None or isinstance(v, int) for v in (s.start, s.stop, s.step)):
            raise Decline("the write's slice bounds are computed from the input")
        start, stop, step = s.indices(n)
        if step != 1:
            raise Decline("the write's slice has a step")
        box.append((start, max(start, stop)))
    return tuple(box)


def private_writes(t: fx.Node, modules: dict) -> list:
    """The writes into ``t`` as boxes, if ``t`` is private; raises :class:`Decline` otherwise.

    Precondition checked: ``t`` is created by this graph (:func:`_creates_tensor`), each write is
    basic slicing of a known shape, and every other user of ``t`` (a reader, or a view) runs after
    the last write, so no alias observes ``t`` before it is complete.  A written value that reads
    ``t`` is such a user.
    """
    if not _creates_tensor(t, modules):
        raise Decline(f"{t.name} is written in place but may share storage with a tensor read elsewhere")
    shape = node_shape(t)
    if shape is None:
        raise Decline(f"{t.name} is written in place and its shape is unknown")
    order = {node: i for i, node in enumerate(t.graph.nodes)}
    writes, readers = [], []
    for user in t.users:
        found = _index_of(user, t)
        if found is None:
            readers.append(user)
        else:
            index, value, nodes = found
            writes.append((order[nodes[0]], Write(_box(index, shape), value, nodes)))
    if not writes:
        raise Decline(f"{t.name} is written through a view of a view")
    last = max(at for at, _ in writes)
    early = sorted((r for r in readers if order[r] < last), key=order.__getitem__)
    if early:
        raise Decline(f"{early[0].name} reads {t.name} before it is written in place")
    return [w for _, w in sorted(writes, key=lambda pair: pair[0])]


# --------------------------------------------------------------------------------------------
# rules


@dataclass(frozen=True)
class _Pad:
    source: fx.Node
    lo: tuple[int, ...]
    hi: tuple[int, ...]
    fill: float


def _as_pad(node: fx.Node, modules: dict[str, nn.Module], const: Constants) -> _Pad | None:
    """``node`` as a constant pad of a tensor with non-negative widths; None if it is none."""
    m = called_module(node, modules)
    if isinstance(m, nn.modules.padding._ConstantPadNd):
        pads, mode, fill = m.padding, "constant", m.value
    elif node.op == "call_function" and node.target in _PAD_FUNCTIONS:
        pads, mode, fill = (
            const(arg(node, i, k, d)) for i, k, d in ((1, "pad", None), (2, "mode", "constant"), (3, "value", None))
        )
    else:
        return None
    source, shape = arg(node, 0, "input"), node_shape(node)
    if (
        not isinstance(source, fx.Node)
        or NOT_CONSTANT in (pads, mode, fill)
        or mode != "constant"
        or shape is None
        or len(shape) < 3
    ):
        return None
    try:
        lo, hi = pad_pairs(pads, len(shape) - 2)
    except NotAffine:  # it pads the channel or batch axis: not a border of the spatial axes
        return None
    if min(lo + hi) < 0 or not any(lo + hi):
        return None
    return _Pad(source, lo, hi, float(fill or 0.0))


def _per_channel(value, const: Constants, shape: tuple) -> torch.Tensor:
    """A written value broadcast over the box, as one float64 number per channel (else Decline)."""
    v = const(value)
    if v is NOT_CONSTANT:
        raise Decline("the written value is computed from the input")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return torch.full((shape[1],), float(v), dtype=torch.float64)
    if not isinstance(v, torch.Tensor) or v.dim() > len(shape):
        raise Decline("the written value is not a number or tensor of the box's rank")
    full = (1,) * (len(shape) - v.dim()) + tuple(v.shape)
    if any(s != 1 for i, s in enumerate(full) if i != 1) or full[1] not in (1, shape[1]):
        raise Decline("the written value is not constant per channel")
    return v.detach().to(torch.float64).reshape(-1).expand(shape[1]).clone()


def _border_values(pad: _Pad, writes: list, shape: tuple, const: Constants) -> list:
    """Per-channel value of each write; each write spans every sample and channel and stays in the border."""
    interior = [(lo, n - hi) for lo, hi, n in zip(pad.lo, pad.hi, shape[2:], strict=True)]
    values = []
    for w in writes:
        if w.box[0] != (0, shape[0]) or w.box[1] != (0, shape[1]):
            raise Decline("a border write does not span every sample and channel")
        if all(max(a, lo) < min(b, hi) for (a, b), (lo, hi) in zip(w.box[2:], interior, strict=True)):
            raise Decline("a write reaches into the padded data, not only its border")
        values.append(_per_channel(w.value, const, shape))
    return values


def _covers_border(pad: _Pad, writes: list, shape: tuple) -> bool:
    spatial = shape[2:]
    if math.prod(spatial) > MAX_BORDER_MASK:
        raise Decline("the padded tensor is too large to check the border writes")
    written = torch.zeros(spatial, dtype=torch.bool)
    for w in writes:
        written[tuple(slice(a, b) for a, b in w.box[2:])] = True
    written[tuple(slice(lo, n - hi) for lo, hi, n in zip(pad.lo, pad.hi, spatial, strict=True))] = True
    return bool(written.all())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float64 rounding (relative to the larger vector's largest entry)."""
    scale = max(float(a.abs().max()), float(b.abs().max()))
    return bool(((a - b).abs() <= ROUNDING * scale).all())


def _at_zero(op: Unary, channels: int, nd: int) -> torch.Tensor:
    """``A(0)`` per channel for a pointwise channels-first ``A`` (Decline if ``A`` is not one)."""
    if op.affine is None:  # scalar scale / shift / identity
        return torch.full((channels,), 0.0 if op.kind is OpKind.IDENTITY else float(op.shift), dtype=torch.float64)
    a = op.affine
    if a.layout.nd != nd or not a.is_pointwise or a.out_channels != channels:
        raise Decline(f"the padded tensor comes from a {a.describe()}, which is not pointwise")
    return torch.zeros(channels, dtype=torch.float64) if a.bias is None else a.bias.reshape(-1)


def _pad_border(gm: fx.GraphModule, t: fx.Node, pad: _Pad, writes: list, lifter: Lifter, updated: set) -> str:
    """Apply pad_border or redundant to ``t = pad(y)`` and its writes; returns what it did.

    ``A(F.pad(x))`` is inserted right after ``y = A(x)``, so it reads ``x`` when ``y`` did; ``y`` must
    not be updated in place (``updated``: such storages), or ``t``'s interior is not ``A(x)``."""
    shape = node_shape(t)
    if shape is None:
        raise Decline(f"{t.name} is written in place and its shape is unknown")
    values = _border_values(pad, writes, shape, lifter.const)
    graph = gm.graph
    if all(bool((v == pad.fill).all()) for v in values):
        _erase(graph, writes)
        return "redundant writes of the pad value"
    if not _covers_border(pad, writes, shape):
        raise Decline("the writes cover only part of the border (the rest keeps the pad value)")
    if not all(torch.equal(v, values[0]) for v in values[1:]):
        raise Decline("the border is written with different values")
    y = pad.source
    if y in updated:
        raise Decline(f"{y.name}, the padded tensor, is updated in place")
    try:
        op: Op = lifter.lift(y)
    except (NotAffine, A.Refusal) as err:
        raise Decline(f"the padded tensor is not an affine op's output ({err})") from None
    if not isinstance(op, Unary):
        raise Decline("the padded tensor is not a one-input affine op's output")
    at_zero = _at_zero(op, shape[1], len(shape) - 2)
    if not _close(values[0], at_zero):
        worst = float((values[0] - at_zero).abs().max())
        raise Decline(f"the border value differs from what {y.name} gives at zero input (max difference {worst:.3g})")
    x, x_shape = op.source, node_shape(op.source)
    if x_shape is None or len(x_shape) != len(shape):
        raise Decline(f"the shape of {x.name}, what {y.name} reads, is unknown")
    pads = list(A.torch_pads(pad.lo, pad.hi))
    with graph.inserting_before(y.next):  # in order, right after y
        padded = graph.call_function(F.pad, (x, pads), {"mode": "constant", "value": 0.0})
        moved = graph.node_copy(y, lambda n: padded if n is x else n)
    padded_size = tuple(n + lo + hi for n, lo, hi in zip(x_shape[2:], pad.lo, pad.hi, strict=True))
    padded.meta["tensor_meta"] = shape_meta(x, x_shape[:2] + padded_size)
    padded.meta["nn_module_stack"] = y.meta.get("nn_module_stack", {})
    moved.meta["tensor_meta"] = t.meta["tensor_meta"]
    no_origin(moved)  # neither y's value (it is padded) nor t's at the time t ran (before the writes)
    _erase(graph, writes)
    t.replace_all_uses_with(moved)
    graph.erase_node(t)
    return f"{y.name} after a zero pad"


def _erase(graph: fx.Graph, writes: list) -> None:
    for w in writes:
        for node in w.nodes:
            graph.erase_node(node)


# --------------------------------------------------------------------------------------------
# the pass


def _written_tensors(gm: fx.GraphModule) -> list:
    """Tensors written in place through setitem / copy_ / fill_ / zero_, in graph order (a view
    ``t[index]`` written through counts as a write into ``t``, not as a tensor of its own)."""
    out = []
    for node in gm.graph.nodes:
        through_view = (
            node.op == "call_function"
            and node.target is operator.getitem
            and isinstance(node.args[0], fx.Node)
            and _index_of(node, node.args[0]) is not None
        )
        if not through_view and any(_index_of(u, node) is not None for u in node.users):
            out.append(node)
    return out


def follow_inplace_writes(gm: fx.GraphModule, report: Report) -> PassResult:
    """Rewrite in-place writes into private tensors where a rule proves what they compute; ``changed``: how many
    (the new nodes carry their shapes).

    before: ``y = bn(x); t = F.pad(y, [p] * 4); t[:, :, :p, :] = c; ... (4 sides); avg_pool(t)``
    after:  ``avg_pool(bn(F.pad(x, [p] * 4)))`` when ``c == bn(0)`` (see the module docstring).
    Every write left in place is reported with the reason.  Needs shapes (``meta['tensor_meta']``).
    """
    modules = dict(gm.named_modules())
    lifter = Lifter(gm, Constants(gm))
    updated = updated_storage(gm)
    done = 0
    for t in _written_tensors(gm):
        site = where(t)
        try:
            writes = private_writes(t, modules)
            pad = _as_pad(t, modules, lifter.const)
            if pad is None:
                raise Decline(f"{t.name} is written in place and no rule reads such writes (only pad borders)")
            what = _pad_border(gm, t, pad, writes, lifter, updated)
        except Decline as reason:
            report.refuse(site, f"in-place write kept: {reason}")
            continue
        report.rewrites.append(Rewrite(site, f"pad + {len(writes)} border writes", what, ("inplace_pad",)))
        done += 1
    if done:
        eliminate_dead_code(gm)
        gm.graph.lint()
        regenerate(gm)
    return PassResult(done)
