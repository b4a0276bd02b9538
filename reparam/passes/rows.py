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
from dataclasses import dataclass
from functools import reduce

import torch
import torch.fx as fx

from .. import affine as A
from ..affine import Kind
from ..emit import device_of, module_for
from ..lift import Constants, Lifter, NotAffine, Op, Unary, is_reshape, reshape_source
from ..match import ADD_FUNCTIONS, node_shape, shape_meta
from ..report import Report, Rewrite
from . import PassResult
from .cleanup import finish
from .mutation import real_users, updated_storage
from .naming import fresh_name, where

MAX_VALUES = 1 << 26  # entries of one per-row matrix (float64: 512 MiB)


@dataclass
class Chain:
    """``end`` as a per-row map of ``source``: ``steps`` (Affine, sample shape) in order from the source."""

    source: fx.Node
    end: fx.Node
    nodes: list[fx.Node]  # the chain's nodes, end first
    steps: list[tuple[A.Affine, tuple[int, ...]]]
    rows: int | None

    def weighted(self) -> int:
        return sum(a.kind is Kind.DENSE for a, _ in self.steps)

    def macs(self) -> float:
        """Multiply-adds per row of the ops in the chain (a channelwise op: one per value)."""
        total = 0.0
        for a, sample in self.steps:
            out = a.out_channels * math.prod(a.out_size(sample[1:])) if a.nd else a.out_channels
            total += out * (math.prod(a.w.shape[1:]) if a.kind is Kind.DENSE else 1)
        return total

    def row_map(self) -> A.RowMap:
        maps = [A.unroll(a, sample) for a, sample in self.steps]
        return reduce(A.compose_rows, maps)


def _single_user(node: fx.Node) -> bool:
    return len(real_users(node)) == 1


def _affine_of(op: Op, sample: tuple[int, ...]) -> A.Affine | None:
    """The lifted op as an Affine on samples of ``sample``'s shape (scalar ops get a channel vector)."""
    if not isinstance(op, Unary) or not sample:
        return None
    if op.affine is not None:
        return op.affine
    c, layout = sample[0], A.Layout(len(sample) - 1)
    shift = None if op.shift == 0.0 else torch.full((c,), op.shift, dtype=torch.float64)
    return A.channelwise(torch.full((c,), op.scale, dtype=torch.float64), shift, layout)


def chain_of(end: fx.Node, lifter: Lifter, updated: set[fx.Node]) -> Chain:
    """Walk back from ``end`` through reshapes and one-input affine ops with one user each."""
    nodes: list[fx.Node] = []
    steps: list[tuple[A.Affine, tuple[int, ...]]] = []
    rows: int | None = None
    cur = end
    while cur is end or (_single_user(cur) and cur not in updated):
        reshaped = reshape_source(cur) if is_reshape(cur) else None
        if isinstance(reshaped, fx.Node):
            src = reshaped
        else:
            try:
                op = lifter.lift(cur)
            except (NotAffine, A.Refusal):  # not a step of a chain (a refusal is collapse's to report)
                break
            if not isinstance(op, Unary):
                break
            shape = node_shape(op.source)
            aff = _affine_of(op, tuple(shape[1:]) if shape else ())
            if (
                shape is None
                or aff is None
                or (rows is not None and shape[0] != rows)
                or aff.nd != max(0, len(shape) - 2)
            ):
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
    sizes: tuple | list = node.args[1:]
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
    end_ok = not is_reshape(chain.end) or _sized_reshape(chain.end)
    return (
        end_ok
        and bool(inner)
        and _static_reshape(inner[-1])
        and all(_static_reshape(n) for n in inner if is_reshape(n))
    )


