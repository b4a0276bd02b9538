"""Local proofs: every rewritten region of a fused graph checked against the subgraph it replaced, in
float64, on the activations that subgraph really receives.

Every node of a traced graph is tagged with its *origin* (its own name) before the passes run; a node a
pass creates takes the origin of the node whose value it now computes (the collapse pass copies the
replaced node's ``meta``; the tower and residual passes tag their last node).  One run of the unfused
graph records the value of every origin.  The fused graph is then run *teacher-forced*: each node whose
origin is known is compared with the original value there and replaced by it before its users run,
so a rounding difference never travels and every disagreement points at the region that made it.

Tolerance per region: ``NOISE_FACTOR`` times the original subgraph's own float64 noise there, measured by
the same run of a differently rounded twin (weights scaled by ``1 + 4 ulp``), and at least ``LOCAL_FLOOR``.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_structure

from . import trace as T
from .errors import EquivalenceError, one_line
from .interface import match_containers, restore_containers
from .shape_run import NeedsValues, StandIns
from .snapshot import GraphSnapshot
from .taps import TapCoverage, TapsUnread, reads_every_tap, unmatched_shared
from .verify import NOISE_FACTOR, compare_outputs, fresh, perturbed, relative_error, worst_leaf

ORIGIN = "reparam_origin"
REWRITE = "reparam_rewrite"  # node meta: what the pass that made the node rewrote ("3x3 conv, batchnorm -> ...")
PROOF_TRIGGER = 1e-11  # an end-to-end error above this is examined region by region
LOCAL_FLOOR = 1e-14  # a region this close to what it replaced (relative L2) is proven without more ado


def tag_origins(gm: fx.GraphModule) -> None:
    """before -> after: nodes without origins -> every node's ``meta[ORIGIN]`` is its own name."""
    for node in gm.graph.nodes:
        node.meta[ORIGIN] = node.name


def same_origin(new: fx.Node, old: fx.Node) -> None:
    """``new`` now computes the value ``old`` computed (a pass replaced ``old`` by ``new``)."""
    if ORIGIN in old.meta:
        new.meta[ORIGIN] = old.meta[ORIGIN]


def no_origin(node: fx.Node) -> None:
    """``node``'s value is no longer the one its origin had (e.g. a conv widened to carry channels)."""
    node.meta.pop(ORIGIN, None)


class Pristine:
    """An unfused twin of a traced graph to prove the rewrites against: a copy of its graph before the passes,
    and the submodules and tensors that graph reads (shared, not copied).

    The twin's GraphModule (:meth:`module`) is built only when a proof needs it: building one generates and
    compiles its Python code, a tenth of a second for a graph of a thousand nodes, and most fusions are exact
    enough end to end that no proof runs.  Sharing is sound because the passes never modify a module or tensor
    in place: they build new ones.
    """

    def __init__(self, gm: fx.GraphModule):
        self.graph = GraphSnapshot(gm.graph)  # its nodes as they are; an fx graph is built from them on demand
        self._name = type(gm).__name__
        self._refs = {
            n.target: _attribute(gm, n.target) for n in self.graph.nodes if n.op in ("call_module", "get_attr")
        }
        self._module: fx.GraphModule | None = None

    def graph_and_modules(self) -> tuple[GraphSnapshot, dict]:
        """The twin's nodes and ``target -> module`` for the modules it calls (without building the twin)."""
        return self.graph, {k: v for k, v in self._refs.items() if isinstance(v, nn.Module)}

    def module(self) -> fx.GraphModule:
        """The twin as a GraphModule (built on the first call)."""
        if self._module is None:
            self._module = fx.GraphModule(self._refs, self.graph.graph(), self._name)
        return self._module


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def pristine_copy(gm: fx.GraphModule) -> Pristine:
    """An unfused twin of ``gm`` (same submodules, its own graph) to prove the rewrites against."""
    return Pristine(gm)


