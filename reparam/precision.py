"""Can the model be deployed in a narrower float type?  Checked on the original model, before any fusing.

A model whose activations outgrow float16's range (65504) computes ``inf``/``nan`` in float16 however well its
weights are folded; finding that out from the deploy file's check costs the whole conversion and ends in a
misleading "disagrees ... report the model".  :func:`check_precision` finds it in one float64 run of the
original model (plus one run in the target type) and names where it happens.

Two faults are raised as :class:`PrecisionError`:

- **range**: some module's output, in float64, holds a finite value beyond ``torch.finfo(dtype).max``;
- **accuracy**: the original model simply cast to ``dtype`` differs from its float64 run by a relative L2 error
  above :func:`accuracy_limit` (the tolerance the exported files are later checked with,
  :func:`reparam.export.default_tolerance`: 1e-2 for float16, 5e-2 for bfloat16), so its deploy files would be
  refused after the full conversion.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from reparam.dtypes import dtype_name
from reparam.errors import PrecisionError
from reparam.stats import as_args, relative_error

__all__ = ["Peak", "activation_peak", "accuracy_limit", "check_precision"]


@dataclass
class Peak:
    """The largest finite activation magnitude of a run, and the module whose output holds it.

    ``first_beyond`` is the first module (in execution order) whose output exceeds the ``limit`` given to
    :func:`activation_peak` (None when none does); ``output`` is what the model returned.
    """

    value: float
    module: str
    kind: str
    first_beyond: str | None = None
    output: Any = None  # what the model returned


def _name(names: dict, module: nn.Module) -> str:
    return names.get(module) or "(the model)"


def activation_peak(model: nn.Module, inputs: Any, limit: float = math.inf) -> Peak:
    """Run ``model`` on ``inputs`` (no grad) and return the largest finite magnitude of any module's output.

    Every module's forward output is measured (hooks; modules that return an input unchanged, such as
    ``nn.Identity``, are skipped so that the value is named after the module that computed it).  The innermost
    module holding the peak is named.  ``model`` is run as it is: give it a float64 copy to measure the range of
    the exact computation.
    """
    names = {m: n for n, m in model.named_modules()}
    peak = Peak(0.0, _name(names, model), type(model).__name__)

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        passed = {id(a) for a in tree_leaves(args) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(output):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0 or id(t) in passed:
                continue
            magnitude = t.detach().abs()
            magnitude = magnitude[torch.isfinite(magnitude)]
            largest = float(magnitude.max()) if magnitude.numel() else 0.0
            if largest > peak.value:
                peak.value, peak.module, peak.kind = largest, _name(names, module), type(module).__name__
            if largest > limit and peak.first_beyond is None:
                peak.first_beyond = _name(names, module)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        peak.output = _run(model, as_args(inputs))
    finally:
        for handle in handles:
            handle.remove()
    return peak


def accuracy_limit(dtype: torch.dtype) -> float:
    """The largest relative error allowed for the original model run in ``dtype`` (vs float64)."""
    from reparam.export import default_tolerance

    return default_tolerance(dtype)


def _cast(module: nn.Module, inputs: tuple, dtype: torch.dtype) -> tuple[nn.Module, tuple]:
    """A copy of ``module`` and copies of the floating ``inputs`` in ``dtype``, on the module's device."""
    device = next((t.device for t in list(module.parameters()) + list(module.buffers())), torch.device("cpu"))
    cast = tuple(
        a.to(device=device, dtype=dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in inputs
    )
    return copy.deepcopy(module).eval().to(dtype), cast


def _instead(dtype: torch.dtype, fault: str) -> str:
    """What to deploy in instead of ``dtype`` after a ``"range"`` or ``"accuracy"`` fault."""
    own = "the model's own precision (leave out the dtype)"
    if dtype == torch.float16:
        return f"bfloat16 (float32's range) or {own}" if fault == "range" else f"float32 or {own}"
    if dtype == torch.bfloat16 and fault == "accuracy":
        return f"float16 (more precise, but with a range of 65504) or {own}"
    return own


def _run(model: nn.Module, inputs: tuple) -> Any:
    with torch.no_grad():
        return model(*inputs)


def _worst_error(got: Any, want: Any) -> float:
    pairs = [
        (a, b)
        for a, b in zip(tree_leaves(got), tree_leaves(want), strict=True)  # one model, two dtypes
        if isinstance(b, torch.Tensor) and b.is_floating_point() and isinstance(a, torch.Tensor)
    ]
    return max((relative_error(a, b) if torch.isfinite(a).all() else math.inf for a, b in pairs), default=0.0)


def check_precision(model: nn.Module, inputs: Any, dtype: torch.dtype) -> None:
    """Raise :class:`PrecisionError` when ``model`` cannot compute in ``dtype`` on ``inputs``; return None if it can.

    ``model`` is the original (unfused) model and is not modified: it is copied to float64 and run on ``inputs``
    (a tensor or a tuple of positional inputs) with every module's output measured (:func:`activation_peak`); a
    finite value beyond ``torch.finfo(dtype).max`` raises.  Then a copy cast to ``dtype`` is run on the inputs
    cast to ``dtype``: a relative L2 error above :func:`accuracy_limit` against the float64 run (or a non-finite
    output) raises.  A model whose float64 output is itself not finite, or that cannot run in ``dtype`` on its
    device (a missing kernel), is judged by the range alone.  The message is one line naming the largest value
    and the module that produced it.  Costs one float64 and one ``dtype`` forward pass.
    """
    if not dtype.is_floating_point:
        raise PrecisionError(f"dtype must be a floating type such as torch.float16, got {dtype}")
    name, largest = dtype_name(dtype), torch.finfo(dtype).max
    args = as_args(inputs)
    exact, exact_args = _cast(model, args, torch.float64)
    peak = activation_peak(exact, exact_args, limit=largest)
    where = f"{peak.module} ({peak.kind})"
    if peak.value > largest:
        first = "" if peak.first_beyond in (None, peak.module) else f", first exceeded in {peak.first_beyond}"
        raise PrecisionError(
            f"the model's activations reach {peak.value:.3g} in {where}, beyond {name}'s largest "
            f"finite value {largest:.6g}{first}: in {name} they overflow to inf. Deploy in "
            f"{_instead(dtype, 'range')}"
        )
    want = peak.output
    if not all(
        torch.isfinite(t).all() for t in tree_leaves(want) if isinstance(t, torch.Tensor) and t.is_floating_point()
    ):
        return
    try:
        got = _run(*_cast(model, args, dtype))
    except (RuntimeError, NotImplementedError):  # e.g. an op without a kernel for this dtype on this device
        return
    error, limit = _worst_error(got, want), accuracy_limit(dtype)
    if not error <= limit:
        raise PrecisionError(
            f"the model loses too much accuracy in {name}: run in {name} it differs from its "
            f"float64 run by relative error {error:.3g} (limit {limit:g}); its largest activation "
            f"is {peak.value:.3g} in {where}. Deploy in {_instead(dtype, 'accuracy')}"
        )
