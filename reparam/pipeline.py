"""fuse(): copy -> float64 -> trace -> passes to a fixed point -> verify -> cast back.

The input model is never touched: everything happens on a deep copy in eval mode.  Folding happens
in float64 (also for float16/bfloat16 models) and the result is cast back to each tensor's dtype.
When the whole model does not trace, the largest traceable submodules are fused instead, and the
report names the parts left alone.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from . import trace as T
from .errors import ReparamError
from .passes.cleanup import drop_static_asserts, drop_unused_tensors
from .passes.collapse import Collapse
from .passes.inplace import follow_inplace_writes
from .passes.rows import merge_rows
from .passes.residual import remove_residuals as remove_residual_adds
from .passes.towers import merge_towers
from .report import Report
from .verify import NOT_COMPUTED, compare, fresh, is_degenerate, random_like, to_float64

MAX_ROUNDS = 8


class TrainingModeWarning(UserWarning):
    """The model was in training mode; it is fused with inference semantics."""


class VerificationSkippedWarning(UserWarning):
    """No example inputs could be found, so the fused model was not checked."""


def _dtype_map(model: nn.Module) -> dict:
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {name: t.dtype for name, t in named}


def _main_dtype(dtypes: dict, inputs: Optional[tuple] = None) -> torch.dtype:
    """The model's most common floating dtype; for a model without floating tensors, its inputs'."""
    floats = [d for d in dtypes.values() if d.is_floating_point]
    if floats:
        return max(set(floats), key=floats.count)
    leaves = torch.utils._pytree.tree_leaves(inputs) if inputs is not None else []
    return next((t.dtype for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()),
                torch.get_default_dtype())


def _normalise_inputs(example_inputs) -> Optional[tuple]:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise ReparamError(
        f"example_inputs must be a tensor or a tuple of positional inputs, got {type(example_inputs).__name__}"
    )


def _region_dtype(gm: fx.GraphModule, dtypes: dict, fallback: torch.dtype):
    """dtype for a fused module: that of the first weight in the region (the model's otherwise)."""

    def pick(nodes) -> torch.dtype:
        for node in sorted(nodes, key=lambda n: n.name):
            if node.op == "call_module":
                d = dtypes.get(f"{node.target}.weight")
                if d is not None:
                    return d
        return fallback

    return pick


def _fuse_graph(gm: fx.GraphModule, inputs: Optional[tuple], report: Report, dtypes: dict, main: torch.dtype,
                shapes_known: bool = False, remove_residuals: bool = False) -> None:
    """Run the passes on ``gm`` (in place) to a fixed point."""
    if inputs is not None and not shapes_known:
        T.propagate_shapes(gm, inputs)
    follow_inplace_writes(gm, report)  # before collapse: functional pads instead of in-place barriers
    _collapse(gm, report, dtypes, main)
    merge_rows(gm, report)  # after collapse: each chain holds its merged kernels
    if merge_towers(gm, report):  # sums of convs merged first, so towers see their final form
        if inputs is not None:
            T.propagate_shapes(gm, inputs)
        _collapse(gm, report, dtypes, main)
    if remove_residuals and remove_residual_adds(gm, report) and inputs is not None:
        T.propagate_shapes(gm, inputs)  # carried channels widened some tensors
    drop_static_asserts(gm)
    gm.delete_all_unused_submodules()
    drop_unused_tensors(gm)
    gm.graph.lint()
    gm.recompile()


def _collapse(gm: fx.GraphModule, report: Report, dtypes: dict, main: torch.dtype) -> None:
    for _ in range(MAX_ROUNDS):  # new nodes carry their replaced node's shape, so no re-propagation
        if Collapse(gm, report, _region_dtype(gm, dtypes, main), dtypes).run() == 0:
            break


def _record_inputs(module: nn.Module, inputs: tuple) -> tuple[dict, Any]:
    """(first positional inputs each submodule sees, output) when ``module`` runs ``inputs``."""
    seen: dict = {}

    def hook(mod, args):
        seen.setdefault(mod, args)

    handles = [m.register_forward_pre_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            output = module(*fresh(inputs))
    finally:
        for h in handles:
            h.remove()
    return seen, output


def _fuse_tree(module: nn.Module, recorded: dict, report: Report, dtypes, main, path="",
               remove_residuals: bool = False, trace_error: Optional[Exception] = None) -> nn.Module:
    """Fuse ``module`` whole if it traces, else each child that was called (depth first).

    ``recorded``: each submodule's inputs in one eager run (:func:`_record_inputs`); ``trace_error``:
    why ``module`` did not trace, when the caller knows already.  Children are replaced in
    ``module`` itself: the caller passes a module it owns.
    """
    gm = None
    if trace_error is None:
        try:
            gm = T.symbolic_trace(module)
        except Exception as err:  # data-dependent control flow and the like
            trace_error = err
    if gm is None:
        err = trace_error
        if path or not list(module.children()):
            report.notes.append(f"{path or type(module).__name__} left unfused: not traceable ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
        if not path:
            report.notes.append(f"{type(module).__name__} does not trace as a whole; fused its traceable parts")
        for name, child in list(module.named_children()):
            if child in recorded:
                setattr(module, name, _fuse_tree(child, recorded, report, dtypes, main,
                                                 f"{path}.{name}".strip("."), remove_residuals))
        return module
    prefix = f"{path}." if path else ""
    local = {k[len(prefix):]: v for k, v in dtypes.items() if k.startswith(prefix)}
    _fuse_graph(gm, recorded.get(module), report, local, main, remove_residuals=remove_residuals)
    dtypes.update({prefix + k: v for k, v in local.items()})  # dtypes of the modules it created
    return gm


def fuse_with_report(model: nn.Module, example_inputs=None, *, check: bool = True,
                     remove_residuals: bool = False, dtype: Optional[torch.dtype] = None) -> tuple[nn.Module, Report]:
    """:func:`reparam.fuse` that also returns the :class:`Report`."""
    if not isinstance(model, nn.Module):
        raise ReparamError(f"reparam.fuse expects an nn.Module, got {type(model).__name__}")
    if model.training:
        warnings.warn("model is in training mode: fusing with inference semantics (BatchNorm uses running "
                      "statistics); the input model is left in training mode", TrainingModeWarning, stacklevel=3)
    if dtype is not None and not dtype.is_floating_point:
        raise ReparamError(f"dtype must be a floating dtype such as torch.float16, got {dtype}")
    report = Report()
    dtypes = _dtype_map(model)
    if dtype is not None:  # deploy in another precision: fold in float64, cast once at the end
        dtypes = {k: (dtype if v.is_floating_point else v) for k, v in dtypes.items()}
    main = _main_dtype(dtypes, _normalise_inputs(example_inputs))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    # all folding and checking happens on a private float64 CPU copy; the result goes back to ``device``
    work = copy.deepcopy(model).eval()
    given = _normalise_inputs(example_inputs)
    try:
        gm, trace_error = T.symbolic_trace(work), None
    except Exception as err:  # not traceable as a whole: fuse the traceable parts of the private copy
        gm, trace_error = None, err
    want = NOT_COMPUTED  # the original's output on ``inputs``, when an eager run already produced it
    if gm is not None:
        inputs = _shapes_then_float64(gm, work, given, _main_dtype(_dtype_map(model), given), device)
        _fuse_graph(gm, inputs, report, dtypes, main, True, remove_residuals)
        fused, reference = gm, work  # gm shares work's leaf modules but leaves work itself intact
    else:
        _to_float64(work)
        inputs, recorded, want = _record_float64(work, given)
        # a random twin (below) needs the original model itself
        reference = copy.deepcopy(work) if check and given is not None and is_degenerate(inputs) else None
        fused = _fuse_tree(work, recorded, report, dtypes, main, remove_residuals=remove_residuals,
                           trace_error=trace_error)

    if check:
        if inputs is None:
            warnings.warn("could not infer example inputs, so the fused model was NOT verified; pass "
                          "example_inputs=(x,) to reparam.fuse", VerificationSkippedWarning, stacklevel=3)
            report.notes.append("verification skipped: no example inputs")
        else:
            # checked against the eager model, not the traced graph: fx can trace a model unfaithfully
            # (``z = y; z += x`` becomes out of place).  Constant inputs hide wrong weights: add a random twin.
            report.max_rel_error = compare(fused, reference, inputs, want)
            if given is not None and is_degenerate(inputs):
                report.max_rel_error = max(report.max_rel_error, compare(fused, reference, random_like(inputs)))
    _cast_back(fused, dtypes, main, device)
    fused.reparam_report = report
    return fused, report


def _shapes_then_float64(gm: fx.GraphModule, work: nn.Module, given: Optional[tuple], native: torch.dtype,
                         device) -> Optional[tuple]:
    """Record shapes on ``gm`` (the trace of ``work``), then move both to float64 on the CPU; returns
    the float64 inputs (``given`` or inferred ones; None if none run).

    Shapes come from a run in the model's own precision and on its device (float32 convolutions are
    2-5x faster than float64 ones on a CPU); in float64 only if that fails (float16 on a CPU, say).
    """
    runs = lambda x: T.propagate_shapes(gm, x) is not None  # noqa: E731
    if given is not None:
        shaped = runs(_move(given, device))
    else:
        given = T.infer_example_inputs(work, gm, native, device, runs=runs)
        shaped = given is not None
    _to_float64(work, gm)
    if given is None:
        return T.infer_example_inputs(work, gm, torch.float64, "cpu", runs=runs)
    inputs = to_float64(_move(given, "cpu"))
    if not shaped:  # if float64 fails too, the model fails on these inputs: verification says so
        runs(inputs)
    return inputs


def _record_float64(work: nn.Module, given: Optional[tuple]) -> tuple[Optional[tuple], dict, Any]:
    """(float64 inputs, every submodule's inputs, the output) from one eager run of ``work``.

    ``given`` inputs are used as they are (a model that fails on them fails here, with its own
    error); otherwise inputs are inferred from the first layer.  No inputs: (None, {}, NOT_COMPUTED).
    """
    if given is not None:
        inputs = to_float64(_move(given, "cpu"))
        recorded, output = _record_inputs(work, inputs)
        return inputs, recorded, output
    runs: list = []
    inputs = T.infer_example_inputs(work, None, torch.float64, "cpu",
                                    runs=lambda x: runs.append(_try_record(work, x)) or runs[-1])
    return (inputs, *runs[-1]) if inputs is not None else (None, {}, NOT_COMPUTED)


def _try_record(module: nn.Module, inputs: tuple) -> Optional[tuple[dict, Any]]:
    try:
        return _record_inputs(module, inputs)
    except Exception:
        return None


def _to_float64(*modules: nn.Module) -> None:
    """Floating parameters and buffers of ``modules`` (in place) to float64 on the CPU; a traced
    GraphModule's own copies of buffers too (``Module.to`` replaces buffer tensors, so a module that
    shares submodules with another still holds the old ones otherwise)."""
    for module in modules:
        module.to(device="cpu", dtype=torch.float64)


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


def _cast_back(fused: nn.Module, dtypes: dict, main: torch.dtype, device) -> None:
    """Every tensor back to ``device`` and, if floating, to its original dtype (new ones: ``main``)."""
    _register_constants(fused)
    for name, t in list(fused.named_parameters(remove_duplicate=False)) + list(fused.named_buffers(remove_duplicate=False)):
        want = dtypes.get(name, main) if t.is_floating_point() else t.dtype
        if t.dtype != want or t.device != device:
            t.data = t.data.to(dtype=want, device=device)


def fuse(model: nn.Module, example_inputs=None, *, check: bool = True, remove_residuals: bool = False,
         dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Return a new module computing the same function as ``model`` with fewer, larger kernels.

    Inference semantics (BatchNorm with running statistics); same dtype and device; the input model is
    never modified.  ``example_inputs``: a tensor or tuple of positional inputs (inferred when omitted).
    ``check=True`` verifies the result in float64 and raises :class:`reparam.EquivalenceError` if it
    disagrees.  ``remove_residuals=True`` also removes ReLU residuals exactly (ResNets become plain).
    ``dtype`` (e.g. ``torch.float16``): cast the result to that precision after folding in float64.
    The report of rewrites and refusals is at ``fused.reparam_report``.
    """
    return fuse_with_report(model, example_inputs, check=check, remove_residuals=remove_residuals, dtype=dtype)[0]


def explain(model: nn.Module, example_inputs=None) -> Report:
    """Every rewrite :func:`fuse` would do and every merge it refuses, with the reason."""
    return fuse_with_report(model, example_inputs, check=False)[1]
