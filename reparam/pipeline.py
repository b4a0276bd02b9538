"""fuse(): copy -> float64 -> trace -> passes to a fixed point -> verify -> cast back.

The input model is never touched: everything happens on a deep copy in eval mode.  Folding happens
in float64 (also for float16/bfloat16 models) and the result is cast back to each tensor's dtype.
When the whole model does not trace, the largest traceable submodules are fused instead, and the
report names the parts left alone.
"""

from __future__ import annotations

import contextlib
import gc
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_structure

from . import trace as T
from .cost import CostModel, resolve_cost
from .equalization import equalize_in_place
from .flatten import flatten_all
from .float64 import fast_float64_for
from .errors import EquivalenceError, ReparamError, one_line
from .passes import PassResult
from .passes.cleanup import code_regenerated_once, drop_static_asserts, drop_unused_tensors
from .passes.collapse import collapse
from .passes.constants import fold_constants
from .passes.inplace import follow_inplace_writes
from .passes.rows import merge_rows
from .passes.siblings import merge_siblings
from .passes.residual import remove_residuals as remove_residual_adds
from .passes.towers import merge_towers
from .passes.transposed import fold_bn_into_transposed_convs
from .inside import fuse_inside
from .interface import restore_state, snapshot_state
from .module_copy import deep_copy
from .parts import PartFuser, record_calls, why_untraced
from .proofs import (
    Pristine,
    UnfaithfulTrace,
    closeness,
    check_fused,
    computes_the_same_bits,
    could_agree_closely,
    judged_closely,
    pristine_copy,
    run_quietly,
    tag_origins,
)
from .report import Report
from .precision import check_precision
from .shapes import check_example_inputs
from .taps import least_fraction, shared_tensors
from .verify import (
    CROP_PERIOD,
    TOLERANCE,
    centre_crops,
    compare_outputs,
    is_degenerate,
    random_like,
    to_dtype,
    to_float64,
)

MAX_ROUNDS = 8  # rounds of a rule run to a fixed point (collapse: a region merged may join a larger one)


class TrainingModeWarning(UserWarning):
    """The model was in training mode; it is fused with inference semantics."""


class VerificationSkippedWarning(UserWarning):
    """No example inputs could be found, so the fused model was not checked."""


def _tensors(model: nn.Module) -> list:
    """(path, tensor) for every parameter and buffer of ``model``, shared ones under each of their paths."""
    return list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))


def _dtype_map(model: nn.Module) -> dict:
    return {name: t.dtype for name, t in _tensors(model)}


def _main_dtype(dtypes: dict, inputs: tuple | None = None) -> torch.dtype:
    """The model's most common floating dtype; for a model without floating tensors, its inputs'."""
    floats = [d for d in dtypes.values() if d.is_floating_point]
    if floats:
        return max(set(floats), key=floats.count)
    leaves = torch.utils._pytree.tree_leaves(inputs) if inputs is not None else []
    return next(
        (t.dtype for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()), torch.get_default_dtype()
    )


def _normalise_inputs(example_inputs) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise ReparamError(
        f"example_inputs must be a tensor or a tuple of positional inputs, got {type(example_inputs).__name__}"
    )


@dataclass(frozen=True)
class Rule:
    """One rewrite rule of the pipeline: ``run(gm, report) -> PassResult`` (a pass of :mod:`reparam.passes`).

    ``to_fixed_point``: run again while it rewrites, at most :data:`MAX_ROUNDS` times (the report says when it
    stops still rewriting).  ``after_change``: run only when the rule before it rewrote something.
    """

    name: str
    run: Callable[[fx.GraphModule, Report], PassResult]
    to_fixed_point: bool = False
    after_change: bool = False


