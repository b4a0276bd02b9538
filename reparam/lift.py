"""fx node -> algebra: what a node computes, as an affine op on its tensor inputs (or why not).

Matched on what the graph does, never on block class names: ``call_module`` Conv/BN/Linear/AvgPool/
Identity/Dropout/ZeroPad, their functional forms (``F.conv*``, ``F.batch_norm``, ``F.linear``,
``F.avg_pool*``, ``F.pad``), ``+ - * /`` with constants or tensors, and ``torch.cat``.
Constants are whatever depends only on parameters and buffers (weights computed from parameters,
e.g. weight standardisation, are folded too).

:meth:`Lifter.lift` raises one of two exceptions, and nothing else:

- :class:`NotAffine`: the node is not an affine op of its tensor inputs (a ReLU, a product of two tensors, a
  positional embedding added along a spatial axis ...).  Nothing to merge, nothing to report.
- :class:`reparam.affine.Refusal`: the node is an op the user expects to fold (a BatchNorm, a pool, a pad, a
  conv), but not here (it uses batch statistics, a border the kernel does not cover ...): the passes report the
  reason.  :class:`CannotLift` is both: such an op that cannot even be lifted (its input rank is unknown, a
  ceil-mode window ...), so a caller that only asks "is it affine?" sees a NotAffine.

The matcher vocabulary the passes share (:mod:`reparam.match`: ``is_conv``, ``conv_affine``, ``arg``,
``node_shape``, the op sets ...) is re-exported here.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeGuard

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import affine as A
from .match import (
    ADD_FUNCTIONS,
    ADD_FUNCTIONS_WITH_INPLACE,
    CONCAT_FUNCTIONS,
    MUL_FUNCTIONS,
    arg,
    as_float64,
    attr_path,
    called_conv,
    computes_as_conv,
    called_module,
    conv_affine,
    has_attr_path,
    is_conv,
    is_transposed_conv,
    node_dtype,
    node_name,
    node_rank,
    node_shape,
    shape_meta,
)

__all__ = [
    "NOT_CONSTANT",
    "OpKind",
    "Unary",
    "Sum",
    "Concat",
    "Op",
    "op_sources",
    "NotAffine",
    "CannotLift",
    "Constants",
    "Lifter",
    "pad_pairs",
    "is_reshape",
    "reshape_source",
    # the matcher vocabulary, from reparam.match
    "ADD_FUNCTIONS",
    "ADD_FUNCTIONS_WITH_INPLACE",
    "MUL_FUNCTIONS",
    "CONCAT_FUNCTIONS",
    "is_conv",
    "is_transposed_conv",
    "called_module",
    "called_conv",
    "computes_as_conv",
    "as_float64",
    "conv_affine",
    "arg",
    "node_name",
    "node_shape",
    "node_rank",
    "node_dtype",
    "shape_meta",
    "attr_path",
    "has_attr_path",
]

NOT_CONSTANT = object()


class OpKind(str, Enum):
    """What a lifted one-input op is; its value is the word the report's "before" column uses."""

    CONV = "conv"
    LINEAR = "linear"
    BATCHNORM = "batchnorm"
    AVGPOOL = "avgpool"
    PAD = "pad"
    SCALE = "scale"
    SHIFT = "shift"
    IDENTITY = "identity"

    def __str__(self) -> str:
        return self.value


@dataclass
class Unary:
    """``node = op(source)`` where op is an Affine, or a scalar ``scale * x + shift`` (layout-free)."""

    source: fx.Node
    kind: OpKind
    affine: A.Affine | None = None
    scale: float = 1.0
    shift: float = 0.0


@dataclass
class Sum:
    """``node = sum(coeff * term)`` over tensor terms."""

    terms: list[tuple[fx.Node, float]]


@dataclass
class Concat:
    """``node = cat(sources, channel axis)``."""

    sources: list[fx.Node]
    dim: int


Op = Unary | Sum | Concat


def op_sources(op: Op) -> list[fx.Node]:
    """The tensor inputs of a lifted op, in order."""
    if isinstance(op, Unary):
        return [op.source]
    return [t for t, _ in op.terms] if isinstance(op, Sum) else list(op.sources)


