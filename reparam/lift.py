"""fx node -> algebra: what a node computes, as an affine op on its tensor inputs (or why not).

Matched on what the graph does, never on block class names: ``call_module`` Conv/BN/Linear/AvgPool/
Identity/Dropout/ZeroPad, their functional forms (``F.conv*``, ``F.batch_norm``, ``F.linear``,
``F.avg_pool*``, ``F.pad``), ``+ - * /`` with constants or tensors, and ``torch.cat``.
Constants are whatever depends only on parameters and buffers (weights computed from parameters,
e.g. weight standardisation, are folded too).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import affine as A
from .trace import node_shape

NOT_CONSTANT = object()


@dataclass
class Unary:
    """``node = op(source)`` where op is an Affine, or a scalar ``scale * x + shift`` (layout-free)."""

    source: fx.Node
    kind: str  # conv, linear, batchnorm, avgpool, pad, scale, shift, identity
    affine: Optional[A.Affine] = None
    scale: float = 1.0
    shift: float = 0.0


@dataclass
class Sum:
    """``node = sum(coeff * term)`` over tensor terms."""

    terms: list  # [(fx.Node, float)]


@dataclass
class Concat:
    """``node = cat(sources, channel axis)``."""

    sources: list
    dim: int


Op = Union[Unary, Sum, Concat]


class NotAffine(Exception):
    """The node is not an affine op of its inputs (the message says why, when it is interesting)."""


_RANDOM = ("rand", "normal", "bernoulli", "dropout", "multinomial", "poisson", "empty", "uniform",
           "exponential", "geometric", "cauchy", "seed")


class Constants:
    """Evaluates nodes that depend only on parameters, buffers and literals (memoised)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.cache: dict[fx.Node, Any] = {}

    def __call__(self, arg):
        if not isinstance(arg, fx.Node):
            if isinstance(arg, (list, tuple)):
                values = [self(a) for a in arg]
                return NOT_CONSTANT if any(v is NOT_CONSTANT for v in values) else type(arg)(values)
            return arg
        if arg not in self.cache:
            self.cache[arg] = self._evaluate(arg)
        return self.cache[arg]

    def _evaluate(self, node: fx.Node):
        if node.op == "get_attr":
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
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
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                return node.target(*args, **kwargs)
        except Exception:
            return NOT_CONSTANT

    def is_constant(self, arg) -> bool:
        return self(arg) is not NOT_CONSTANT


# --------------------------------------------------------------------------------------------


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _rank(node: fx.Node) -> Optional[int]:
    shape = node_shape(node)
    return len(shape) if shape is not None else None


def _as_double(t):
    return t.detach().to(torch.float64) if isinstance(t, torch.Tensor) else t


def _bn(source: fx.Node, mean, var, weight, bias, eps, default_nd: Optional[int]) -> Unary:
    rank = _rank(source)
    if rank is not None:
        layout = A.Layout.of_rank(rank)
    elif default_nd:
        layout = A.Layout(default_nd)
    else:
        raise NotAffine("BatchNorm input rank unknown (no shapes)")
    if mean is None or var is None:
        raise NotAffine("BatchNorm without running statistics uses batch statistics")
    aff = A.batchnorm(*(_as_double(t) for t in (mean, var, weight, bias)), float(eps), layout)
    return Unary(source, "batchnorm", aff)


def _pad_pairs(pad, nd: int) -> tuple[tuple, tuple]:
    """F.pad's last-axis-first ``[lo_last, hi_last, lo_prev, hi_prev, ...]`` -> per-axis lo, hi."""
    pad = list(pad)
    if len(pad) % 2 or len(pad) > 2 * nd:
        raise NotAffine("padding reaches the channel or batch axis")
    pad += [0] * (2 * nd - len(pad))
    lo = tuple(pad[2 * (nd - 1 - i)] for i in range(nd))
    hi = tuple(pad[2 * (nd - 1 - i) + 1] for i in range(nd))
    return lo, hi