def rules(
    remove_residuals: bool = False,
    cost: CostModel | None = None,
    dtypes: dict | None = None,
    main: torch.dtype | None = None,
) -> tuple[Rule, ...]:
    """The rewrite rules, in the order they run (``cost``: what collapse and the sibling merge ask whether a merge
    pays; ``dtypes`` / ``main``: the dtypes tensors are cast back to, so siblings of different dtypes stay apart)."""
    collapse_regions = Rule("collapse", partial(collapse, cost=cost), to_fixed_point=True)
    return (
        Rule("inplace writes", follow_inplace_writes),  # before collapse: functional pads instead of in-place barriers
        # after the in-place writes (a private tensor written functionally can be a constant), before collapse (a
        # functional conv whose weight was computed reads a buffer then); the rules after it build no new ones
        Rule("constants", partial(fold_constants, dtypes=dtypes, default_dtype=main)),
        Rule("transposed-conv batchnorms", fold_bn_into_transposed_convs),  # outside the affine algebra
        collapse_regions,
        Rule("rows", merge_rows),  # after collapse: each chain holds its merged kernels
        Rule("towers", merge_towers),  # after collapse: sums of convs merged first, so towers see their final form
        replace(collapse_regions, after_change=True),  # the merged towers' kernels fold with what is around them
        *((Rule("residuals", remove_residual_adds),) if remove_residuals else ()),
        # last: the rules above see the separate convs (a residual's downsample)
        Rule("siblings", partial(merge_siblings, cost=cost, dtypes=dtypes, default_dtype=main)),
        Rule("static asserts", drop_static_asserts),
    )


def _fuse_graph(
    gm: fx.GraphModule,
    inputs: tuple | None,
    report: Report,
    dtypes: dict,
    main: torch.dtype,
    shapes_known: bool = False,
    remove_residuals: bool = False,
    cost: CostModel | None = None,
    where: str = "",
) -> Pristine:
    """Run the :func:`rules` on ``gm`` (in place), ``where`` naming it in the report; returns its unfused twin
    (for the proofs).  ``dtypes`` gains the dtypes of the modules the rules create."""
    if inputs is not None and not shapes_known:
        T.propagate_shapes(gm, inputs)
    tag_origins(gm)
    pristine = pristine_copy(gm)
    previous = PassResult()
    with code_regenerated_once(gm):  # the rules read and rewrite the graph; its code is generated once, after them
        for rule in rules(remove_residuals, cost, dtypes, main):
            if rule.after_change and not previous:
                previous = PassResult()
                continue
            previous = _apply(rule, gm, inputs, report, dtypes, main, where or type(gm).__name__)
        gm.delete_all_unused_submodules()
        drop_unused_tensors(gm)
        gm.graph.lint()
    return pristine


def _apply(
    rule: Rule, gm: fx.GraphModule, inputs: tuple | None, report: Report, dtypes: dict, main: torch.dtype, where: str
) -> PassResult:
    """``rule`` on ``gm`` (to its fixed point if it has one), with the bookkeeping its results ask for: dtypes of
    the modules it creates, shapes propagated again when they went stale."""
    total = PassResult()
    for _ in range(MAX_ROUNDS if rule.to_fixed_point else 1):
        result = rule.run(gm, report)
        _record_dtypes(gm, result, dtypes, main)
        if result.shapes_stale and inputs is not None:
            T.propagate_shapes(gm, inputs)
        total = total + result
        if not result:
            break
    else:
        if rule.to_fixed_point:
            report.notes.append(
                f"{where}: {rule.name} still rewrote in its last of {MAX_ROUNDS} rounds and stopped "
                "there (the result is exact, but may merge less than it could)"
            )
    return total


def _record_dtypes(gm: fx.GraphModule, result: PassResult, dtypes: dict, fallback: torch.dtype) -> None:
    """dtypes (to cast back to) of the tensors of the modules ``result`` says were created: that of the first
    weight among the modules each one replaces (``PassResult.replaces``), the model's main dtype otherwise; and
    those of the tensors it registered directly (``PassResult.buffer_dtypes``)."""
    dtypes.update(result.buffer_dtypes)
    for name in result.created:
        replaced = (dtypes.get(f"{target}.weight") for target in result.replaces.get(name, ()))
        dtype = next((d for d in replaced if d is not None), fallback)
        dtypes.update({f"{name}.{p}": dtype for p, _ in gm.get_submodule(name).named_parameters()})


def fuse_with_report(
    model: nn.Module,
    example_inputs=None,
    *,
    check: bool | str = True,
    remove_residuals: bool = False,
    dtype: torch.dtype | None = None,
    equalize: bool = False,
    cost="macs",
    device=None,
) -> tuple[nn.Module, Report]:
    """:func:`reparam.fuse` that also returns the :class:`Report`."""
    with _no_full_collections():
        return _fuse_with_report(model, example_inputs, check, remove_residuals, dtype, equalize, cost, device)