class NotAffine(Exception):
    """The node is not an affine op of its inputs (the message says why, when it is interesting)."""


class CannotLift(NotAffine, A.Refusal):
    """An op one expects to fold (a BatchNorm, a pool, a pad, a conv) that cannot be lifted here (its input rank is
    unknown, a ceil-mode window ...): not lifted, like any :class:`NotAffine`, and a refusal the passes report."""


_RANDOM = (
    "rand",
    "normal",
    "bernoulli",
    "dropout",
    "multinomial",
    "poisson",
    "empty",
    "uniform",
    "exponential",
    "geometric",
    "cauchy",
    "seed",
)


class Constants:
    """Evaluates nodes that depend only on parameters, buffers and literals (memoised)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.cache: dict[fx.Node, Any] = {}

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, fx.Node):
            if isinstance(value, (list, tuple)):
                values = [self(a) for a in value]
                return NOT_CONSTANT if any(v is NOT_CONSTANT for v in values) else type(value)(values)
            return value
        if value not in self.cache:
            self.cache[value] = self._evaluate(value)
        return self.cache[value]

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            return attr_path(self.gm, str(node.target))
        if node.op not in ("call_function", "call_method"):
            return NOT_CONSTANT
        name = getattr(node.target, "__name__", str(node.target)).lower()
        if any(r in name for r in _RANDOM):
            return NOT_CONSTANT
        args = [self(a) for a in node.args]
        kwargs = {k: self(v) for k, v in node.kwargs.items()}
        if any(v is NOT_CONSTANT for v in args) or any(v is NOT_CONSTANT for v in kwargs.values()):
            return NOT_CONSTANT
        try:
            with torch.no_grad():
                if isinstance(node.target, str):  # call_method: the method of the first argument
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                return node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001  the model's code on constants: any failure means "not a constant"
            return NOT_CONSTANT

    def is_constant(self, value: Any) -> bool:
        return self(value) is not NOT_CONSTANT


# --------------------------------------------------------------------------------------------


def _bn(source: fx.Node, mean: Any, var: Any, weight: Any, bias: Any, eps: Any, default_nd: int | None) -> Unary:
    rank = node_rank(source)
    if rank is not None:
        layout = A.Layout.of_rank(rank)
    elif default_nd:
        layout = A.Layout(default_nd)
    else:
        raise CannotLift("BatchNorm input rank unknown (no shapes)")
    if mean is None or var is None:
        raise CannotLift("BatchNorm without running statistics uses batch statistics")
    aff = A.batchnorm(as_float64(mean), as_float64(var), as_float64(weight), as_float64(bias), float(eps), layout)
    return Unary(source, OpKind.BATCHNORM, aff)


def pad_pairs(pad: Any, nd: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """F.pad's last-axis-first ``[lo_last, hi_last, lo_prev, hi_prev, ...]`` -> per-axis lo, hi (the inverse of
    :func:`reparam.affine.torch_pads`).  NotAffine when it pads the channel or batch axis."""
    if not isinstance(pad, (list, tuple)):
        raise NotAffine("padding is not a sequence")
    pad = list(pad)
    if len(pad) % 2 or len(pad) > 2 * nd:
        raise NotAffine("padding reaches the channel or batch axis")
    pad += [0] * (2 * nd - len(pad))
    lo = tuple(pad[2 * (nd - 1 - i)] for i in range(nd))
    hi = tuple(pad[2 * (nd - 1 - i) + 1] for i in range(nd))
    return lo, hi


def _pool(
    source: fx.Node,
    kernel: Any,
    stride: Any,
    padding: Any,
    ceil_mode: Any,
    count_include_pad: Any,
    divisor: Any,
    nd: int,
) -> Unary:
    shape = node_shape(source)
    if shape is None:
        raise CannotLift("average pool input shape unknown (no shapes)")
    if divisor is not None:
        raise CannotLift("average pool with divisor_override")
    if ceil_mode:
        raise CannotLift("average pool with ceil_mode=True has a partial border window")
    if not count_include_pad and any(A._tuple(padding, nd)):
        raise A.Refusal("AvgPool with count_include_pad=False is not a fixed kernel on the border")
    aff = A.avgpool(shape[1], kernel, stride, padding, A.Layout(nd))
    return Unary(source, OpKind.AVGPOOL, aff)


def _channel_vector(const: Any, tensor_node: fx.Node) -> tuple[Any, A.Layout | None]:
    """A constant multiplier/addend as (scalar) or (layout, per-channel vector); NotAffine otherwise."""
    if isinstance(const, (int, float)) and not isinstance(const, bool):
        return float(const), None
    if not isinstance(const, torch.Tensor) or not const.is_floating_point() and const.numel() != 1:
        raise NotAffine("operand is not a number or floating tensor")
    if const.numel() == 1:
        return float(const.reshape(())), None
    rank = node_rank(tensor_node)
    if rank is None or const.dim() > rank:
        raise NotAffine("constant would broadcast the tensor")
    shape = (1,) * (rank - const.dim()) + tuple(const.shape)
    big = [i for i, s in enumerate(shape) if s != 1]
    if len(big) != 1:
        raise NotAffine("constant is not per-channel")
    axis = big[0]
    if axis == rank - 1:
        layout = A.Layout(0)
    elif axis == 1:
        layout = A.Layout(rank - 2)
    else:
        raise NotAffine("constant varies along a non-channel axis")
    return as_float64(const.reshape(-1)), layout


_AVG_POOL_ND: dict[type, int] = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_BATCH_NORM_ND: dict[type, int] = {nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_AVG_POOL_FUNCTION_ND: dict[object, int] = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_NO_OPS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class Lifter:
    """Turns nodes into :data:`Op` s; raises :class:`NotAffine` or :class:`affine.Refusal`."""

    def __init__(self, gm: fx.GraphModule, constants: Constants):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.const = constants

    # -- entry point ----------------------------------------------------------------------------
    def lift(self, node: fx.Node) -> Op:
        op = self._lift(node)
        if not all(self.tensor(s) for s in op_sources(op)):  # e.g. conv over a constant: leave it
            raise NotAffine("an operand is a constant")
        return op

    def _lift(self, node: fx.Node) -> Op:
        if node.op == "call_module":
            return self._module(node, self.modules[str(node.target)])
        if node.op == "call_function":
            handler = _FUNCTIONS.get(node.target) if callable(node.target) else None
            if handler is None:
                raise NotAffine(f"{getattr(node.target, '__name__', node.target)} is not affine")
            return handler(self, node)
        if node.op == "call_method":
            handler = _METHODS.get(str(node.target))
            if handler is None:
                raise NotAffine(f".{node.target}() is not affine")
            return handler(self, node)
        raise NotAffine(node.op)

    def tensor(self, value: Any) -> TypeGuard[fx.Node]:
        """``value`` is a node whose value depends on the model's inputs (not a constant)."""
        return isinstance(value, fx.Node) and not self.const.is_constant(value)

    def _input(self, node: fx.Node) -> fx.Node:
        """The tensor ``node`` reads as its first (``input``) argument."""
        source = arg(node, 0, "input")
        if not isinstance(source, fx.Node):
            raise NotAffine("an operand is a constant")
        return source

    # -- modules ----------------------------------------------------------------------------------
    def _module(self, node: fx.Node, m: nn.Module) -> Op:
        src = node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs or not self.tensor(src):
            raise NotAffine("module call with extra arguments")
        if computes_as_conv(m):
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
                raise CannotLift("uninitialised lazy conv")
            return Unary(src, OpKind.CONV, conv_affine(m))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training:
                raise CannotLift("BatchNorm in training mode uses batch statistics")
            if not m.track_running_stats or m.running_mean is None:
                raise A.Refusal(
                    "BatchNorm without running statistics (track_running_stats=False) uses batch statistics"
                )
            return _bn(
                src,
                m.running_mean,
                m.running_var,
                m.weight if m.affine else None,
                m.bias if m.affine else None,
                m.eps,
                _BATCH_NORM_ND.get(type(m)),
            )
        if isinstance(m, nn.Linear):
            return Unary(src, OpKind.LINEAR, A.from_linear(as_float64(m.weight), as_float64(m.bias)))
        if type(m) in _AVG_POOL_ND:  # exact types: a subclass may pool otherwise
            assert isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d))
            return _pool(
                src,
                m.kernel_size,
                m.stride,
                m.padding,
                m.ceil_mode,
                m.count_include_pad,
                getattr(m, "divisor_override", None),
                _AVG_POOL_ND[type(m)],
            )
        if isinstance(m, nn.Identity) or (isinstance(m, _NO_OPS) and not m.training):
            return Unary(src, OpKind.IDENTITY)
        if isinstance(m, nn.modules.padding._ConstantPadNd):
            if m.value != 0:
                raise NotAffine("constant padding with a non-zero value")
            return self._pad(src, m.padding)
        raise NotAffine(f"{type(m).__name__} is not affine")

    def _pad(self, src: fx.Node, pad: Any) -> Unary:
        shape = node_shape(src)
        if shape is None:
            raise CannotLift("pad input rank unknown (no shapes)")
        if len(shape) < 3:  # no spatial axes to pad (the message tests/test_lift.py pins)
            raise NotAffine("pad input rank unknown")
        nd = len(shape) - 2
        lo, hi = pad_pairs(pad, nd)
        return Unary(src, OpKind.PAD, A.zero_pad(shape[1], lo, hi, A.Layout(nd)))

    # -- functions ----------------------------------------------------------------------------------
    def _constants(self, node: fx.Node, spec: tuple[tuple[int, str, Any], ...], why: str) -> list[Any]:
        """The arguments ``(index, name, default)`` of ``spec`` as constants; NotAffine(``why``) if one is not."""
        values = [self.const(arg(node, i, name, default)) for i, name, default in spec]
        if any(v is NOT_CONSTANT for v in values):
            raise NotAffine(why)
        return values

    def conv(self, node: fx.Node) -> Op:
        src = self._input(node)
        weight, bias = self._constants(
            node, ((1, "weight", None), (2, "bias", None)), "conv weight is computed from the input"
        )
        hyper = self._constants(
            node,
            ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1)),
            "conv hyper-parameters depend on the input",
        )
        return Unary(src, OpKind.CONV, A.from_conv(as_float64(weight), as_float64(bias), *hyper))

    def batch_norm(self, node: fx.Node) -> Op:
        src = self._input(node)
        mean, var, weight, bias, training, eps = self._constants(
            node,
            (
                (1, "running_mean", None),
                (2, "running_var", None),
                (3, "weight", None),
                (4, "bias", None),
                (5, "training", False),
                (7, "eps", 1e-5),
            ),
            "BatchNorm parameters depend on the input",
        )
        if training:
            raise A.Refusal("BatchNorm in training mode (training=True) uses batch statistics")
        return _bn(src, mean, var, weight, bias, eps, None)

    def linear(self, node: fx.Node) -> Op:
        src = self._input(node)
        weight, bias = self._constants(
            node, ((1, "weight", None), (2, "bias", None)), "linear weight is computed from the input"
        )
        return Unary(src, OpKind.LINEAR, A.from_linear(as_float64(weight), as_float64(bias)))

    def avg_pool(self, node: fx.Node) -> Op:
        nd = _AVG_POOL_FUNCTION_ND[node.target]
        src = self._input(node)
        kernel, stride, padding, ceil_mode, count_include_pad, divisor = self._constants(
            node,
            (
                (1, "kernel_size", None),
                (2, "stride", None),
                (3, "padding", 0),
                (4, "ceil_mode", False),
                (5, "count_include_pad", True),
                (6, "divisor_override", None),
            ),
            "pool arguments depend on the input",
        )
        return _pool(src, kernel, stride, padding, ceil_mode, count_include_pad, divisor, nd)

    def pad(self, node: fx.Node) -> Op:
        src = self._input(node)
        pad, mode, value = (
            self.const(arg(node, i, n, d))
            for i, n, d in ((1, "pad", None), (2, "mode", "constant"), (3, "value", None))
        )
        if NOT_CONSTANT in (pad, mode, value) or mode != "constant" or (value or 0) != 0:
            raise NotAffine("padding is not a constant zero pad")
        return self._pad(src, pad)

    def dropout(self, node: fx.Node) -> Op:
        src = self._input(node)
        training = self.const(arg(node, 2, "training", True))
        if training is not False:
            raise NotAffine("dropout in training mode")
        return Unary(src, OpKind.IDENTITY)

    def contiguous(self, node: fx.Node) -> Op:
        """``x.contiguous()`` is the identity on values, but not on memory layout: a ``view`` after it may
        need the copy (``transpose(x).contiguous().view(...)``, or any channels-last input).  Lifted only
        when no ``view`` is reachable from it, since a fused region hands on its root's (or its new
        module's) layout instead."""
        src = self._input(node)
        if not self.tensor(src):
            raise NotAffine("not a tensor")
        seen, frontier = {node}, [node]
        while frontier:
            cur = frontier.pop()
            for user in cur.users:
                if user.op == "call_method" and user.target in ("view", "view_as"):
                    raise NotAffine(".contiguous() before a view")
                if user not in seen and len(seen) < 200:
                    seen.add(user)
                    frontier.append(user)
        if len(seen) >= 200:
            raise NotAffine(".contiguous(): too much graph after it to rule out a view")
        return Unary(src, OpKind.IDENTITY)

    def reshape(self, node: fx.Node) -> Op:
        """A row-major reshape that keeps the last axis and is undone later: the identity on channels-last data.

        ``flatten`` / ``view`` / ``reshape`` / ``unflatten`` / ``squeeze`` / ``unsqueeze`` /
        ``reshape_as`` / ``view_as`` keep the flat (row-major) order, so when the last axis keeps its
        size, element ``(..., c)`` stays ``(..., c)``: a channels-last affine op (Linear, BatchNorm over
        ``(N, C)``) acts on each position alone and commutes with it.  Lifted (as a channels-last
        identity, which composes only with channels-last ops) when it is one end of a pair
        ``reshape -> single-user affine ops -> reshape back to the first one's input shape``, e.g. timm's
        ``bn(linear(x).flatten(0, 1)).reshape_as(x)``: a region then never ends between the two, where
        its output would not have its root's shape.  With the flat order kept, the same shape means the
        same data.  Permutations are never lifted: a transpose of a square tensor keeps the shape but
        moves the data.
        """
        src = reshape_source(node)
        if not self.tensor(src):
            raise NotAffine("not a tensor")
        before, after = node_shape(src), node_shape(node)
        if not before or not after:
            raise NotAffine("reshape: shapes unknown")
        if before[-1] != after[-1]:
            raise NotAffine("reshape changes the last axis")
        if not (self._undone_later(node, before) or self._undoes_earlier(src, after)):
            raise NotAffine("reshape is not undone by a later one")
        return Unary(src, OpKind.IDENTITY, A.identity(int(before[-1]), A.Layout(0)))

    def _chain_step(self, node: fx.Node) -> fx.Node | None:
        """The source of ``node`` when it is a one-input affine op that is not a reshape; else None."""
        if is_reshape(node):
            return None
        try:
            op = self._lift(node)
        except (NotAffine, A.Refusal):  # not a step of the chain
            return None
        return op.source if isinstance(op, Unary) else None

    def _undone_later(self, node: fx.Node, shape: tuple[int, ...], limit: int = 8) -> bool:
        cur = node
        for _ in range(limit):
            users = _value_users(cur)
            if len(users) != 1:
                return False
            user = users[0]
            if is_reshape(user) and reshape_source(user) is cur:
                return node_shape(user) == shape and _keeps_last(user)
            if self._chain_step(user) is not cur:
                return False
            cur = user
        return False

    def _undoes_earlier(self, src: fx.Node, shape: tuple[int, ...], limit: int = 8) -> bool:
        cur: fx.Node | None = src
        for _ in range(limit):
            if cur is None or len(_value_users(cur)) != 1:
                return False
            if is_reshape(cur):
                inner = reshape_source(cur)
                return isinstance(inner, fx.Node) and node_shape(inner) == shape and _keeps_last(cur)
            cur = self._chain_step(cur)
        return False

    # -- arithmetic ----------------------------------------------------------------------------------
    def _inplace_ok(self, node: fx.Node, inplace: bool) -> None:
        """An in-place op is a plain op when nobody else reads the tensor it overwrites."""
        if inplace and len(self._input(node).users) != 1:
            raise NotAffine("in-place update of a tensor that is read elsewhere")

    def _linear_combination(self, node: fx.Node, sign: float, inplace: bool) -> Op:
        a, b = arg(node, 0, "input"), arg(node, 1, "other")
        alpha = self.const(node.kwargs.get("alpha", 1))
        if alpha is NOT_CONSTANT:
            raise NotAffine("alpha depends on the input")
        if self.tensor(a) and self.tensor(b):
            self._inplace_ok(node, inplace)
            return Sum([(a, 1.0), (b, sign * float(alpha))])
        if self.tensor(a):  # a + c
            self._inplace_ok(node, inplace)
            value, layout = _channel_vector(self.const(b), a)
            return _shift(a, 1.0, value * sign * float(alpha), layout)
        if self.tensor(b):  # c + alpha * b
            value, layout = _channel_vector(self.const(a), b)
            return _shift(b, sign * float(alpha), value, layout)
        raise NotAffine("no tensor operand")

    def add(self, node: fx.Node, inplace: bool = False) -> Op:
        return self._linear_combination(node, 1.0, inplace)

    def sub(self, node: fx.Node, inplace: bool = False) -> Op:
        return self._linear_combination(node, -1.0, inplace)

    def mul(self, node: fx.Node, inplace: bool = False, divide: bool = False) -> Op:
        a, b = arg(node, 0, "input"), arg(node, 1, "other")
        if divide and node.kwargs.get("rounding_mode") is not None:
            raise NotAffine("rounding division")
        if self.tensor(a) and self.tensor(b):
            raise NotAffine("product of two tensors")
        if self.tensor(a):
            self._inplace_ok(node, inplace)
            src, const = a, self.const(b)
        elif self.tensor(b) and not divide:
            src, const = b, self.const(a)
        else:
            raise NotAffine("no tensor operand")
        value, layout = _channel_vector(const, src)
        if divide:
            value = 1.0 / value
        if layout is None:
            return Unary(src, OpKind.SCALE, scale=value)
        return Unary(src, OpKind.SCALE, A.channelwise(value, None, layout))

    def neg(self, node: fx.Node) -> Op:
        src = arg(node, 0, "input")
        if not self.tensor(src):
            raise NotAffine("no tensor operand")
        return Unary(src, OpKind.SCALE, scale=-1.0)

    def cat(self, node: fx.Node) -> Op:
        tensors = arg(node, 0, "tensors")
        dim = self.const(arg(node, 1, "dim", 0))
        if not isinstance(tensors, (list, tuple)) or not all(self.tensor(t) for t in tensors):
            raise NotAffine("concatenation of non-tensors")
        if dim is NOT_CONSTANT:
            raise NotAffine("concatenation axis depends on the input")
        return Concat(list(tensors), int(dim))