@dataclass
class Disproof:
    """A region whose fused form disagrees with what it replaced."""

    where: str  # module path of the fused kernel (or the node name)
    error: float  # relative L2 error
    allowed: float
    rewrite: str = ""  # what was rewritten into it

    def __str__(self) -> str:
        why = ", from the original's own float64 noise there" if self.allowed > LOCAL_FLOOR else ""
        what = f" ({self.rewrite})" if self.rewrite else ""
        return (
            f"region {self.where}{what}: the fused kernel disagrees with the subgraph it replaces, relative "
            f"error {self.error:.3e} on the activations it receives (allowed {self.allowed:.1e}{why})"
        )


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set):
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.wanted and isinstance(value, torch.Tensor):
            self.values[n.name] = value.detach().clone()
        return value


class _TeacherForced(fx.Interpreter):
    """Runs a graph with each node whose origin was recorded reset to the recorded value after it ran;
    ``errors``: origin -> (where, relative error of the node's own value there, the rewrite that made it)."""

    def __init__(self, gm: fx.GraphModule, original: dict):
        super().__init__(gm)
        self.original = original
        self.errors: dict = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        origin = n.meta.get(ORIGIN)
        want = self.original.get(origin) if origin is not None else None
        if want is None or not isinstance(value, torch.Tensor) or value.shape != want.shape:
            return value
        if value.dtype != want.dtype or not value.is_floating_point():
            return want.clone() if torch.equal(value, want) else value
        self.errors[origin] = (_where(n), relative_error(value, want, absolute_at_zero=True), n.meta.get(REWRITE, ""))
        return want.clone()  # what the original computed there: each region is proven on its own


def _where(n: fx.Node) -> str:
    return str(n.target) if n.op == "call_module" else n.name


def prove(fused: fx.GraphModule, pristine: Pristine, inputs: tuple) -> tuple[float, list]:
    """(worst relative error of a region, the regions that disagree) for ``fused`` against ``pristine``
    (its unfused twin from :func:`pristine_copy`) on the float64 ``inputs``.

    Each region's error is judged against the original subgraph's own float64 noise there: the same
    teacher-forced run of a differently rounded twin (:func:`reparam.verify.perturbed`).  A region is
    disproven beyond ``NOISE_FACTOR`` times that noise (and ``LOCAL_FLOOR``): a region whose output is
    dominated by a large shift hides a wrong weight in its 10th digit, which a deep net may amplify.
    """
    pristine = pristine.module()
    wanted = {n.meta[ORIGIN] for n in fused.graph.nodes if ORIGIN in n.meta}
    recorder = _Recorder(pristine, wanted)
    with torch.no_grad():
        recorder.run(*fresh(inputs))
    errors = _forced_errors(fused, recorder.values, inputs)
    suspects = {o: e for o, e in errors.items() if not e[1] <= LOCAL_FLOOR}
    noise = _forced_errors(perturbed(pristine), recorder.values, inputs) if suspects else {}
    disproofs = []
    for origin, (where, err, rewrite) in suspects.items():
        allowed = max(LOCAL_FLOOR, NOISE_FACTOR * noise.get(origin, ("", 0.0, ""))[1])
        if not err <= allowed:
            disproofs.append(Disproof(where, err, allowed, rewrite))
    return max((e[1] for e in errors.values()), default=0.0), disproofs


def _forced_errors(gm: fx.GraphModule, original: dict, inputs: tuple) -> dict:
    forced = _TeacherForced(gm, original)
    with torch.no_grad():
        forced.run(*fresh(inputs))
    return forced.errors


class UnfaithfulTrace(Exception):
    """The traced graph itself computes something else than the module's eager forward."""


def run_quietly(module, args: tuple, kwargs: dict | None = None) -> Any:
    """``module(*args, **kwargs)`` without grad, on clones of the inputs, warnings and fx's printout silenced."""
    # fx prints the generated code of a GraphModule that raises: a failing candidate is not the user's error
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return module(*fresh(args), **fresh(kwargs or {}))


