"""merge_rows: affine ops on partitions, merged across the reshapes between them (official RepMLP).

A tensor read as rows ``(R, K)`` (row-major, ``R`` fixed) keeps its rows through any reshape that
keeps the element count, and a channels-first affine op whose samples are those rows (input
``(R, c, *spatial)``, ``c * prod(spatial) == K``) maps every row by one matrix plus a bias
(:func:`reparam.affine.unroll`).  So a chain ``reshape -> op -> reshape -> op ...`` from a source
``q`` is one per-row map of ``q``'s rows, and so is a sum of such chains on the same rows:

before: ``reshape(bn_S(reshape(fc3(reshape(q, (-1, K, 1, 1))), (-1, S, h, w)))) +
          reshape(conv_kxk(reshape(q, (-1, S, h, w))))``   (RepMLP: fc3, fc3_bn, the local convs)
after:  ``reshape(conv1x1_M(reshape(q, (-1, K, 1, 1))))`` with ``M`` the sum of the chains' maps,
        grouped as far as every op is (RepMLP: S groups, like its ``locality_injection``).

Precondition: every node of a chain but its end has one user and is not updated in place; each
op's samples are the rows (same ``R``); the chain starts with a literal reshape of the source and
every reshape inside is literal (partitions fixed by the model, not by the input size), and it ends
in an op or in a reshape that depends only on its size arguments (replayed on the merged output).
Refused with a reason: the merged 1x1 conv would cost more multiply-adds than the ops it replaces
(a lone conv is never unrolled into a dense matrix), or more than ``MAX_VALUES`` matrix entries.
Run after collapse, so each chain holds its merged kernels.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import reduce
from typing import Optional

import torch
import torch.fx as fx

from .. import affine as A
from ..emit import to_module
from ..lift import Constants, Lifter, Unary, _is_reshape, _reshape_source
from ..report import Report, Rewrite
from ..trace import node_shape, shape_meta
from .cleanup import finish
from .collapse import _has_path, _prefix, _where
from .mutation import real_users, updated_storage

MAX_VALUES = 1 << 26  # entries of one per-row matrix (float64: 512 MiB)
_ADDS = {operator.add, torch.add}


@dataclass
class Chain:
    """``end`` as a per-row map of ``source``: ``steps`` (Affine, sample shape) in order from the source."""

    source: fx.Node
    end: fx.Node
    nodes: list  # the chain's nodes, end first
    steps: list
    rows: Optional[int]

    def weighted(self) -> int:
        return sum(a.kind == "dense" for a, _ in self.steps)

    def macs(self) -> float:
        """Multiply-adds per row of the ops in the chain (a channelwise op: one per value)."""
        total = 0.0
        for a, sample in self.steps:
            out = a.out_channels * math.prod(a.out_size(sample[1:])) if a.nd else a.out_channels
            total += out * (math.prod(a.w.shape[1:]) if a.kind == "dense" else 1)
        return total

    def row_map(self) -> A.RowMap:
        maps = [A.unroll(a, sample) for a, sample in self.steps]
        return reduce(A.compose_rows, maps)


def _single_user(node: fx.Node) -> bool:
    return len(real_users(node)) == 1


def _affine_of(op, sample: tuple) -> Optional[A.Affine]:
    """The lifted op as an Affine on samples of ``sample``'s shape (scalar ops get a channel vector)."""
    if not isinstance(op, Unary) or not sample:
        return None
    if op.affine is not None:
        return op.affine
    c, layout = sample[0], A.Layout(len(sample) - 1)
    shift = None if op.shift == 0.0 else torch.full((c,), op.shift, dtype=torch.float64)
    return A.channelwise(torch.full((c,), op.scale, dtype=torch.float64), shift, layout)


def chain_of(end: fx.Node, lifter: Lifter, updated: set) -> Chain:
    """Walk back from ``end`` through reshapes and one-input affine ops with one user each."""
    nodes, steps, rows, cur = [], [], None, end
    while cur is end or (_single_user(cur) and cur not in updated):
        if _is_reshape(cur) and isinstance(_reshape_source(cur), fx.Node):
            src = _reshape_source(cur)
        else:
            try:
                op = lifter.lift(cur)
            except Exception:
                break
            shape = node_shape(op.source) if isinstance(op, Unary) else None
            aff = _affine_of(op, tuple(shape[1:]) if shape else ())
            if aff is None or (rows is not None and shape[0] != rows) or aff.nd != max(0, len(shape) - 2):
                break  # not an op on the rows as samples (channels-last ops only on (R, c))
            rows = shape[0]
            steps.append((aff, tuple(shape[1:])))
            src = op.source
        nodes.append(cur)
        cur = src
    return Chain(cur, end, nodes, steps[::-1], rows)


def _static_reshape(node: fx.Node) -> bool:
    """``x.reshape(-1, c, h, w)`` / ``.view`` with literal sizes: samples fixed by the model, not the input."""
    if node.op != "call_method" or node.target not in ("reshape", "view"):
        return False
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    return len(sizes) > 0 and all(isinstance(v, int) and not isinstance(v, bool) for v in sizes)