@contextlib.contextmanager
def _no_full_collections():
    """Python's cyclic garbage collector runs no full (oldest-generation) collection inside the block; young
    ones still run, so cycles among short-lived objects are freed as usual.  Thresholds are restored after.

    A fuse creates some 10^5 objects (fx nodes, the private copy's modules); each full collection they would
    trigger traverses every object of the process, the user's and timm's too (up to 15 % of a fuse of a graph
    of a few thousand nodes).
    """
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], 10**9)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


def _fuse_with_report(
    model: nn.Module,
    example_inputs,
    check: bool | str,
    remove_residuals: bool,
    dtype: torch.dtype | None,
    equalize: bool,
    cost,
    device,
) -> tuple[nn.Module, Report]:
    if not isinstance(model, nn.Module):
        raise ReparamError(f"reparam.fuse expects an nn.Module, got {type(model).__name__}")
    if model.training:
        warnings.warn(
            "model is in training mode: fusing with inference semantics (BatchNorm uses running "
            "statistics); the input model is left in training mode",
            TrainingModeWarning,
            stacklevel=4,
        )
    if check not in (True, False, "full"):
        raise ReparamError(f"check must be True, False or 'full', got {check!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise ReparamError(f"dtype must be a floating dtype such as torch.float16, got {dtype}")
    report = Report()
    dtypes = _dtype_map(model)
    if dtype is not None:  # deploy in another precision: fold in float64, cast once at the end
        dtypes = {k: (dtype if v.is_floating_point else v) for k, v in dtypes.items()}
    main = _main_dtype(dtypes, _normalise_inputs(example_inputs))
    timing_device = device  # where cost="latency" times candidate merges (in ``main``); default the model's
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cost = resolve_cost(cost, device if timing_device is None else timing_device, main)

    # all folding and checking happens on a private float64 CPU copy; the result goes back to ``device``
    work = _float64_copy(model).eval()
    unfused = list(work.modules())  # GraphModules in the result that are not among these are fused ones
    state = snapshot_state(work)  # caches that the float64 runs below leave are undone at the end
    given = _normalise_inputs(example_inputs)
    check_example_inputs(work, _float64_inputs(given))  # wrong rank / channels: an error naming the expected shape
    if dtype is not None and given is not None and dtype != _main_dtype(_dtype_map(model), given):
        check_precision(model, given, dtype)  # overflow in the deploy precision: named before any folding
    try:
        (gm, parents), trace_error = T.trace_whole(work, None if given is None else len(given)), None
    except Exception as err:  # noqa: BLE001  any failure tracing the user's code: fuse its parts (the reason: notes)
        gm, parents, trace_error = None, {}, err
    fuse_graph = _graph_fuser(report, dtypes, main, remove_residuals, cost)
    fused, restart = None, None  # restart: why the whole-model result is dropped for the part-by-part path
    if gm is not None:
        inputs, convolutions = _shapes(gm, work, given)
        pristine = _fuse_graph(gm, inputs, report, dtypes, main, True, remove_residuals, cost)
        if parents:  # modules called as they are: their own children fused inside private copies
            try:
                with fast_float64_for(work):
                    fuse_inside(gm, parents, report, fuse_graph, state, set(unfused))
            except Exception as err:  # noqa: BLE001  (the user's code on random inputs, no inputs to run): part by part
                trace_error = next(iter(parents.values()))
                restart = f"modules called as they are not fused inside ({one_line(err)[:120]})"
    if gm is not None and restart is None:
        if not check or inputs is None:
            fused = gm
        elif not (report.rewrites or parents or equalize or dtype) and _untouched_trace_checked(
            gm, work, inputs, dtypes, main, report, state
        ):
            fused = gm
        else:  # against the eager model, not the traced graph: fx can trace a model unfaithfully
            try:
                with fast_float64_for(work):  # the float64 runs: 1.5-3x faster depthwise convolutions
                    report.max_rel_error = _check_whole(
                        gm, pristine, work, inputs, report, state, check == "full", convolutions
                    )
                fused = gm
            except UnfaithfulTrace as err:
                trace_error = err
                restart = (
                    f"{type(model).__name__}: torch.fx traces it unfaithfully (e.g. an aliased in-place update); "
                    "fused part by part instead"
                )
            except EquivalenceError as err:
                if not parents:
                    raise
                # an opaque module may post-process data-dependently (top-k, NMS): each part is checked locally instead
                trace_error = next(iter(parents.values()))
                restart = (
                    f"the whole-model check disagreed ({one_line(err)[:160]}); fused part by part instead, each "
                    "part checked on the inputs it sees"
                )
    if restart is not None:
        report = Report(notes=[restart])
        fuse_graph = _graph_fuser(report, dtypes, main, remove_residuals, cost)
    if fused is None:
        with fast_float64_for(work):
            fused, inputs = _fuse_parts(work, given, report, fuse_graph, trace_error, check)
    if check and inputs is None:
        warnings.warn(
            "could not infer example inputs, so the fused model was NOT verified; pass "
            "example_inputs=(x,) to reparam.fuse",
            VerificationSkippedWarning,
            stacklevel=4,
        )
        report.notes.append("verification skipped: no example inputs")
    if equalize:  # cross-layer equalization of the fused float64 model, checked against it (reparam.equalization)
        with fast_float64_for(fused):
            equalize_in_place(fused, inputs, report, check)
    restore_state(fused, state)  # first: a buffer put back is cast back too
    _register_constants(fused)
    wanted = _wanted_dtypes(fused, dtypes, main)  # by tensor: the names in ``dtypes`` are paths before flattening
    flatten_all(_made(fused, unfused))  # before the cast: what it drops (weights the passes replaced) is not cast
    _cast_back(fused, wanted, device)
    fused.reparam_report = report
    return fused, report


def _made(fused: nn.Module, unfused: list) -> list:
    """The GraphModules of ``fused`` that fusing made (the whole model's trace, or its fused parts)."""
    kept = {id(m) for m in unfused}  # ``unfused`` holds them alive, so no id is reused
    return [m for m in fused.modules() if isinstance(m, fx.GraphModule) and id(m) not in kept]


def _graph_fuser(report: Report, dtypes: dict, main: torch.dtype, remove_residuals: bool, cost=None):
    """``fuse_graph(gm, inputs, path)``: the passes on the traced part at ``path`` of the model."""

    def fuse_graph(gm: fx.GraphModule, inputs: tuple | None, path: str) -> Pristine:
        prefix = f"{path}." if path else ""
        local = {k[len(prefix) :]: v for k, v in dtypes.items() if k.startswith(prefix)}
        children, since = set(gm._modules), report.tally()
        pristine = _fuse_graph(
            gm, inputs, report, local, main, remove_residuals=remove_residuals, cost=cost, where=path
        )
        dtypes.update({prefix + k: v for k, v in local.items()})  # dtypes of the modules it created
        if path:  # the report names places in the model, not in the part
            report.place_under(since, path, lambda where: where.split(".")[0] in children)
        return pristine

    return fuse_graph


def _check_whole(
    gm: fx.GraphModule,
    pristine: Pristine,
    reference: nn.Module,
    inputs: tuple,
    report: Report,
    state: dict,
    full: bool,
    convolutions: list | None = None,
) -> float:
    """Worst relative error of the fused whole-model graph against the eager original on ``inputs``
    (and on a random twin of constant inputs, which cannot expose wrong weights): :func:`check_fused`.

    Unless ``full``, centre crops of them come first: the smallest at which every convolution still reads every
    kernel tap (:func:`reparam.taps.least_fraction`: those of the fused graphs, of the unfused twin, and
    ``convolutions``, those the shape run saw, inside modules called as they are too), then the default one
    (:func:`centre_crops`: a quarter to a third of the pixels).  When the model runs on one, reads every tap there
    and the fused graph agrees within the proof trigger, or past it is proven region by region and within the
    model's own noise there, that is the check (``report.verified_on`` says so); anything else, the check on the
    inputs themselves decides, with its proofs.
    ``state``: the model's caches before any run (:func:`snapshot_state`), put back after the crops' runs.
    """
    candidates = [inputs] + ([random_like(inputs)] if is_degenerate(inputs) else [])
    if not full:
        graphs = [(g.graph, dict(g.named_modules())) for g in gm.modules() if isinstance(g, fx.GraphModule)]
        shared = shared_tensors(gm, reference)  # the weights no rewrite touched: their taps need no reading
        fraction = least_fraction(graphs + [pristine.graph_and_modules()], convolutions or (), shared)
        for i, crops in enumerate(_crops_to_try(candidates, fraction)):
            found = _closeness_on_crops(gm, reference, crops, state, shared, foresee=i > 0)
            worst = None if found is None else _judged_on_crops(gm, pristine, reference, crops, found, state, report)
            if worst is not None:
                report.verified_on = _on_crops(inputs, crops[0])
                return worst
    worst = 0.0
    for x in candidates:
        err = check_fused(gm, pristine, reference, x, {}, run_quietly(reference, x), "output", report.notes, x)
        worst = max(worst, err)
    report.verified_on = "the inputs"
    return worst


def _untouched_trace_checked(
    gm: fx.GraphModule, work: nn.Module, inputs: tuple, dtypes: dict, main: torch.dtype, report: Report, state: dict
) -> bool:
    """Nothing was rewritten (``gm`` is the trace of ``work`` as it is): the check is only that fx traced the model
    faithfully, and a faithful trace runs the eager model's ops in its order, so in the model's own precision it
    gives the same bits.  For a float32 model (every floating tensor float32, float32 inputs) both run in float32, a
    third of the float64 cost or less (GELU 6x, products 2x), and equal bits on every output (on a random twin of a
    constant input too) are the check; True then, with ``report`` saying so.  False, everything back in float64
    and the caches the runs left undone, when the precondition does not hold or any bit differs: the float64 check
    then decides and names what differs."""
    candidates = [inputs] + ([random_like(inputs)] if is_degenerate(inputs) else [])
    leaves = [t for t in torch.utils._pytree.tree_leaves(candidates) if isinstance(t, torch.Tensor)]
    float32 = main == torch.float32 and all(d == torch.float32 for d in dtypes.values() if d.is_floating_point)
    if not (float32 and any(t.is_floating_point() for t in leaves)):
        return False
    crops = [centre_crops(x) for x in candidates]  # no weight changed: any size the model runs at shows a trace
    tries = ([crops] if all(c is not None for c in crops) else []) + [candidates]
    same, tried = False, candidates
    float64 = _in_float32(work, gm)  # gm's modules are work's (nothing was rewritten); its own constants too
    try:
        for tried in tries:
            with _caches_undone(work, gm, state):  # a cache filled at the crop's size must not reach the next try
                found = [computes_the_same_bits(gm, work, to_dtype(x, torch.float32)) for x in tried]
            same = all(found)
            if None not in found:
                break  # equal, or different where the model runs (the float64 check then decides)
    finally:
        if not same:
            for t, data in float64:
                t.data = data
    if same:
        report.max_rel_error = 0.0
        on = "the inputs" if tried is candidates else _on_crops(inputs, tried[0])
        report.verified_on = f"{on} in float32, bit for bit (nothing was rewritten: the trace computes the model)"
    return same


def _in_float32(*modules: nn.Module) -> list:
    """Every float64 parameter and buffer of ``modules`` (their submodules' too) made float32 in place; returns
    (tensor, its float64 data) for each, to put back exactly."""
    changed, seen = [], set()
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            if t.dtype == torch.float64 and id(t) not in seen:
                seen.add(id(t))
                changed.append((t, t.data))
                t.data = t.data.to(torch.float32)
    return changed


#: at most this many crop sides are tried between the smallest one and the default (each first on stand-ins)
BETWEEN_CROPS = 2


def _crops_to_try(candidates: list, fraction: float | None) -> list:
    """For each crop to try, smallest first, the centre crops of every one of ``candidates``: the crop every tap
    needs (``fraction`` of the sides, None if unknown), up to :data:`BETWEEN_CROPS` sides between it and the default
    in steps of :data:`CROP_PERIOD` (valid padding shrinks a map by more than the proportion the smallest assumes:
    Inception-v3 at 299 leaves taps unread at 75 but not at 107), then the default (:func:`centre_crops`); a crop of
    the same sides as one before it is left out, and so is one that does not shrink every candidate.  A constant
    crop (of a constant input) is replaced by a random one: it exposes no weight."""
    specs = [{"fraction": fraction, "least": 0}] if fraction is not None else []
    if specs:
        sides = [_least_side(centre_crops(candidates[0], **specs[0])), _least_side(centre_crops(candidates[0]))]
        if None not in sides:
            between = range(sides[0] + CROP_PERIOD, sides[1], CROP_PERIOD)
            specs += [{"fraction": fraction, "least": side} for side in list(between)[:BETWEEN_CROPS]]
    tries, seen = [], set()
    for spec in specs + [{}]:
        crops = [centre_crops(x, **spec) for x in candidates]
        if any(c is None for c in crops) or _shapes_text(crops[0]) in seen:
            continue
        seen.add(_shapes_text(crops[0]))
        tries.append([random_like(c) if is_degenerate(c) else c for c in crops])
    return tries


def _least_side(crops: tuple | None) -> int | None:
    """The shortest side among the cropped image tensors of ``crops`` (None for no crop)."""
    if crops is None:
        return None
    sides = [
        n
        for t in torch.utils._pytree.tree_leaves(crops)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 4
        for n in t.shape[-2:]
    ]
    return min(sides, default=None)


def _closeness_on_crops(
    gm: fx.GraphModule, reference: nn.Module, crops: list, state: dict, shared: frozenset, foresee: bool = False
) -> list | None:
    """The :func:`closeness` of ``gm`` to ``reference`` on each of ``crops`` when every one concludes (both run, every
    tap read, the convolutions with ``shared`` weights exempt), else None.  Caches the runs leave in ``reference`` are
    undone.  With ``foresee`` (a smaller crop concluded nothing), a run on stand-ins first tells a crop that cannot
    conclude (:func:`could_agree_closely`: MaxViT's windows at 192 pixels fail only in the last stage, after three
    quarters of a float64 pass), and the float64 runs are spared."""
    found = []
    with _caches_undone(reference, gm, state):  # a cache filled at the crop's size must not reach the full-size runs
        if foresee and not all(could_agree_closely(gm, crop, shared) for crop in crops):
            return None
        for crop in crops:
            found.append(closeness(gm, reference, crop, shared))
            if found[-1].worst is None:
                return None
    return found


def _judged_on_crops(
    gm: fx.GraphModule, pristine: Pristine, reference: nn.Module, crops: list, found: list, state: dict, report: Report
) -> float | None:
    """The worst error of ``gm`` on ``crops`` (their :func:`closeness`: ``found``) when it is accepted there: within
    the proof trigger, or past it as the check on the inputs would accept it (:func:`judged_closely`: every region
    proven on its own against ``pristine``, the end-to-end error within the model's own float64 noise; the report's
    notes then say what that allowed); else None.  A proof costs one to two times the runs on the next crop size,
    which conclude no more often on a deep net with random statistics (efficientnetv2_rw_t: 2.5e-9, 1.0e-11,
    1.8e-9 at 64, 96, 128 pixels), so it runs on the first crop that concludes.  Caches the runs leave in
    ``reference`` are undone."""
    worst, said = 0.0, []
    with _caches_undone(reference, gm, state):
        for crop, close in zip(crops, found, strict=True):
            err = close.worst if close.agrees() else judged_closely(gm, pristine, reference, crop, close, said)
            if err is None:
                return None
            worst = max(worst, err)
    report.notes.extend(said)
    return worst


@contextlib.contextmanager
def _caches_undone(reference: nn.Module, gm: fx.GraphModule, state: dict):
    """On leaving (also by an exception), the caches the runs inside left in ``reference`` and in ``gm`` (which holds
    the private copies of modules fused inside, :mod:`reparam.inside`) are put back to ``state``
    (:func:`snapshot_state`)."""
    try:
        yield
    finally:
        restore_state(reference, state)
        restore_state(gm, state)


def _on_crops(inputs: tuple, crops: tuple) -> str:
    """What ``report.verified_on`` says of a check on ``crops`` of ``inputs``."""
    return f"centre crops of the inputs ({_shapes_text(inputs)} -> {_shapes_text(crops)})"


def _shapes_text(inputs: tuple) -> str:
    """The shapes of the floating tensors in ``inputs``: ``1x3x224x224``, comma-separated."""
    leaves = torch.utils._pytree.tree_leaves(inputs)
    return ", ".join(
        "x".join(map(str, t.shape)) for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()
    )


def _fuse_parts(
    work: nn.Module, given: tuple | None, report: Report, fuse_graph, trace_error, check: bool
) -> tuple[nn.Module, tuple | None]:
    """(``work`` (float64) with its traceable parts fused, each proven on the inputs it sees
    (:mod:`reparam.parts`); the float64 inputs of the recording runs, None if none run)."""
    if given is not None:
        inputs = _float64_inputs(given)
        inputs = random_like(inputs) if is_degenerate(inputs) else inputs  # zeros cannot expose wrong weights
    else:  # inferred from the first layer: the first candidate the model runs
        inputs = T.infer_example_inputs(work, None, torch.float64, "cpu")
    if inputs is None:
        report.notes.append(
            f"{type(work).__name__} left unfused: it does not trace ({why_untraced(trace_error)}) and "
            "no example inputs run it"
        )
        return work, None
    parts = PartFuser(report, fuse_graph, lambda model, modules: record_calls(model, inputs, modules))
    fused = parts.fuse(work, trace_error)
    report.max_rel_error = parts.worst
    if check:
        _check_end_to_end(fused, inputs, parts.output, report, parts.worst)
        report.verified_on = "the inputs (each fused part on what it receives)"
    return fused, inputs


def _check_end_to_end(fused: nn.Module, inputs: tuple, want: Any, report: Report, local_worst: float) -> None:
    """The part-by-part fused model against the original's recorded output.

    The structure must match exactly (else :class:`EquivalenceError`).  Values are informative only:
    every fused part was proven on the inputs it saw, so a difference here comes from data-dependent
    steps after them (top-k, NMS, sorting of near-ties), which the report says.
    """
    got = run_quietly(fused, inputs)
    got_spec, want_spec = tree_structure(got), tree_structure(want)
    if got_spec != want_spec:
        raise EquivalenceError(
            f"output: the fused model returns a different output structure ({got_spec} vs "
            f"{want_spec}); this is a reparam bug, please report the model"
        )
    try:
        err = compare_outputs(got, want, tolerance=math.inf)
        detail = f"relative error {err:.1e}"
    except EquivalenceError as disagreement:  # e.g. another number of detections after NMS
        err, detail = math.inf, str(disagreement).split(";")[0]
    if err > TOLERANCE:
        report.notes.append(
            f"end-to-end outputs differ ({detail}) although every fused part matches its "
            f"original on the inputs it sees (largest error {local_worst:.1e}): the model "
            "post-processes them data-dependently (top-k, NMS, sorting of near-ties)"
        )


def _shapes(gm: fx.GraphModule, work: nn.Module, given: tuple | None) -> tuple[tuple | None, list | None]:
    """Record shapes on ``gm`` (the trace of ``work``, both float64 on the CPU); returns (the float64 inputs
    (``given`` or inferred ones; None if none run), the geometry of the convolutions the run saw (None if unknown)).

    The shape run costs no convolutions or matrix products (:mod:`reparam.shape_run`), so it runs in float64
    on the private copy: no second copy of the model in its own precision is needed.
    """
    done = []

    def runs(x: tuple) -> bool:
        done.append(T.propagate_shapes(gm, x))
        return done[-1] is not None

    if given is None:
        inputs = T.infer_example_inputs(work, gm, torch.float64, "cpu", runs=runs)
    else:
        inputs = _float64_inputs(given)
        runs(inputs)  # if this fails, the model fails on these inputs: verification says so
    return inputs, (done[-1].convolutions if inputs is not None and done[-1] is not None else None)


def _float64_copy(model: nn.Module) -> nn.Module:
    """before -> after: ``model`` (any dtype and device) -> a deep copy whose floating parameters and buffers are
    float64 CPU tensors; ``model`` untouched.  Each tensor is converted once, straight from the original (a
    ``copy.deepcopy`` then ``.to(float64)`` clones it first and converts the clone); tensors shared by several
    modules stay shared.  Integer tensors are copied as they are."""
    memo: dict = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in memo:
            dtype = torch.float64 if t.is_floating_point() else t.dtype
            data = t.detach().to(device="cpu", dtype=dtype, copy=True)
            memo[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
    return deep_copy(model, memo)


def _float64_inputs(given: tuple | None) -> tuple | None:
    """Copies of ``given`` on the CPU, floating tensors in float64 (None stays None)."""
    return None if given is None else to_float64(_move(given, "cpu"))


def _move(inputs: tuple, device) -> tuple:
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, inputs)


def _register_constants(fused: nn.Module) -> None:
    """Plain tensor attributes that traced graphs read (fx's ``_tensor_constant*``) become non-persistent
    buffers, so that ``.to()`` / ``.half()`` move them with the parameters."""
    for gm in [m for m in fused.modules() if isinstance(m, fx.GraphModule)]:
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            owner_path, _, attr = node.target.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            value = owner.__dict__.get(attr)
            if isinstance(value, torch.Tensor) and attr not in owner._parameters and attr not in owner._buffers:
                delattr(owner, attr)
                owner.register_buffer(attr, value, persistent=False)


def _wanted_dtypes(fused: nn.Module, dtypes: dict, main: torch.dtype) -> dict:
    """``id(tensor) -> the dtype it goes back to``, for every parameter and buffer of ``fused``: a floating one its
    original dtype by its path in ``dtypes`` (new ones: ``main``), any other its own.  Keyed by the tensor object,
    so it holds when flattening renames them (``fused`` keeps them alive: no id is reused)."""
    return {id(t): dtypes.get(name, main) if t.is_floating_point() else t.dtype for name, t in _tensors(fused)}


def _cast_back(fused: nn.Module, wanted: dict, device) -> None:
    """Every tensor of ``fused`` to ``device`` and to its dtype in ``wanted`` (:func:`_wanted_dtypes`)."""
    for _, t in _tensors(fused):
        want = wanted[id(t)]
        if t.dtype != want or t.device != device:
            t.data = t.data.to(dtype=want, device=device)


def fuse(
    model: nn.Module,
    example_inputs=None,
    *,
    check: bool | str = True,
    remove_residuals: bool = False,
    dtype: torch.dtype | None = None,
    equalize: bool = False,
    cost="macs",
    device=None,
) -> nn.Module:
    """Return a new module computing the same function as ``model`` with fewer, larger kernels.

    Inference semantics (BatchNorm with running statistics); same dtype and device; the input model is
    never modified.  ``example_inputs``: a tensor or tuple of positional inputs (inferred when omitted).
    ``check=True`` verifies the result in float64 and raises :class:`reparam.EquivalenceError` if it
    disagrees.  Where the model runs on centre crops of the inputs, reads every kernel tap there and agrees closely,
    the check runs on those (a third of the cost or less; ``report.verified_on`` says which); ``check="full"``
    always on the inputs themselves.  ``remove_residuals=True`` also removes ReLU residuals exactly (ResNets become
    plain).
    ``dtype`` (e.g. ``torch.float16``): cast the result to that precision after folding in float64.
    ``equalize=True``: then balance per-channel weight ranges for int8 (:mod:`reparam.equalization`), exactly.
    ``cost``: whether a merge pays: ``"macs"`` (default: when it costs no more multiply-accumulates), ``"latency"``
    (a doubtful merge is timed on ``device``, default the model's, in the deploy dtype; timings are cached, see
    :mod:`reparam.latency_cache`) or a :class:`reparam.cost.CostModel`; ``report.decisions`` lists what it weighed.
    The report of rewrites and refusals is at ``fused.reparam_report``.
    """
    return fuse_with_report(
        model,
        example_inputs,
        check=check,
        remove_residuals=remove_residuals,
        dtype=dtype,
        equalize=equalize,
        cost=cost,
        device=device,
    )[0]


def explain(model: nn.Module, example_inputs=None, *, cost="macs", device=None) -> Report:
    """Every rewrite :func:`fuse` would do and every merge it refuses, with the reason (``cost``, ``device``: as
    :func:`fuse`)."""
    return fuse_with_report(model, example_inputs, check=False, cost=cost, device=device)[1]
