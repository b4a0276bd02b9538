"""Residual removal (opt-in): ``act(Ak(...act(A1(x))) + S(x)) -> act(Ak'(...act(A1'(x))))``.

The block input ``x`` rides along in extra channels: ``A1' = [A1; P]`` where ``P`` is the centre tap
of A1's grid (a strided Dirac kernel), every middle conv gets a block-diagonal identity for the carried
channels, the activations pass them untouched, and the last conv adds the skip ``S`` (identity or a
pointwise projection such as ResNet's 1x1 downsample) applied to them.  Exact when every activation
is the identity on the carried values:

- ``x >= 0`` proven (value-range analysis) and every activation is identity on ``[0, max x]`` (ReLU;
  ReLU6 / Hardtanh only when ``x`` is proven to fit), or
- ``x`` of any sign and every activation is ReLU: carry ``[x, -x]``, the first ReLU makes them
  ``relu(x), relu(-x)`` and the last conv reads ``x = relu(x) - relu(-x)`` (twice the carried channels).

Anything else is refused with a reason (e.g. MobileNetV2's ReLU6 on an unbounded input).
Cost: the carried channels add MACs; the report says how many channels were added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from .. import affine as A
from ..emit import device_of, module_for
from ..match import ADD_FUNCTIONS_WITH_INPLACE, called_conv, conv_affine, node_shape
from ..proofs import no_origin, same_origin
from ..report import Report, Rewrite
from . import PassResult
from .cleanup import finish
from .mutation import real_users
from .ranges import ANY, activation_bounds, value_ranges

MAX_DEPTH = 8


@dataclass
class _Block:
    """A matched residual block: convs and activations of the body, the skip, the input."""

    add: fx.Node
    x: fx.Node
    convs: list[fx.Node]
    acts: list[fx.Node]
    skip: fx.Node | None


def _first_input(node: fx.Node) -> fx.Node | None:
    source = node.args[0] if node.args else None
    return source if isinstance(source, fx.Node) else None


def _match(add: fx.Node, body: fx.Node, other: fx.Node, modules: dict[str, nn.Module]) -> _Block | None:
    """``add(body, other)`` as a residual block: ``other`` is a pointwise projection of the block
    input, or the block input itself (tried in that order)."""
    x = _first_input(other)
    if called_conv(other, modules) is not None and len(other.users) == 1 and x is not None:
        block = _match_body(add, body, x, other, modules)
        if block is not None:
            return block
    return _match_body(add, body, other, None, modules)


def _match_body(
    add: fx.Node, body: fx.Node, x: fx.Node, skip: fx.Node | None, modules: dict[str, nn.Module]
) -> _Block | None:
    """Walk ``body`` back through conv / activation pairs (single users) until it reads ``x``."""
    convs, acts, n = [], [], body
    for _ in range(MAX_DEPTH):
        if called_conv(n, modules) is None or len(real_users(n)) != 1:
            return None
        convs.append(n)
        src = _first_input(n)
        if src is x:
            break
        if src is None or activation_bounds(src, modules) is None or len(real_users(src)) != 1:
            return None
        acts.append(src)
        after = _first_input(src)
        if after is None:
            return None
        n = after
    else:
        return None
    if len(convs) < 2:
        return None
    return _Block(add, x, convs[::-1], acts[::-1], skip)


def _carry_signs(block: _Block, x_range: tuple[float, float], modules: dict[str, nn.Module]) -> list[float]:
    """[+1] or [+1, -1] when the activations pass the carried values exactly; Refusal otherwise."""
    bounds = [b for b in (activation_bounds(a, modules) for a in block.acts) if b is not None]  # each one has some
    if x_range[0] >= 0:
        if all(lo <= 0 and x_range[1] <= hi for lo, hi in bounds):
            return [1.0]
        raise A.Refusal(
            "an activation would clip the carried input (its range is not proven to fit, e.g. ReLU6 "
            "on an input without a proven upper bound of 6)"
        )
    if bounds[0] == (0.0, math.inf) and all(lo <= 0 and hi == math.inf for lo, hi in bounds[1:]):
        return [1.0, -1.0]
    raise A.Refusal(
        "the block input can be negative and an activation is not ReLU, so it cannot be carried as relu(x) - relu(-x)"
    )


def _input_channels(block: _Block) -> int:
    shape = node_shape(block.x)
    if shape is None:
        raise A.Refusal("block input shape unknown")
    return shape[1]


def _rebuild(block: _Block, modules: dict[str, nn.Module], signs: list[float], channels: int) -> list[A.Affine]:
    """New affines for the body convs with the block's ``channels`` input channels carried; Refusal when the grids
    don't align."""
    affs = [conv_affine(_conv(c, modules)) for c in block.convs]
    layout = affs[0].layout
    skip = conv_affine(_conv(block.skip, modules)) if block.skip is not None else A.identity(channels, layout)
    total = tuple(math.prod(a.stride[i] for a in affs) for i in range(layout.nd))
    if any(k != 1 for k in skip.kernel) or skip.pads or skip.stride != total:
        raise A.Refusal("the skip is not a pointwise projection on the body's output grid")
    carried = channels * len(signs)
    first = A.concat([affs[0]] + [A.strided_identity(channels, layout, affs[0].stride, s) for s in signs])
    middle = [A.direct_sum(a, A.strided_identity(carried, layout, a.stride)) for a in affs[1:-1]]
    last = affs[-1]
    w_skip = A.regroup(skip, 1).weight.reshape(skip.out_channels, channels)
    carried_w = torch.cat([s * w_skip for s in signs], 1)
    full = torch.cat([carried_w.new_zeros(skip.out_channels, last.in_channels), carried_w], 1)
    ones = (1,) * layout.nd
    skip_on_grid = A.Affine(
        full.reshape(*full.shape, *ones), skip.bias, last.stride, (0,) * layout.nd, (0,) * layout.nd, ones, 1, layout
    )
    final = A.add([A.widen_inputs(last, carried), skip_on_grid])
    return [first] + middle + [final]


