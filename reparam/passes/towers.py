"""Horizontal fusion: parallel towers of the same structure become one tower (ResNeXt's equivalence).

    x -> [conv_i -> act -> conv_i' -> ... ]_i -> sum_i / cat_i      (n paths of identical shape)
 -> x -> concat(conv_i) -> act -> direct_sum(conv_i') -> ... -> sum_over_inputs / direct_sum

First layers (same input) are concatenated along output channels, later layers become one grouped
(block-diagonal) conv, element-wise activations run once on the concatenated tensor, and the join is
a conv over the concatenated channels (sum) or the concatenation itself (cat).  Precondition: every
path has the same sequence of ops with the same shapes, each node has one user, and the paths meet in
one sum tree or one channel concatenation.  Runs after collapse, so BatchNorms are already folded.
"""
from __future__ import annotations

import operator
from functools import reduce
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .. import affine as A
from ..emit import to_module
from ..proofs import same_origin
from ..report import Report, Rewrite
from ..trace import node_shape
from .cleanup import finish
from .mutation import real_users
from .residual import _affine, _conv

_ADDS = {operator.add, torch.add, operator.iadd}
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardtanh, nn.Identity, nn.Dropout)
_ELEMENTWISE_FUNCTIONS = {torch.relu, nn.functional.relu, nn.functional.gelu, nn.functional.silu,
                          torch.sigmoid, torch.tanh, nn.functional.hardswish, nn.functional.relu6}


def _signature(node: fx.Node, modules: dict):
    """What must be equal across paths at one step (None: not a tower op)."""
    m = _conv(node, modules)
    if m is not None:
        return ("conv", type(m), m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                m.groups, m.padding_mode, m.bias is not None)
    if node.op == "call_module" and isinstance(modules.get(node.target), _ELEMENTWISE):
        return ("act", repr(modules[node.target]))
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS and len(node.args) == 1:
        return ("fn", node.target, tuple(sorted(node.kwargs.items())))
    if node.op == "call_method" and node.target in ("relu", "sigmoid", "tanh") and len(node.args) == 1:
        return ("method", node.target)
    return None


def _single_user(node: fx.Node) -> Optional[fx.Node]:
    users = real_users(node)
    return users[0] if len(users) == 1 and len(node.users) == 1 else None


def _sum_tree(heads: list) -> Optional[tuple]:
    """(root add, other addends) when the heads meet in one tree of two-input adds; else None."""
    inside, frontier = set(), set()
    for h in heads:
        user = _single_user(h)
        if user is None or user.op != "call_function" or user.target not in _ADDS:
            return None
        frontier.add(user)
    while True:
        inside |= frontier
        nxt = set()
        for add in frontier:
            if len(add.args) != 2 or add.kwargs:
                return None
            user = _single_user(add)
            if user is not None and user.op == "call_function" and user.target in _ADDS and user not in inside:
                nxt.add(user)
        if not nxt:
            break
        frontier = nxt
    roots = [a for a in inside if not any(u in inside for u in a.users)]
    if len(roots) != 1:
        return None
    leaves = [arg for a in inside for arg in a.args if arg not in inside]
    if not all(h in leaves for h in heads) or len(leaves) != len(set(leaves)):
        return None
    extras = [arg for arg in leaves if arg not in heads]
    if any(not isinstance(e, fx.Node) for e in extras):
        return None
    return roots[0], extras


def _cat_join(heads: list) -> Optional[tuple]:
    user = _single_user(heads[0])
    if user is None or user.op != "call_function" or user.target not in (torch.cat, torch.concat):
        return None
    tensors = user.args[0] if user.args else user.kwargs.get("tensors")
    dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
    shape = node_shape(user)
    if shape is None or dim % len(shape) != 1 or len(tensors) != len(heads) or set(tensors) != set(heads) \
            or any(_single_user(h) is not user for h in heads):
        return None
    return user, list(tensors)