def _pool(source: fx.Node, kernel, stride, padding, ceil_mode, count_include_pad, divisor, nd: int) -> Unary:
    shape = node_shape(source)
    if shape is None:
        raise NotAffine("average pool input shape unknown")
    if divisor is not None:
        raise NotAffine("average pool with divisor_override")
    if ceil_mode:
        raise NotAffine("average pool with ceil_mode=True has a partial border window")
    if not count_include_pad and any(A._tuple(padding, nd)):
        raise A.Refusal("AvgPool with count_include_pad=False is not a fixed kernel on the border")
    aff = A.avgpool(shape[1], kernel, stride, padding, A.Layout(nd))
    return Unary(source, "avgpool", aff)


def _channel_vector(const, tensor_node: fx.Node):
    """A constant multiplier/addend as (scalar) or (layout, per-channel vector); NotAffine otherwise."""
    if isinstance(const, (int, float)) and not isinstance(const, bool):
        return float(const), None
    if not isinstance(const, torch.Tensor) or not const.is_floating_point() and const.numel() != 1:
        raise NotAffine("operand is not a number or floating tensor")
    if const.numel() == 1:
        return float(const.reshape(())), None
    rank = _rank(tensor_node)
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
    return _as_double(const.reshape(-1)), layout


class Lifter:
    """Turns nodes into :data:`Op` s; raises :class:`NotAffine` or :class:`affine.Refusal`."""

    def __init__(self, gm: fx.GraphModule, constants: Constants):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.const = constants

    # -- entry point ----------------------------------------------------------------------------
    def lift(self, node: fx.Node) -> Op:
        op = self._lift(node)
        sources = [op.source] if isinstance(op, Unary) else [t for t, _ in op.terms] if isinstance(op, Sum) else op.sources
        if not all(self.tensor(s) for s in sources):  # e.g. conv over a constant: leave it
            raise NotAffine("an operand is a constant")
        return op

    def _lift(self, node: fx.Node) -> Op:
        if node.op == "call_module":
            return self._module(node, self.modules[node.target])
        if node.op == "call_function":
            handler = _FUNCTIONS.get(node.target)
            if handler is None:
                raise NotAffine(f"{getattr(node.target, '__name__', node.target)} is not affine")
            return handler(self, node)
        if node.op == "call_method":
            handler = _METHODS.get(node.target)
            if handler is None:
                raise NotAffine(f".{node.target}() is not affine")
            return handler(self, node)
        raise NotAffine(node.op)

    def tensor(self, arg) -> bool:
        return isinstance(arg, fx.Node) and not self.const.is_constant(arg)

    # -- modules ----------------------------------------------------------------------------------
    def _module(self, node: fx.Node, m: nn.Module) -> Op:
        src = node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs or not self.tensor(src):
            raise NotAffine("module call with extra arguments")
        if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
                raise NotAffine("uninitialised lazy conv")
            aff = A.from_conv(_as_double(m.weight), _as_double(m.bias), m.stride, m.padding, m.dilation,
                              m.groups, m.padding_mode)
            return Unary(src, "conv", aff)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training:
                raise NotAffine("BatchNorm in training mode")
            if not m.track_running_stats or m.running_mean is None:
                raise A.Refusal("BatchNorm without running statistics (track_running_stats=False) uses batch statistics")
            nd = {nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(m))
            return _bn(src, m.running_mean, m.running_var, m.weight if m.affine else None,
                       m.bias if m.affine else None, m.eps, nd)
        if isinstance(m, nn.Linear):
            return Unary(src, "linear", A.from_linear(_as_double(m.weight), _as_double(m.bias)))
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            nd = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(m)]
            return _pool(src, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                         getattr(m, "divisor_override", None), nd)
        if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
            if isinstance(m, nn.Identity) or not m.training:
                return Unary(src, "identity")
        if isinstance(m, nn.modules.padding._ConstantPadNd):
            if m.value != 0:
                raise NotAffine("constant padding with a non-zero value")
            return self._pad(src, m.padding)
        raise NotAffine(f"{type(m).__name__} is not affine")

    def _pad(self, src: fx.Node, pad) -> Unary:
        rank = _rank(src)
        if rank is None or rank < 3:
            raise NotAffine("pad input rank unknown")
        nd = rank - 2
        lo, hi = _pad_pairs(pad, nd)
        shape = node_shape(src)
        return Unary(src, "pad", A.zero_pad(shape[1], lo, hi, A.Layout(nd)))

    # -- functions ----------------------------------------------------------------------------------
    def conv(self, node: fx.Node) -> Op:
        src, weight = node.args[0], self.const(_arg(node, 1, "weight"))
        bias = self.const(_arg(node, 2, "bias"))
        if weight is NOT_CONSTANT or bias is NOT_CONSTANT:
            raise NotAffine("conv weight is computed from the input")
        hyper = [self.const(_arg(node, i, n, d)) for i, n, d in
                 ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1))]
        if any(h is NOT_CONSTANT for h in hyper):
            raise NotAffine("conv hyper-parameters depend on the input")
        return Unary(src, "conv", A.from_conv(_as_double(weight), _as_double(bias), *hyper))

    def batch_norm(self, node: fx.Node) -> Op:
        src = node.args[0]
        values = [self.const(_arg(node, i, n, d)) for i, n, d in
                  ((1, "running_mean", None), (2, "running_var", None), (3, "weight", None),
                   (4, "bias", None), (5, "training", False), (7, "eps", 1e-5))]
        if any(v is NOT_CONSTANT for v in values):
            raise NotAffine("BatchNorm parameters depend on the input")
        mean, var, weight, bias, training, eps = values
        if training:
            raise A.Refusal("BatchNorm in training mode (training=True) uses batch statistics")
        return _bn(src, mean, var, weight, bias, eps, None)

    def linear(self, node: fx.Node) -> Op:
        weight, bias = self.const(_arg(node, 1, "weight")), self.const(_arg(node, 2, "bias"))
        if weight is NOT_CONSTANT or bias is NOT_CONSTANT:
            raise NotAffine("linear weight is computed from the input")
        return Unary(node.args[0], "linear", A.from_linear(_as_double(weight), _as_double(bias)))

    def avg_pool(self, node: fx.Node) -> Op:
        nd = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}[node.target]
        vals = [self.const(_arg(node, i, n, d)) for i, n, d in
                ((1, "kernel_size", None), (2, "stride", None), (3, "padding", 0), (4, "ceil_mode", False),
                 (5, "count_include_pad", True), (6, "divisor_override", None))]
        if any(v is NOT_CONSTANT for v in vals):
            raise NotAffine("pool arguments depend on the input")
        return _pool(node.args[0], *vals, nd)

    def pad(self, node: fx.Node) -> Op:
        pad, mode, value = (self.const(_arg(node, i, n, d)) for i, n, d in
                            ((1, "pad", None), (2, "mode", "constant"), (3, "value", None)))
        if NOT_CONSTANT in (pad, mode, value) or mode != "constant" or (value or 0) != 0:
            raise NotAffine("padding is not a constant zero pad")
        return self._pad(node.args[0], pad)

    def dropout(self, node: fx.Node) -> Op:
        training = self.const(_arg(node, 2, "training", True))
        if training is not False:
            raise NotAffine("dropout in training mode")
        return Unary(node.args[0], "identity")

    def identity(self, node: fx.Node) -> Op:
        if not self.tensor(node.args[0]):
            raise NotAffine("not a tensor")
        return Unary(node.args[0], "identity")

    def contiguous(self, node: fx.Node) -> Op:
        """``x.contiguous()`` is the identity on values, but not on memory layout: a ``view`` after it may
        need the copy (``transpose(x).contiguous().view(...)``, or any channels-last input).  Lifted only
        when no ``view`` is reachable from it, since a fused region hands on its root's (or its new
        module's) layout instead."""
        if not self.tensor(node.args[0]):
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
        return Unary(node.args[0], "identity")

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
        src = _reshape_source(node)
        if not self.tensor(src):
            raise NotAffine("not a tensor")
        before, after = node_shape(src), node_shape(node)
        if not before or not after:
            raise NotAffine("reshape: shapes unknown")
        if before[-1] != after[-1]:
            raise NotAffine("reshape changes the last axis")
        if not (self._undone_later(node, before) or self._undoes_earlier(src, after)):
            raise NotAffine("reshape is not undone by a later one")
        return Unary(src, "identity", A.identity(int(before[-1]), A.Layout(0)))

    def _chain_step(self, node: fx.Node) -> Optional[fx.Node]:
        """The source of ``node`` when it is a one-input affine op that is not a reshape; else None."""
        if _is_reshape(node):
            return None
        try:
            op = self._lift(node)
        except Exception:
            return None
        return op.source if isinstance(op, Unary) else None

    def _undone_later(self, node: fx.Node, shape: tuple, limit: int = 8) -> bool:
        cur = node
        for _ in range(limit):
            users = _value_users(cur)
            if len(users) != 1:
                return False
            user = users[0]
            if _is_reshape(user) and _reshape_source(user) is cur:
                return node_shape(user) == shape and _keeps_last(user)
            if self._chain_step(user) is not cur:
                return False
            cur = user
        return False

    def _undoes_earlier(self, src: fx.Node, shape: tuple, limit: int = 8) -> bool:
        cur = src
        for _ in range(limit):
            if len(_value_users(cur)) != 1:
                return False
            if _is_reshape(cur):
                inner = _reshape_source(cur)
                return isinstance(inner, fx.Node) and node_shape(inner) == shape and _keeps_last(cur)
            cur = self._chain_step(cur)
            if cur is None:
                return False
        return False

    # -- arithmetic ----------------------------------------------------------------------------------
    def _inplace_ok(self, node: fx.Node, inplace: bool) -> None:
        """An in-place op is a plain op when nobody else reads the tensor it overwrites."""
        if inplace and len(node.args[0].users) != 1:
            raise NotAffine("in-place update of a tensor that is read elsewhere")

    def _linear_combination(self, node: fx.Node, sign: float, inplace: bool) -> Op:
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        alpha = self.const(node.kwargs.get("alpha", 1))
        if alpha is NOT_CONSTANT:
            raise NotAffine("alpha depends on the input")
        ta, tb = self.tensor(a), self.tensor(b)
        if ta and tb:
            self._inplace_ok(node, inplace)
            return Sum([(a, 1.0), (b, sign * float(alpha))])
        if not (ta or tb):
            raise NotAffine("no tensor operand")
        if ta:
            self._inplace_ok(node, inplace)
        src, const = (a, self.const(b)) if ta else (b, self.const(a))
        value, layout = _channel_vector(const, src)
        value = value * sign * float(alpha) if ta else value
        scale = 1.0 if ta else sign * float(alpha)
        if layout is None:
            return Unary(src, "shift", scale=scale, shift=value)
        channels = value.numel()
        return Unary(src, "shift", A.channelwise(torch.full((channels,), scale, dtype=torch.float64), value, layout))

    def add(self, node, inplace=False):
        return self._linear_combination(node, 1.0, inplace)

    def sub(self, node, inplace=False):
        return self._linear_combination(node, -1.0, inplace)

    def mul(self, node: fx.Node, inplace=False, divide=False) -> Op:
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        if divide and node.kwargs.get("rounding_mode") is not None:
            raise NotAffine("rounding division")
        ta, tb = self.tensor(a), self.tensor(b)
        if ta == tb or (divide and not ta):
            raise NotAffine("product of two tensors" if ta else "no tensor operand")
        if ta:
            self._inplace_ok(node, inplace)
        src, const = (a, self.const(b)) if ta else (b, self.const(a))
        value, layout = _channel_vector(const, src)
        if divide:
            value = 1.0 / value
        if layout is None:
            return Unary(src, "scale", scale=value)
        return Unary(src, "scale", A.channelwise(value, None, layout))

    def neg(self, node: fx.Node) -> Op:
        if not self.tensor(node.args[0]):
            raise NotAffine("no tensor operand")
        return Unary(node.args[0], "scale", scale=-1.0)

    def cat(self, node: fx.Node) -> Op:
        tensors = _arg(node, 0, "tensors")
        dim = self.const(_arg(node, 1, "dim", 0))
        if not isinstance(tensors, (list, tuple)) or not all(self.tensor(t) for t in tensors):
            raise NotAffine("concatenation of non-tensors")
        if dim is NOT_CONSTANT:
            raise NotAffine("concatenation axis depends on the input")
        return Concat(list(tensors), int(dim))