def _conv(node: fx.Node, modules: dict[str, nn.Module]) -> nn.modules.conv._ConvNd:
    """The conv a matched block's node calls (matched by :func:`reparam.match.called_conv`)."""
    conv = called_conv(node, modules)
    if conv is None:
        raise A.Refusal(f"{node.name} no longer calls a convolution")
    return conv


def remove_residuals(gm: fx.GraphModule, report: Report) -> PassResult:
    """Remove every residual add that can be removed exactly; ``changed``: how many (the carried channels
    widen tensors, so shapes go stale)."""
    modules = dict(gm.named_modules())
    ranges = value_ranges(gm)
    removed, created = 0, []
    for node in list(gm.graph.nodes):
        if (
            node.op != "call_function"
            or node.target not in ADD_FUNCTIONS_WITH_INPLACE
            or len(node.args) != 2
            or node.kwargs
        ):
            continue
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        block = _match(node, a, b, modules) or _match(node, b, a, modules)
        if block is None:
            continue
        where = str(block.convs[0].target).rsplit(".", 1)[0]
        try:
            signs = _carry_signs(block, ranges.get(block.x, ANY), modules)
            channels = _input_channels(block)
            carrying = [module_for(a, torch.float64, device_of(gm)) for a in _rebuild(block, modules, signs, channels)]
        except A.Refusal as r:
            report.refuse(where, f"residual kept: {r}")
            continue
        created += _rewire(gm, block, carrying)
        modules = dict(gm.named_modules())
        report.rewrites.append(
            Rewrite(
                where,
                f"{len(block.convs)} convs + residual add",
                f"plain chain carrying {channels * len(signs)} extra channels",
                ("remove_residual",),
            )
        )
        removed += 1
    if removed:
        finish(gm)
    return PassResult(removed, tuple(created), shapes_stale=removed > 0)


def _rewire(gm: fx.GraphModule, block: _Block, carrying: list[nn.Module]) -> list[str]:
    """The body convs replaced by ``carrying`` (one module each); returns their names."""
    names = []
    for conv, module in zip(block.convs, carrying, strict=True):
        name = f"{conv.target}_carry"
        gm.add_submodule(name, module)
        conv.target = name
        names.append(name)
        no_origin(conv)  # it computes the carried, wider tensor now
    same_origin(block.convs[-1], block.add)
    block.add.replace_all_uses_with(block.convs[-1])
    gm.graph.erase_node(block.add)
    return names