def check_fused(
    fused: fx.GraphModule,
    pristine: Pristine | None,
    original: nn.Module,
    args: tuple,
    kwargs: dict,
    want: Any,
    where: str,
    notes: list,
    positional: tuple | None = None,
) -> float:
    """Worst relative error of ``fused`` (the rewritten trace of ``original``) against ``want``, the
    eager original's output on ``args`` / ``kwargs`` (float64).

    Exact enough end to end (``PROOF_TRIGGER``): done.  Otherwise each region is proven on its own
    (:func:`prove`, on ``positional``, the inputs as ``pristine``'s placeholders take them) and a
    disproven one raises :class:`EquivalenceError` naming it; then the end-to-end error is accepted if it
    is within the original's own float64 noise (:func:`reparam.verify.perturbed`, reported in ``notes``).
    Raises :class:`UnfaithfulTrace` when the unfused trace already disagrees with ``original``.
    ``fused`` is made to return ``want``'s container types (``OrderedDict`` ...).
    """
    got = _run_fused(fused, args, kwargs, want, where)
    try:
        worst = compare_outputs(got, want, where, tolerance=math.inf)
    except EquivalenceError as err:
        worst, mismatch = math.inf, err
    else:
        mismatch = None
    if worst <= PROOF_TRIGGER:
        return worst
    return _judged(fused, pristine, original, args, kwargs, got, want, where, notes, positional, mismatch)


def _judged(
    fused: fx.GraphModule,
    pristine: Pristine | None,
    original: nn.Module,
    args: tuple,
    kwargs: dict,
    got: Any,
    want: Any,
    where: str,
    notes: list,
    positional: tuple | None,
    mismatch: EquivalenceError | None,
) -> float:
    """:func:`check_fused` past the proof trigger: ``got`` (the fused graph's output) is further from ``want`` than
    :data:`PROOF_TRIGGER` (``mismatch``: the disagreement :func:`compare_outputs` raised, if it did).  Each region is
    proven on its own, then the end-to-end error is held to the original's own float64 noise; returns it, or raises
    as :func:`check_fused` does."""
    if pristine is not None and positional is not None:
        disproofs = prove(fused, pristine, positional)[1]
        if disproofs:
            first = disproofs[0]
            if where != "output":  # a part of a model: the region's path in the whole model
                first = Disproof(f"{where}.{first.where}", first.error, first.allowed, first.rewrite)
            leaf, err = worst_leaf(got, want, where) if mismatch is None else (where, math.inf)
            raise EquivalenceError(
                f"{first}; {leaf} is off by {err:.1e} (relative); this is a reparam bug, please report the model"
            )
    try:
        if mismatch is not None:
            raise mismatch
        return compare_outputs(
            got, want, where, noise=lambda: run_quietly(perturbed(original), args, kwargs), notes=notes
        )
    except EquivalenceError as err:
        if not _faithful(original, args, kwargs, want):
            raise UnfaithfulTrace(f"{where}: torch.fx traces it unfaithfully") from err
        raise


def _run_fused(fused: fx.GraphModule, args: tuple, kwargs: dict, want: Any, where: str) -> Any:
    """``fused``'s output on ``args`` / ``kwargs`` in the containers of ``want`` (the eager original's output; the
    graph is patched to return them).  Raises :class:`UnfaithfulTrace` when it does not run or cannot return them."""
    try:
        got = run_quietly(fused, args, kwargs)
    except Exception as err:  # Python control flow on an argument was traced for another call's value
        raise UnfaithfulTrace(
            f"{where}: its trace does not run this call ({type(err).__name__}: {one_line(err)[:100]})"
        ) from err
    try:
        if match_containers(fused, got, want):  # what the patched graph now returns, without a rerun
            got = restore_containers(got, tree_structure(want))
    except ValueError as err:
        raise UnfaithfulTrace(f"{where}: its trace returns {err}") from err
    return got


@dataclass
class Closeness:
    """How close ``fused`` came to the eager original on some inputs (:func:`closeness`): ``worst`` is the relative
    error when both ran and read every tap, None when nothing can be concluded there; ``got`` and ``want`` are the
    two outputs."""

    worst: float | None
    got: Any = None
    want: Any = None

    def agrees(self) -> bool:
        """Concluded, and within ``PROOF_TRIGGER``: the fused model is accepted on these inputs."""
        return self.worst is not None and self.worst <= PROOF_TRIGGER