_RESHAPE_METHODS = {"flatten", "view", "reshape", "unflatten", "squeeze", "unsqueeze", "reshape_as", "view_as"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.unflatten, torch.squeeze, torch.unsqueeze}
_SHAPE_READS = {"ndim", "dtype", "device", "is_cuda", "layout", "shape"}


def _is_reshape(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _RESHAPE_METHODS) or (
        node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS)


def _reshape_source(node: fx.Node):
    return node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))


def _keeps_last(node: fx.Node) -> bool:
    src = _reshape_source(node)
    before, after = node_shape(src) if isinstance(src, fx.Node) else None, node_shape(node)
    return bool(before) and bool(after) and before[-1] == after[-1]


def _value_users(node: fx.Node) -> list:
    """Users that read ``node``'s values (not only its shape: ``x.shape``, ``y.reshape_as(x)``...)."""
    out = []
    for user in node.users:
        if user.op == "call_function" and user.target is getattr and len(user.args) > 1 and user.args[1] in _SHAPE_READS:
            continue
        if user.op == "call_method" and user.target in ("size", "dim", "ndimension") and user.args[0] is node:
            continue
        if user.op == "call_method" and user.target in ("reshape_as", "view_as") and user.args[0] is not node:
            continue
        out.append(user)
    return out