def _shift(src: fx.Node, scale: float, shift: Any, layout: A.Layout | None) -> Unary:
    """``scale * src + shift``: ``shift`` a number (layout-free) or a per-channel vector in ``layout``."""
    if layout is None:
        return Unary(src, OpKind.SHIFT, scale=scale, shift=shift)
    channels = shift.numel()
    return Unary(src, OpKind.SHIFT, A.channelwise(torch.full((channels,), scale, dtype=torch.float64), shift, layout))


_RESHAPE_METHODS = {"flatten", "view", "reshape", "unflatten", "squeeze", "unsqueeze", "reshape_as", "view_as"}
_RESHAPE_FUNCTIONS: set[Callable[..., Any]] = {
    torch.flatten,
    torch.reshape,
    torch.unflatten,
    torch.squeeze,
    torch.unsqueeze,
}
_SHAPE_READS = {"ndim", "dtype", "device", "is_cuda", "layout", "shape"}


def is_reshape(node: fx.Node) -> bool:
    """``node`` reshapes a tensor keeping its row-major order (flatten, view, reshape, (un)squeeze ...)."""
    return (node.op == "call_method" and node.target in _RESHAPE_METHODS) or (
        node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS
    )


def reshape_source(node: fx.Node) -> Any:
    """What a reshape node reshapes (a node, or a constant)."""
    return node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))


