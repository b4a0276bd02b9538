"""Collapse affine regions: every maximal piece of graph that is affine in one input becomes one kernel.

This single pass subsumes the classic rules, each still counted and reported on its own:

- fold_bn:        conv -> BN, BN -> conv (only where exact), linear <-> BN1d
- merge_parallel: ``A1(x) + ... + An(x) -> A(x)`` (k×k, 1×k, k×1, 1×1, identity, BN-identity,
                  avg-pool, scale branches; BN after the sum)
- merge_concat:   ``cat([A1(x), ..., An(x)]) -> A(x)``
- compose:        ``B(A(x)) -> C(x)`` (k×k -> 1×1, 1×1 -> k×k when exact, Linear -> Linear)
- skip:           ``x + f(x)`` with f affine
- scale / pad / pool: layer scales, explicit zero pads, average pools folded into the conv

Algorithm (linear in graph size per round):
1. abstract interpretation in topological order: each node gets a *value* = (root tensor, Affine from
   the root, the set of original nodes it replaces).  An op on a node extends that node's value when
   :mod:`reparam.affine` allows it; otherwise the op starts a fresh region at its input, and the
   refusal is recorded with its reason.
2. frontier = nodes whose value is needed by something that is not absorbed (non-affine users, the
   output, refused compositions).  Each frontier becomes one module reading the root.
3. cuts: a node inside two regions (its work would be duplicated) and regions that would cost more
   MACs than they replace are cut at the offending point and step 1 runs again; cuts only grow, so
   this ends.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .. import affine as A
from .. import cost as C
from ..affine import Kind
from ..emit import device_of, no_single_module, to_module
from ..lift import Concat, Constants, Lifter, NotAffine, Op, OpKind, Sum, Unary, op_sources
from ..match import has_attr_path, node_shape
from ..proofs import REWRITE
from ..report import Report, Rewrite
from . import PassResult
from .mutation import eliminate_dead_code, is_metadata_user, mutation_barriers, real_users
from .naming import block_prefix, fresh_name, where


@dataclass
class Value:
    """``node == affine(root)``, replacing the original nodes in ``ops``."""

    root: fx.Node
    affine: A.Affine
    ops: frozenset[fx.Node]
    expanding: tuple[fx.Node, ...] = ()  # inputs where composing made the work larger
    joins: tuple[fx.Node, ...] = ()  # inputs of adds / concats inside the region
    last_join: tuple[fx.Node, ...] = ()  # inputs of the join nearest to this node (cut first when unprofitable)


@dataclass
class _State:
    values: dict[fx.Node, Value] = field(default_factory=dict)
    # node -> conv/linear MACs per root position (when shapes are unknown)
    cost: dict[fx.Node, float] = field(default_factory=dict)
    events: dict[fx.Node, tuple[str, ...]] = field(default_factory=dict)  # node -> rewrite kinds it contributes
    refusals: list[tuple[fx.Node, str]] = field(default_factory=list)


def collapse(gm: fx.GraphModule, report: Report, cost: C.CostModel | None = None) -> PassResult:
    """One round of the pass (see the module docstring): every affine region of ``gm`` that pays (``cost``, the
    MAC rule by default) as one kernel.

    ``PassResult.replaces`` names, for each module it emits, the call targets of the region's module calls
    (sorted by node name), so the pipeline can give it the dtype of the region's first weight."""
    return Collapse(gm, report, cost).run()