def _method(fn: Callable, **kw) -> Callable:
    return lambda lifter, node: fn(lifter, node, **kw)


_FUNCTIONS = {
    F.conv1d: Lifter.conv, F.conv2d: Lifter.conv, F.conv3d: Lifter.conv,
    F.batch_norm: Lifter.batch_norm, torch.batch_norm: Lifter.batch_norm,
    F.linear: Lifter.linear,
    F.avg_pool1d: Lifter.avg_pool, F.avg_pool2d: Lifter.avg_pool, F.avg_pool3d: Lifter.avg_pool,
    F.pad: Lifter.pad, torch._C._nn.pad: Lifter.pad,
    F.dropout: Lifter.dropout, F.dropout1d: Lifter.dropout, F.dropout2d: Lifter.dropout, F.dropout3d: Lifter.dropout,
    operator.add: Lifter.add, torch.add: Lifter.add, operator.iadd: _method(Lifter.add, inplace=True),
    operator.sub: Lifter.sub, torch.sub: Lifter.sub, operator.isub: _method(Lifter.sub, inplace=True),
    operator.mul: Lifter.mul, torch.mul: Lifter.mul, operator.imul: _method(Lifter.mul, inplace=True),
    operator.truediv: _method(Lifter.mul, divide=True), torch.div: _method(Lifter.mul, divide=True),
    operator.itruediv: _method(Lifter.mul, inplace=True, divide=True),
    operator.neg: Lifter.neg, torch.neg: Lifter.neg,
    torch.cat: Lifter.cat, torch.concat: Lifter.cat, torch.concatenate: Lifter.cat,
}
for _f in (torch.conv1d, torch.conv2d, torch.conv3d):
    _FUNCTIONS[_f] = Lifter.conv
if hasattr(torch._C._nn, "linear"):
    _FUNCTIONS[torch._C._nn.linear] = Lifter.linear

_METHODS = {
    "add": Lifter.add, "add_": _method(Lifter.add, inplace=True),
    "sub": Lifter.sub, "sub_": _method(Lifter.sub, inplace=True),
    "mul": Lifter.mul, "mul_": _method(Lifter.mul, inplace=True),
    "div": _method(Lifter.mul, divide=True), "div_": _method(Lifter.mul, inplace=True, divide=True),
    "neg": Lifter.neg, "contiguous": Lifter.contiguous,
}
for _name in _RESHAPE_METHODS:
    _METHODS[_name] = Lifter.reshape
for _f in _RESHAPE_FUNCTIONS:
    _FUNCTIONS[_f] = Lifter.reshape