def _sized_reshape(node: fx.Node) -> bool:
    """A reshape whose result depends only on the data and its size arguments (not on the input's
    shape, as ``flatten`` / ``squeeze`` do): it can be replayed on a tensor of another shape."""
    return node.op == "call_method" and node.target in ("reshape", "view", "reshape_as", "view_as")


def _fixed_samples(chain: Chain) -> bool:
    """The chain starts with a literal reshape of its source and every reshape inside it is literal,
    so each op's samples have the same shape whatever the input size; its end is an op or a reshape
    that can be replayed on the merged conv's output."""
    inner = chain.nodes[1:]
    end_ok = not _is_reshape(chain.end) or _sized_reshape(chain.end)
    return end_ok and bool(inner) and _static_reshape(inner[-1]) and all(
        _static_reshape(n) for n in inner if _is_reshape(n))


def _candidates(gm: fx.GraphModule, lifter: Lifter, updated: set) -> list:
    """(end, chains) to merge, latest first: the sum of two chains, or one chain across a reshape."""
    out, taken = [], set()
    for node in reversed(list(gm.graph.nodes)):
        if node in taken:
            continue
        if node.op == "call_function" and node.target in _ADDS and len(node.args) == 2 and not node.kwargs \
                and all(isinstance(a, fx.Node) for a in node.args) and node.args[0] is not node.args[1]:
            chains = [chain_of(a, lifter, updated) for a in node.args]
            if not all(c.steps and _single_user(c.end) for c in chains):
                continue
        else:
            chains = [chain_of(node, lifter, updated)]
            if len(chains[0].steps) < 2:
                continue
        if all(_fixed_samples(c) and c.end not in updated for c in chains) and sum(c.weighted() for c in chains):
            out.append((node, chains))
            taken.update(n for c in chains for n in c.nodes)
    return out


def _merge(gm: fx.GraphModule, node: fx.Node, chains: list, report: Report) -> bool:
    """Replace ``node`` (a chain's end, or the sum of two) by one 1x1 conv over the rows of the source."""
    where = _where(node)
    first, shape = chains[0], node_shape(node)
    if len({c.source for c in chains}) != 1 or len({c.rows for c in chains}) != 1 or shape is None:
        return False  # not one source on one set of rows
    if any(node_shape(c.end) != shape for c in chains):
        return False  # a broadcasting sum
    k_in, k_out = math.prod(first.steps[0][1]), math.prod(shape) // first.rows
    if k_in * k_out > MAX_VALUES:
        report.refuse(where, f"per-row merge kept: a {k_out}x{k_in} matrix is too large")
        return False
    try:
        merged = A.add_rows([c.row_map() for c in chains])
    except A.Refusal as r:
        report.refuse(where, f"per-row merge kept: {r}")
        return False
    aff = A.from_rows(merged)
    old = sum(c.macs() for c in chains)
    if aff.macs() > old * (1 + 1e-9):
        report.refuse(where, f"per-row merge kept: one {aff.describe()} would cost more multiply-adds than the "
                             f"{sum(len(c.steps) for c in chains)} ops it replaces")
        return False
    module = to_module(aff, torch.float64, next((p.device for p in gm.parameters()), "cpu"))
    name = _fresh_name(gm, [node, *(n for c in chains for n in c.nodes)])
    gm.add_submodule(name, module)
    graph = gm.graph
    template = next((c.end for c in chains if _is_reshape(c.end)), None)
    with graph.inserting_before(node):
        flat = graph.call_method("reshape", (first.source, (-1, k_in, 1, 1)))
        conv = graph.call_module(name, (flat,))
        if template is not None:  # the end's own reshape (its sizes may follow the input's)
            out = graph.node_copy(template, lambda n: conv if n is _reshape_source(template) else n)
        else:  # every end is an op: its samples have a fixed shape
            out = graph.call_method("reshape", (conv, (-1, *shape[1:])))
    flat.meta["tensor_meta"] = shape_meta(first.source, (first.rows, k_in, 1, 1))
    conv.meta["tensor_meta"] = shape_meta(first.source, (first.rows, k_out, 1, 1))
    out.meta = dict(node.meta)
    node.replace_all_uses_with(out)
    before = " + ".join(f"{len(c.steps)} ops" for c in chains)
    report.rewrites.append(Rewrite(where, f"per-row chains ({before}) across reshapes", aff.describe(), ("merge_rows",)))
    return True


def _fresh_name(gm: fx.GraphModule, nodes) -> str:
    """``<block>.reparam_rows`` for the block that holds the replaced nodes (collapse's naming)."""
    base = _prefix(nodes)
    stem = f"{base}.reparam_rows" if base else "reparam_rows"
    name, i = stem, 1
    while _has_path(gm, name):
        name, i = f"{stem}_{i}", i + 1
    return name


def merge_rows(gm: fx.GraphModule, report: Report) -> int:
    """Merge per-row chains (see the module docstring); returns how many sums were merged."""
    lifter = Lifter(gm, Constants(gm))
    updated = updated_storage(gm)
    done = sum(_merge(gm, node, chains, report) for node, chains in _candidates(gm, lifter, updated))
    if done:
        finish(gm)
    return done