class _Towers:
    def __init__(self, x: fx.Node, steps: list, join: str, join_node: fx.Node, extras: list):
        self.x, self.steps, self.join, self.join_node, self.extras = x, steps, join, join_node, extras


def _find(x: fx.Node, first: list, modules: dict) -> Optional[_Towers]:
    """Follow the paths starting at ``first`` (convs on x) in lockstep up to their join."""
    steps, heads = [first], list(first)
    while True:
        if len(steps) > 1:  # a single layer of convs on x is the collapse pass's (merge_parallel/concat)
            found = _join(x, steps, heads, modules)
            if found is not None:
                return found
        nexts = [_single_user(h) for h in heads]
        if any(n is None or not n.args or n.args[0] is not h for n, h in zip(nexts, heads)):
            return None
        sig = _signature(nexts[0], modules)
        if sig is None or any(_signature(n, modules) != sig for n in nexts[1:]) or len(set(nexts)) != len(nexts):
            return None
        steps.append(nexts)
        heads = nexts


def _join(x: fx.Node, steps: list, heads: list, modules: dict) -> Optional[_Towers]:
    """The towers ending at ``heads``, if the heads meet in a sum (after convs) or a channel cat."""
    tree = _sum_tree(heads)
    if tree is not None:
        return _Towers(x, steps, "sum", tree[0], tree[1]) if _signature(heads[0], modules)[0] == "conv" else None
    cat = _cat_join(heads)
    if cat is not None:
        order = [heads.index(h) for h in cat[1]]
        return _Towers(x, [[step[i] for i in order] for step in steps], "cat", cat[0], [])
    return None


def merge_towers(gm: fx.GraphModule, report: Report) -> int:
    """Merge every set of parallel towers on one input; returns how many sets were merged."""
    modules = dict(gm.named_modules())
    merged = 0
    for x in list(gm.graph.nodes):
        groups: dict = {}
        for user in x.users:
            if user.args and user.args[0] is x and _conv(user, modules) is not None:
                groups.setdefault(_signature(user, modules), []).append(user)
        for first in groups.values():
            if len(first) < 2:
                continue
            towers = _find(x, first, modules)
            if towers is None:
                continue
            try:
                _rewrite(gm, towers, modules)
            except A.Refusal as r:
                report.refuse(str(first[0].target), f"parallel paths kept: {r}")
                continue
            modules = dict(gm.named_modules())
            report.rewrites.append(Rewrite(_where(first), f"{len(first)} parallel paths of {len(towers.steps)} ops",
                                           f"one path ({towers.join} join)", ("merge_towers",)))
            merged += 1
    if merged:
        finish(gm)
    return merged


def _where(first: list) -> str:
    return str(first[0].target).rsplit(".", 2)[0]


def _rewrite(gm: fx.GraphModule, towers: _Towers, modules: dict) -> None:
    graph, device = gm.graph, next(iter(gm.parameters())).device
    last_step = len(towers.steps) - 1
    plans = []
    for i, nodes in enumerate(towers.steps):
        if _conv(nodes[0], modules) is None:
            plans.append(None)
            continue
        affs = [_affine(modules[n.target]) for n in nodes]
        if i == 0:
            plans.append(A.concat(affs))
        elif i == last_step and towers.join == "sum":
            plans.append(A.sum_over_inputs(affs))
        else:
            plans.append(reduce(A.direct_sum, affs))
    current = towers.x
    for nodes, aff in zip(towers.steps, plans):
        with graph.inserting_before(towers.join_node):
            if aff is None:
                current = graph.node_copy(nodes[0], lambda n: current if n is nodes[0].args[0] else n)
            else:
                name = f"{nodes[0].target}_towers"
                gm.add_submodule(name, to_module(aff, torch.float64, device))
                current = graph.call_module(name, (current,))
    with graph.inserting_before(towers.join_node):
        for extra in towers.extras:
            current = graph.call_function(operator.add, (current, extra))
    same_origin(current, towers.join_node)
    towers.join_node.replace_all_uses_with(current)