class Collapse:
    def __init__(self, gm: fx.GraphModule, report: Report, cost: C.CostModel | None = None):
        self.gm = gm
        self.report = report
        self.cost = cost if cost is not None else C.MacCost()  # asked whether each multi-op region pays
        self.constants = Constants(gm)
        self.lifter = Lifter(gm, self.constants)
        self.ops: dict[fx.Node, Op] = {}
        self.memo: dict[fx.Node, tuple] = {}
        self.order = {node: i for i, node in enumerate(gm.graph.nodes)}
        self.mutations = mutation_barriers(gm)
        self.updated = self.mutations.updated
        for node in gm.graph.nodes:
            if node in self.mutations.barriers:
                continue  # an in-place update could be reordered with it: its position in time matters
            if node.op in ("call_module", "call_function", "call_method"):
                try:
                    self.ops[node] = self.lifter.lift(node)
                except A.Refusal as r:  # an op one expects to fold, but not here (CannotLift too): say why
                    report.refuse(where(node), str(r))
                except NotAffine:  # not an affine op of its inputs: nothing to merge, nothing to say
                    pass

    # -- step 1: values ------------------------------------------------------------------------------
    def _root_identity(self, node: fx.Node, layout: A.Layout | None, channels: int | None = None) -> A.Affine | None:
        shape = node_shape(node)
        if layout is None:
            if shape is None:
                return None
            layout = A.Layout.of_rank(len(shape))
        if shape is not None and len(shape) >= 2:
            channels = shape[layout.channel_axis(len(shape))]
        if channels is None:
            return None
        return A.identity(channels, layout)

    def _input(self, state: _State, node: fx.Node, cut: set) -> Value | None:
        return None if node in cut else state.values.get(node)

    def _unary(self, state: _State, node: fx.Node, op: Unary, cut: set) -> Value | None:
        base = self._input(state, op.source, cut)
        aff = op.affine
        if aff is None:  # scalar op or identity: take the layout of what it acts on
            start = base.affine if base else self._root_identity(op.source, None)
            if start is None:
                return None
            channels, layout = start.out_channels, start.layout
            if op.kind is OpKind.IDENTITY or (op.scale == 1.0 and op.shift == 0.0):
                aff = A.identity(channels, layout)
            else:
                shift = None if op.shift == 0.0 else torch.full((channels,), op.shift, dtype=torch.float64)
                aff = A.channelwise(torch.full((channels,), op.scale, dtype=torch.float64), shift, layout)
        events: tuple[str, ...] = (_EVENT[op.kind],) if op.kind in _EVENT and aff.kind is not Kind.IDENTITY else ()
        stride_in = base.affine.stride if base else ()
        state.cost[node] = _op_cost(op.kind, aff, stride_in)
        if base is not None:
            try:
                composed = A.compose(base.affine, aff)
                heavy = base.affine.kind is Kind.DENSE and aff.kind is Kind.DENSE
                if heavy:
                    events += ("compose",)
                expanding = base.expanding
                if heavy and composed.macs() > base.affine.macs() + aff.macs() / max(1, math.prod(stride_in)):
                    expanding += (op.source,)
                state.events[node] = events
                return Value(base.root, composed, base.ops | {node}, expanding, base.joins, base.last_join)
            except A.Refusal as r:
                state.refusals.append((node, str(r)))
        start = self._root_identity(op.source, aff.layout, aff.in_channels)
        if start is None or start.out_channels != aff.in_channels:
            return None
        state.cost[node] = _op_cost(op.kind, aff, ())
        state.events[node] = events
        return Value(op.source, aff, frozenset({node}))

    def _terms(self, state: _State, sources: list[fx.Node], cut: set) -> tuple[list[Value], int] | None:
        """Values (or root identities) of a join's inputs, all from one root; None otherwise."""
        bases = [self._input(state, s, cut) for s in sources]
        roots = {b.root if b else s for b, s in zip(bases, sources, strict=True)}
        if len(roots) != 1:
            common = self._common_root(bases, sources, roots, cut)
            if common is None:
                return None
            bases = common
        layout = next((b.affine.layout for b in bases if b), None)
        terms, skips = [], 0
        for b, s in zip(bases, sources, strict=True):
            if b is not None:
                terms.append(b)
                continue
            ident = self._root_identity(s, layout)
            if ident is None:
                return None
            terms.append(Value(s, ident, frozenset()))
            skips += 1
        return terms, skips

    def _common_root(
        self, bases: list[Value | None], sources: list[fx.Node], roots: set[fx.Node], cut: set
    ) -> list[Value | None] | None:
        """Join inputs with different roots, re-expressed from the one root every path goes through.

        before: ``A(x) -> x1``, terms ``B(A(x))`` (B composed through A) and ``C(x1)`` (C refused to
        compose, e.g. a zero-padded k×k after a biased 1×1): roots x and x1, nothing merges.
        after:  terms ``B(x1)`` and ``C(x1)``: the join merges from x1, and x1 = A(x) stays one kernel.
        Precondition: every term rooted elsewhere absorbed the chosen root (it lies on the term's
        path); a term that *is* that root becomes the identity.  None if no root qualifies.
        """
        for root in sorted(roots, key=self.order.__getitem__, reverse=True):  # latest first: deterministic
            if not all(
                s == root or (b is not None and (b.root == root or root in b.ops))
                for b, s in zip(bases, sources, strict=True)
            ):
                continue
            rebased = [
                None if s == root or b is None else b if b.root == root else self._rebase(b, s, root, cut)
                for b, s in zip(bases, sources, strict=True)
            ]
            if all(r is not None or s == root for r, s in zip(rebased, sources, strict=True)):
                return rebased
        return None

    def _rebase(self, value: Value, source: fx.Node, root: fx.Node, cut: set) -> Value | None:
        """``source``'s value re-derived with ``root`` cut (so it starts at ``root``); None if it does not."""
        scratch = _State()  # refusals, costs and events of this re-derivation were recorded already
        cut = cut | {root}
        for node in sorted(value.ops, key=self.order.__getitem__):
            found = self._derive(scratch, node, self.ops[node], cut)
            if found is not None:
                scratch.values[node] = found
        found = scratch.values.get(source)
        return found if found is not None and found.root == root else None

    def _derive(self, state: _State, node: fx.Node, op: Op, cut: set) -> Value | None:
        """``node``'s value from its op's inputs (step 1 for one node)."""
        if isinstance(op, Unary):
            return self._unary(state, node, op, cut)
        if isinstance(op, Sum):
            return self._sum(state, node, op, cut)
        return self._concat(state, node, op, cut)

    def _join(
        self,
        state: _State,
        node: fx.Node,
        sources: list[fx.Node],
        build: Callable[[list[A.Affine]], A.Affine],
        kind: str,
        cut: set,
    ) -> Value | None:
        found = self._terms(state, sources, cut)
        if found is None:
            return None
        terms, skips = found
        try:
            aff = build([t.affine for t in terms])
        except A.Refusal as r:
            state.refusals.append((node, str(r)))
            return None
        ops = frozenset[fx.Node]().union(*(t.ops for t in terms)) | {node}
        state.events[node] = (kind,) + ("skip",) * (skips if kind == "merge_parallel" else 0)
        expanding = tuple(x for t in terms for x in t.expanding)
        joins = tuple(x for t in terms for x in t.joins) + tuple(sources)
        return Value(terms[0].root, aff, ops, expanding, joins, tuple(sources))

    def _sum(self, state: _State, node: fx.Node, op: Sum, cut: set) -> Value | None:
        coeffs = [c for _, c in op.terms]

        def build(affines: list[A.Affine]) -> A.Affine:
            scaled = [a if c == 1.0 else A.compose(a, _scale(a, c)) for a, c in zip(affines, coeffs, strict=True)]
            return A.add(scaled)

        return self._join(state, node, [t for t, _ in op.terms], build, "merge_parallel", cut)

    def _concat(self, state: _State, node: fx.Node, op: Concat, cut: set) -> Value | None:
        shape = node_shape(node)
        if shape is None:
            return None
        rank, dim = len(shape), op.dim % len(shape)

        def build(affines: list[A.Affine]) -> A.Affine:
            layout = affines[0].layout
            if dim != layout.channel_axis(rank):
                raise A.Refusal("concatenation is not along the channel axis")
            return A.concat(affines)

        return self._join(state, node, op.sources, build, "merge_concat", cut)

    def evaluate(self, cut: set) -> _State:
        """Values of every node given the cuts; a node whose inputs' values are unchanged since the
        previous call reuses its result (so re-planning after a cut costs little)."""
        state = _State()
        for node in self.gm.graph.nodes:
            op = self.ops.get(node)
            if op is None:
                continue
            inputs = tuple(self._input(state, s, cut) for s in op_sources(op)) + (node in cut,)
            cached = self.memo.get(node)
            if (
                cached is not None
                and len(cached[0]) == len(inputs)
                and all(a is b for a, b in zip(cached[0], inputs, strict=True))
            ):
                value, cost, events, refusals = cached[1]
                if cost is not None:
                    state.cost[node] = cost
                if events is not None:
                    state.events[node] = events
                state.refusals += refusals
            else:
                mark = len(state.refusals)
                value = self._derive(state, node, op, cut)
                self.memo[node] = (inputs, (value, state.cost.get(node), state.events.get(node), state.refusals[mark:]))
            if value is not None:
                state.values[node] = value
        return state

    # -- step 2 and 3: frontiers and cuts --------------------------------------------------------------
    def frontiers(self, state: _State, cut: set) -> list[fx.Node]:
        out = []
        for node in state.values:
            users = real_users(node)
            absorbed = all(node not in cut and u in state.values and node in state.values[u].ops for u in users)
            if users and not absorbed:
                out.append(node)
        return out

    def _decide(self, state: _State, f: fx.Node, value: Value) -> C.Decision:
        """The cost model's word on replacing the region ``value`` (ending at ``f``) by one module."""
        return C.ask(self.cost, self._candidate(state, f, value), self.report)

    def _candidate(self, state: _State, f: fx.Node, value: Value) -> C.Candidate:
        """The region as a :class:`~reparam.cost.Candidate`: MACs from the recorded shapes (per root position, in
        the same currency, where a shape is unknown); the forms are built only when a measuring model asks (the
        merged one without its weights: :func:`reparam.cost.stand_in`)."""
        weighted = self._weighted(value)
        shapes = [s for s in (node_shape(n) for n, _ in weighted) if s is not None]
        out, root = node_shape(f), node_shape(value.root)
        if out is not None and len(shapes) == len(weighted):
            before = sum(C.conv_macs(aff, s) for (_, aff), s in zip(weighted, shapes, strict=True))
            after = C.affine_macs(value.affine, out)
        else:
            before = sum(state.cost.get(n, 0.0) for n in value.ops)
            after = value.affine.macs() if C.emits_conv(value.affine) else 0.0
        events = {e for n in value.ops for e in state.events.get(n, ())}
        kind = next((k for k in ("merge_concat", "merge_parallel", "compose", "skip") if k in events), "fold")
        return C.Candidate(
            where=block_prefix(value.ops) or f.name,
            kind=kind,
            before_macs=before,
            after_macs=after,
            before_kernels=sum(self._kernels(n) for n in value.ops),
            after_kernels=C.emitted_kernels(value.affine),
            input_shapes=(torch.Size(root),) if root is not None else (),
            before=lambda: C.subgraph_module(self.gm, [value.root], [f]),
            after=lambda: to_module(C.stand_in(value.affine), torch.float64, "meta"),
        )

    def _kernels(self, node: fx.Node) -> int:
        """Kernels ``node`` launches as it is: none for a no-op, one for any other op."""
        op = self.ops[node]
        return 0 if isinstance(op, Unary) and op.kind is OpKind.IDENTITY else 1

    def plan(self) -> tuple[_State, list[fx.Node]]:
        cut: set = set()
        declined: set = set()
        refused: list = []  # (node, reason) of regions the cost model refused: they stay refused as cuts grow
        while True:
            state = self.evaluate(cut)
            frontiers = self.frontiers(state, cut)
            membership = Counter(n for f in frontiers for n in state.values[f].ops)
            shared = {n for n, c in membership.items() if c > 1}
            # cut where the shared part ends (its outputs leave it), so it is computed once
            new_cuts = {n for n in shared if any(u not in shared for u in real_users(n))}
            for f in frontiers:
                value = state.values[f]
                if len(value.ops) < 2 or f in declined or not self._emits(value):
                    continue
                decision = self._decide(state, f, value)
                if decision.merge:
                    continue
                # cut where composing grew the work, else at the nearest join, else at every join
                points = set()
                for candidates in (value.expanding, value.last_join, value.joins):
                    points = {p for p in candidates if p in state.values} - cut
                    if points:
                        break
                if points:
                    new_cuts |= points
                    refused += [(p, decision.reason) for p in sorted(points, key=self.order.__getitem__)]
                else:
                    declined.add(f)
                    refused.append((f, decision.reason))
            new_cuts -= cut
            if not new_cuts:
                state.refusals += refused
                self._record_refusals(state)
                return state, [f for f in frontiers if f not in declined]
            cut |= new_cuts

    def _record_refusals(self, state: _State) -> None:
        for node, reason in state.refusals:
            self.report.refuse(where(node), reason)

    # -- materialisation ---------------------------------------------------------------------------------
    def run(self) -> PassResult:
        state, frontiers = self.plan()
        done = 0
        replaced: dict[fx.Node, fx.Node] = {}  # frontier -> its replacement, so later regions read the new node
        created: dict[str, tuple[str, ...]] = {}  # emitted module -> the module calls of its region
        for f in frontiers:
            if self._materialize(state, f, replaced, created):
                done += 1
        if done:
            eliminate_dead_code(self.gm)
            self.gm.delete_all_unused_submodules()
        created = {name: region for name, region in created.items() if has_attr_path(self.gm, name)}  # still read
        return PassResult(done, tuple(created), replaces=created)

    def _materialize(
        self, state: _State, f: fx.Node, replaced: dict[fx.Node, fx.Node], created: dict[str, tuple[str, ...]]
    ) -> bool:
        value = state.values[f]
        aff = value.affine
        graph = self.gm.graph
        root = replaced.get(value.root, value.root)
        if aff.kind is Kind.IDENTITY and not aff.pads:
            replacement = root
            if node_shape(replacement) != node_shape(f) and node_shape(f) is not None:
                return False
            if root in self.mutations.shared:  # f would become an alias of a storage updated in place
                return False
            if f in self.updated:  # an in-place update of f would then write into root (the caller's input, say)
                return False
        else:
            if len(value.ops) < 2:
                return False
            if aff.kind not in (Kind.DIAGONAL, Kind.PAD) and not self._has_weights(value):
                return False  # pools/pads/BNs alone: emitting a conv would add a conv
            expected = _expected_shape(value)
            if expected is not None and node_shape(f) is not None and expected != node_shape(f):
                return False
            module = to_module(aff, torch.float64, device_of(self.gm))
            if module is None:
                self.report.refuse(where(f), str(no_single_module(aff)))
                return False
            name = fresh_name(self.gm, value.ops, "reparam")
            self.gm.add_submodule(name, module)
            created[name] = tuple(str(n.target) for n in _ordered(value.ops) if n.op == "call_module")
            with graph.inserting_after(_insertion_point(root)):
                replacement = graph.call_module(name, (root,))
            replacement.meta.update(f.meta)
        f.replace_all_uses_with(replacement)
        replaced[f] = replacement
        for node in value.ops:
            for user in list(node.users):
                if is_metadata_user(user):
                    user.replace_input_with(node, replacement)
        rewrite = self._report(state, f, value, aff)
        if rewrite is not None and replacement is not root:
            replacement.meta[REWRITE] = f"{rewrite.before} -> {rewrite.after}"  # named by the proofs on failure
        return True

    def _emits(self, value: Value) -> bool:
        """The region would become a module of its own (a channel-wise op or pad, or a region holding a conv or
        linear): :meth:`_materialize` leaves pools / pads / BNs alone rather than adding a conv."""
        return value.affine.kind in (Kind.IDENTITY, Kind.DIAGONAL, Kind.PAD) or self._has_weights(value)

    def _has_weights(self, value: Value) -> bool:
        """The region holds a conv or linear (so its one conv replaces at least one)."""
        return bool(self._weighted(value))

    def _weighted(self, value: Value) -> list[tuple[fx.Node, A.Affine]]:
        """The region's convs and linears, with their affines."""
        return [
            (n, op.affine)
            for n, op in ((n, self.ops[n]) for n in value.ops)
            if isinstance(op, Unary) and op.kind in (OpKind.CONV, OpKind.LINEAR) and op.affine is not None
        ]

    def _report(self, state: _State, f: fx.Node, value: Value, aff: A.Affine) -> Rewrite | None:
        events = tuple(e for n in _ordered(value.ops) for e in state.events.get(n, ()))
        # no-ops (nn.Identity placeholders, eval dropout, undone reshapes) are not branches: not listed
        kinds = Counter(d for d in (self._describe(n) for n in _ordered(value.ops)) if d != OpKind.IDENTITY)
        before = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in kinds.items()) or "no-op"
        after = "no-op" if aff.kind is Kind.IDENTITY else aff.describe()
        if not events and before == after:
            return None  # nothing was merged or folded (identity -> identity, a lone linear): not a rewrite
        rewrite = Rewrite(block_prefix(value.ops) or f.name, before, after, events)
        self.report.rewrites.append(rewrite)
        return rewrite

    def _describe(self, node: fx.Node) -> str:
        op = self.ops[node]
        if isinstance(op, Unary):
            return op.affine.describe() if op.kind in (OpKind.CONV, OpKind.LINEAR) and op.affine else op.kind.value
        return "add" if isinstance(op, Sum) else "cat"