def closeness(fused: fx.GraphModule, original: nn.Module, args: tuple, shared: frozenset = frozenset()) -> Closeness:
    """``fused`` (the rewritten trace of ``original``) against the eager ``original`` on the float64 ``args``.  Both
    runs must read every tap of every convolution (:class:`reparam.taps.TapCoverage`), but for those with one of the
    ``shared`` weights (:func:`reparam.taps.shared_tensors`) called alike in both (:func:`unmatched_shared`); a run
    that fails, leaves a tap unread or returns another structure concludes nothing (``worst`` None)."""
    # a kernel tap that reads only padding on these inputs is not checked by them
    original_taps, fused_taps = TapCoverage(stop=True, shared=shared), TapCoverage(stop=True, shared=shared)
    try:
        with original_taps:
            want = run_quietly(original, args)
    except Exception:  # noqa: BLE001  the user's model does not run on these inputs (a fixed-size position
        return Closeness(None)  # embedding at another resolution), or a tap went unread: nothing concluded
    if original_taps.unread:  # the model's own code caught the TapsUnread
        return Closeness(None)
    try:
        with fused_taps:
            got = _run_fused(fused, args, {}, want, "output")
        worst = compare_outputs(got, want, tolerance=math.inf)
    except (UnfaithfulTrace, EquivalenceError, TapsUnread):  # not concluded here: the full check names what is wrong
        return Closeness(None)
    if fused_taps.unread or unmatched_shared(original_taps, fused_taps):
        return Closeness(None)
    return Closeness(worst, got, want)


def judged_closely(
    fused: fx.GraphModule, pristine: Pristine, original: nn.Module, args: tuple, close: Closeness, notes: list
) -> float | None:
    """A :func:`closeness` past the proof trigger judged as :func:`check_fused` judges it, on ``args``: every region
    proven on its own against ``pristine`` (the unfused twin), the end-to-end error within the original's own
    float64 noise there (a deep net with random statistics amplifies rounding more on a crop than on the whole
    image).  Accepted: that error; refused: None (the caller's check on the inputs then decides, and names what is
    wrong).  What the noise rule allowed is appended to ``notes`` either way: the caller keeps them when it accepts."""
    try:
        return _judged(fused, pristine, original, args, {}, close.got, close.want, "output", notes, args, None)
    except (UnfaithfulTrace, EquivalenceError, TapsUnread):
        return None


def computes_the_same_bits(fused: fx.GraphModule, original: nn.Module, args: tuple) -> bool | None:
    """Do ``fused`` and the eager ``original`` return exactly the same outputs on ``args`` (same containers, every
    tensor equal bit for bit, the other leaves equal)?  None when the original does not run on them; False when
    the fused graph does not."""
    try:
        want = run_quietly(original, args)
    except Exception:  # noqa: BLE001  the user's model does not take these inputs (a crop of a fixed-size one)
        return None
    try:
        got = _run_fused(fused, args, {}, want, "output")
    except UnfaithfulTrace:  # not shown the same: the caller's full check says what is wrong
        return False
    got_leaves, got_spec = tree_flatten(got)
    want_leaves, want_spec = tree_flatten(want)
    return got_spec == want_spec and all(
        torch.equal(a, b)
        if isinstance(b, torch.Tensor) and isinstance(a, torch.Tensor)
        else type(a) is type(b) and a == b
        for a, b in zip(got_leaves, want_leaves, strict=True)
    )


def could_agree_closely(fused: fx.GraphModule, args: tuple, shared: frozenset = frozenset()) -> bool:
    """False when :func:`closeness` on ``args`` is sure to conclude nothing, told from a run of ``fused`` on
    stand-ins (:class:`reparam.shape_run.StandIns`: shapes without the arithmetic of its convolutions and products):
    it fails there (a window partition or a position embedding of another size), or a convolution leaves a kernel
    tap unread (but one with a ``shared`` weight, which :func:`closeness` holds to the original's calls); True
    otherwise (also when the graph reads a value a stand-in does not have).  Caches the run leaves are the caller's
    to undo."""
    try:
        with StandIns() as stand_ins:
            run_quietly(fused, args)
    except NeedsValues:
        return True
    except Exception:  # noqa: BLE001  any failure here is the graph's own on these shapes: the real run fails too
        return False
    return all(reads_every_tap(g, shared) is not False for g in stand_ins.convolutions)


def _faithful(module: nn.Module, args: tuple, kwargs: dict, want: Any) -> bool:
    """Does a fresh, unfused trace of ``module`` compute ``want`` (its eager output) on these inputs?"""
    try:
        compare_outputs(run_quietly(T.symbolic_trace(module), args, kwargs), want)
        return True
    except Exception:  # noqa: BLE001  a fresh trace that fails or disagrees is not faithful (the caller says so)
        return False