def _keeps_last(node: fx.Node) -> bool:
    src = reshape_source(node)
    before, after = node_shape(src) if isinstance(src, fx.Node) else None, node_shape(node)
    if not before or not after:
        return False
    return before[-1] == after[-1]


def _value_users(node: fx.Node) -> list[fx.Node]:
    """Users that read ``node``'s values (not only its shape: ``x.shape``, ``y.reshape_as(x)``...)."""
    out = []
    for user in node.users:
        if (
            user.op == "call_function"
            and user.target is getattr
            and len(user.args) > 1
            and user.args[1] in _SHAPE_READS
        ):
            continue
        if user.op == "call_method" and user.target in ("size", "dim", "ndimension") and user.args[0] is node:
            continue
        if user.op == "call_method" and user.target in ("reshape_as", "view_as") and user.args[0] is not node:
            continue
        out.append(user)
    return out


Handler = Callable[[Lifter, fx.Node], Op]


def _method(fn: Callable[..., Op], **kw: bool) -> Handler:
    return lambda lifter, node: fn(lifter, node, **kw)


_FUNCTIONS: dict[Callable[..., Any], Handler] = {
    **dict.fromkeys((F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d), Lifter.conv),
    F.batch_norm: Lifter.batch_norm,
    torch.batch_norm: Lifter.batch_norm,
    F.linear: Lifter.linear,
    F.avg_pool1d: Lifter.avg_pool,
    F.avg_pool2d: Lifter.avg_pool,
    F.avg_pool3d: Lifter.avg_pool,
    F.pad: Lifter.pad,
    torch._C._nn.pad: Lifter.pad,
    F.dropout: Lifter.dropout,
    F.dropout1d: Lifter.dropout,
    F.dropout2d: Lifter.dropout,
    F.dropout3d: Lifter.dropout,
    **dict.fromkeys(ADD_FUNCTIONS, Lifter.add),
    operator.iadd: _method(Lifter.add, inplace=True),
    operator.sub: Lifter.sub,
    torch.sub: Lifter.sub,
    operator.isub: _method(Lifter.sub, inplace=True),
    **dict.fromkeys(MUL_FUNCTIONS, Lifter.mul),
    operator.imul: _method(Lifter.mul, inplace=True),
    operator.truediv: _method(Lifter.mul, divide=True),
    torch.div: _method(Lifter.mul, divide=True),
    operator.itruediv: _method(Lifter.mul, inplace=True, divide=True),
    operator.neg: Lifter.neg,
    torch.neg: Lifter.neg,
    **dict.fromkeys(CONCAT_FUNCTIONS, Lifter.cat),
    **dict.fromkeys(_RESHAPE_FUNCTIONS, Lifter.reshape),
}
if hasattr(torch._C._nn, "linear"):
    _FUNCTIONS[torch._C._nn.linear] = Lifter.linear

_METHODS: dict[str, Handler] = {
    "add": Lifter.add,
    "add_": _method(Lifter.add, inplace=True),
    "sub": Lifter.sub,
    "sub_": _method(Lifter.sub, inplace=True),
    "mul": Lifter.mul,
    "mul_": _method(Lifter.mul, inplace=True),
    "div": _method(Lifter.mul, divide=True),
    "div_": _method(Lifter.mul, inplace=True, divide=True),
    "neg": Lifter.neg,
    "contiguous": Lifter.contiguous,
    **dict.fromkeys(_RESHAPE_METHODS, Lifter.reshape),
}