def _candidates(gm: fx.GraphModule, lifter: Lifter, updated: set[fx.Node]) -> list[tuple[fx.Node, list[Chain]]]:
    """(end, chains) to merge, latest first: the sum of two chains, or one chain across a reshape."""
    out: list[tuple[fx.Node, list[Chain]]] = []
    taken: set[fx.Node] = set()
    for node in reversed(list(gm.graph.nodes)):
        if node in taken:
            continue
        if (
            node.op == "call_function"
            and node.target in ADD_FUNCTIONS
            and len(node.args) == 2
            and not node.kwargs
            and all(isinstance(a, fx.Node) for a in node.args)
            and node.args[0] is not node.args[1]
        ):
            chains = [chain_of(a, lifter, updated) for a in node.args]
            if not all(c.steps and _single_user(c.end) for c in chains):
                continue
        else:
            chains = [chain_of(node, lifter, updated)]
            if len(chains[0].steps) < 2:
                continue
        if all(_fixed_samples(c) and c.end not in updated for c in chains) and any(c.weighted() for c in chains):
            out.append((node, chains))
            taken.update(n for c in chains for n in c.nodes)
    return out


def _merge(gm: fx.GraphModule, node: fx.Node, chains: list[Chain], report: Report) -> str | None:
    """Replace ``node`` (a chain's end, or the sum of two) by one 1x1 conv over the rows of the source; returns
    the name of the conv's module (None: left as it is)."""
    site = where(node)
    first, shape = chains[0], node_shape(node)
    if (
        len({c.source for c in chains}) != 1
        or len({c.rows for c in chains}) != 1
        or shape is None
        or first.rows is None
    ):
        return None  # not one source on one set of rows
    if any(node_shape(c.end) != shape for c in chains):
        return None  # a broadcasting sum
    k_in, k_out = math.prod(first.steps[0][1]), math.prod(shape) // first.rows
    if k_in * k_out > MAX_VALUES:
        report.refuse(site, f"per-row merge kept: a {k_out}x{k_in} matrix is too large")
        return None
    try:
        merged = A.add_rows([c.row_map() for c in chains])
        aff = A.from_rows(merged)
        old = sum(c.macs() for c in chains)
        if aff.macs() > old * (1 + 1e-9):
            raise A.Refusal(
                f"one {aff.describe()} would cost more multiply-adds than the "
                f"{sum(len(c.steps) for c in chains)} ops it replaces"
            )
        module = module_for(aff, torch.float64, device_of(gm))
    except A.Refusal as r:
        report.refuse(site, f"per-row merge kept: {r}")
        return None
    name = fresh_name(gm, [node, *(n for c in chains for n in c.nodes)], "reparam_rows")
    gm.add_submodule(name, module)
    graph = gm.graph
    template = next((c.end for c in chains if is_reshape(c.end)), None)
    with graph.inserting_before(node):
        flat = graph.call_method("reshape", (first.source, (-1, k_in, 1, 1)))
        conv = graph.call_module(name, (flat,))
        if template is not None:  # the end's own reshape (its sizes may follow the input's)
            reshaped = reshape_source(template)
            out = graph.node_copy(template, lambda n: conv if n is reshaped else n)
        else:  # every end is an op: its samples have a fixed shape
            out = graph.call_method("reshape", (conv, (-1, *shape[1:])))
    flat.meta["tensor_meta"] = shape_meta(first.source, (first.rows, k_in, 1, 1))
    conv.meta["tensor_meta"] = shape_meta(first.source, (first.rows, k_out, 1, 1))
    out.meta = dict(node.meta)
    node.replace_all_uses_with(out)
    before = " + ".join(f"{len(c.steps)} ops" for c in chains)
    report.rewrites.append(Rewrite(site, f"per-row chains ({before}) across reshapes", aff.describe(), ("merge_rows",)))
    return name


def merge_rows(gm: fx.GraphModule, report: Report) -> PassResult:
    """Merge per-row chains (see the module docstring); ``changed``: how many were merged (the new nodes carry
    their shapes)."""
    lifter = Lifter(gm, Constants(gm))
    updated = updated_storage(gm)
    created = [
        name
        for name in (_merge(gm, node, chains, report) for node, chains in _candidates(gm, lifter, updated))
        if name is not None
    ]
    if created:
        finish(gm)
    return PassResult(len(created), tuple(created))