def _scale(a: A.Affine, c: float) -> A.Affine:
    """``c * y`` for the output ``y`` of ``a``, channelwise."""
    return A.channelwise(torch.full((a.out_channels,), c, dtype=torch.float64), None, a.layout)


_EVENT = {
    OpKind.BATCHNORM: "fold_bn",
    OpKind.SCALE: "scale",
    OpKind.SHIFT: "scale",
    OpKind.PAD: "pad",
    OpKind.AVGPOOL: "pool",
}


def _op_cost(kind: OpKind, aff: A.Affine, stride_in: Sequence[int]) -> float:
    """Conv / linear MACs per root position (the estimate where shapes are unknown); in the currency of
    FlopCounterMode every other op (BN, scale, pad, pool) costs nothing."""
    if kind not in (OpKind.CONV, OpKind.LINEAR):
        return 0.0
    return aff.macs() / (max(1, math.prod(stride_in)) if stride_in else 1)


def _expected_shape(value: Value) -> tuple[int, ...] | None:
    shape = node_shape(value.root)
    if shape is None:
        return None
    aff = value.affine
    if aff.layout.channels_last:
        return shape[:-1] + (aff.out_channels,)
    return (shape[0], aff.out_channels) + aff.out_size(shape[2:])


def _insertion_point(root: fx.Node) -> fx.Node:
    if root.op != "placeholder":
        return root
    last = root
    for node in root.graph.nodes:
        if node.op == "placeholder":
            last = node
    return last


def _ordered(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    return sorted(nodes, key=lambda n: n.name)
