"""Value-range analysis: a sound interval ``[lo, hi]`` for every node's values (per element).

Used by residual removal: a signal carried through a ReLU unchanged must be provably >= 0, through a
ReLU6 provably in [0, 6].  Intervals are conservative: anything unknown is (-inf, inf).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..match import ADD_FUNCTIONS_WITH_INPLACE, CONCAT_FUNCTIONS, MUL_FUNCTIONS, POOL_MODULES, arg, called_module

INF = math.inf
ANY = (-INF, INF)

# ops whose output values are a subset (or rearrangement) of their first input's values
_PASS_MODULES = (
    *POOL_MODULES,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.Flatten,
    nn.Upsample,
)
_PASS_FUNCTIONS = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    F.dropout,
    torch.squeeze,
    torch.unsqueeze,
}
_PASS_METHODS = {
    "flatten",
    "reshape",
    "view",
    "contiguous",
    "permute",
    "transpose",
    "squeeze",
    "unsqueeze",
    "mean",
    "max",
    "amax",
    "clone",
    "detach",
}
_RELU = {F.relu, torch.relu, torch.relu_, F.relu_}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float))


def _clamp_bounds(lo: Any, hi: Any) -> tuple[float, float] | None:
    """The interval of ``clamp(x, lo, hi)`` (a missing bound: unbounded); None when a bound is not a number."""
    if all(v is None or _number(v) for v in (lo, hi)):
        return (-INF if lo is None else float(lo)), (INF if hi is None else float(hi))
    return None


def _clamped(r: tuple[float, float], bounds: tuple[float, float]) -> tuple[float, float]:
    """Interval of ``min(max(x, lo), hi)`` for ``x`` in ``r``: each end clamped (``[7, inf)`` clamped to ``[0, 6]`` is
    ``[6, 6]``, never the empty ``(7, 6)``)."""
    lo, hi = bounds
    return min(max(r[0], lo), hi), min(max(r[1], lo), hi)


def activation_bounds(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[float, float] | None:
    """(lo, hi) of a clamp-like activation ``node`` (ReLU, ReLU6, Hardtanh, clamp); None otherwise."""
    if node.op == "call_module":
        m = called_module(node, modules)
        if isinstance(m, nn.ReLU):
            return 0.0, INF
        if isinstance(m, nn.Hardtanh):  # ReLU6 is Hardtanh(0, 6)
            return float(m.min_val), float(m.max_val)
        return None
    if node.op == "call_function":
        if node.target in _RELU:
            return 0.0, INF
        if node.target is F.relu6:
            return 0.0, 6.0
        if node.target is F.hardtanh:
            lo, hi = arg(node, 1, "min_val", -1.0), arg(node, 2, "max_val", 1.0)
            return (float(lo), float(hi)) if _number(lo) and _number(hi) else None
        if node.target in (torch.clamp, torch.clip):
            return _clamp_bounds(arg(node, 1, "min"), arg(node, 2, "max"))
        return None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return 0.0, INF
    if node.op == "call_method" and node.target in ("clamp", "clamp_", "clip"):
        return _clamp_bounds(arg(node, 1, "min"), arg(node, 2, "max"))
    return None


def value_ranges(gm: fx.GraphModule) -> dict[fx.Node, tuple[float, float]]:
    """Interval of every node (tensor nodes only; anything unknown is ``(-inf, inf)``)."""
    modules = dict(gm.named_modules())
    ranges: dict[fx.Node, tuple[float, float]] = {}

    def get(value: Any) -> tuple[float, float]:
        if isinstance(value, fx.Node):
            return ranges.get(value, ANY)
        if _number(value):
            return float(value), float(value)
        return ANY

    for node in gm.graph.nodes:
        first = node.args[0] if node.args else None
        bounds = activation_bounds(node, modules)
        if bounds is not None:
            ranges[node] = _clamped(get(first), bounds)
            continue
        if node.op == "call_module":
            m = called_module(node, modules)
            if isinstance(m, nn.Sigmoid):
                ranges[node] = (0.0, 1.0)
            elif isinstance(m, _PASS_MODULES):
                ranges[node] = get(first)
        elif node.op == "call_function":
            if node.target in _PASS_FUNCTIONS:
                ranges[node] = get(first)
            elif node.target in (torch.sigmoid, F.sigmoid):
                ranges[node] = (0.0, 1.0)
            elif node.target in CONCAT_FUNCTIONS:
                parts = [get(t) for t in (first if isinstance(first, (list, tuple)) else [])]
                if parts:
                    ranges[node] = (min(p[0] for p in parts), max(p[1] for p in parts))
            elif node.target in ADD_FUNCTIONS_WITH_INPLACE and len(node.args) == 2:
                a, b = get(node.args[0]), get(node.args[1])
                ranges[node] = (a[0] + b[0], a[1] + b[1])
            elif node.target in MUL_FUNCTIONS and len(node.args) == 2:
                a, b = get(node.args[0]), get(node.args[1])
                if a[0] >= 0 and b[0] >= 0:
                    ranges[node] = (a[0] * b[0], a[1] * b[1] if math.isfinite(a[1] * b[1]) else INF)
        elif node.op == "call_method" and node.target in _PASS_METHODS:
            ranges[node] = get(first)
        elif node.op == "call_method" and node.target == "sigmoid":
            ranges[node] = (0.0, 1.0)
    return ranges
