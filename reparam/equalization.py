"""``reparam.equalize(model)`` and ``reparam.fuse(model, equalize=True)``: cross-layer equalization of a (fused)
model, verified in float64, with each touched layer's int8 weight SNR before -> after.

before -> after: a model whose conv/linear layers are joined by positively homogeneous ops -> the same model with
per-channel weight ranges balanced between producer and consumer layers (the rule and its precondition:
:mod:`reparam.passes.equalize`).  The function is unchanged: the result is run against its input in float64
and must agree to a relative L2 error of :data:`EXACT` (or, for a model whose own float64 rounding noise is
larger, within ``NOISE_FACTOR`` times of it, as :func:`reparam.verify.compare_outputs` decides for ``fuse``), else
:class:`reparam.EquivalenceError`.

Every layer whose weights changed gets a report rewrite ``where: int8 per-tensor SNR a dB -> b dB`` (event
``equalize``; SNR as defined in :mod:`reparam.quant`); every producer left alone gets a refusal with the
reason.  The numbers are also at ``report.equalization`` (an :class:`Equalization`; ``fused.reparam_report``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from . import trace as T
from .errors import ReparamError
from .passes.equalize import CONVERGED, MAX_ROUNDS, equalize_graph
from .quant import analyze_model
from .report import Report, Rewrite
from .verify import compare_outputs, fresh, is_degenerate, perturbed, random_like, to_float64

__all__ = ["EXACT", "LayerSNR", "Equalization", "equalize", "equalize_in_place"]

#: Largest relative L2 error (float64) between a model and its equalized twin.
EXACT = 1e-10


@dataclass(frozen=True)
class LayerSNR:
    """int8 symmetric weight SNR (dB, :mod:`reparam.quant`) of one layer before and after equalization."""

    name: str
    before_db: float
    after_db: float
    before_worst_channel_db: float
    after_worst_channel_db: float


@dataclass
class Equalization:
    """What equalization did to a model: per-layer SNR rows, links equalized, rounds, float64 error."""

    layers: list[LayerSNR] = field(default_factory=list)
    links: int = 0
    rounds: int = 0
    last_change: float = 0.0  # the last round's largest |s_c - 1|: below CONVERGED when it converged
    max_rel_error: float | None = None

    @property
    def worst_before_db(self) -> float:
        """Lowest per-tensor int8 SNR over the touched layers before equalization (inf when none)."""
        return min((r.before_db for r in self.layers), default=math.inf)

    @property
    def worst_after_db(self) -> float:
        """Lowest per-tensor int8 SNR over the touched layers after equalization (inf when none)."""
        return min((r.after_db for r in self.layers), default=math.inf)

    def __str__(self) -> str:
        lines = [
            f"equalization: {self.links} layer pairs, {self.rounds} rounds; worst per-tensor int8 weight SNR "
            f"{self.worst_before_db:.1f} -> {self.worst_after_db:.1f} dB"
        ]
        lines += [
            f"  {r.name}: {r.before_db:.1f} -> {r.after_db:.1f} dB (worst channel "
            f"{r.before_worst_channel_db:.1f} -> {r.after_worst_channel_db:.1f} dB)"
            for r in self.layers
        ]
        if self.max_rel_error is not None:
            lines.append(f"  verified: relative error {self.max_rel_error:.1e} (float64)")
        return "\n".join(lines)


def _graphs(model: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """The outermost GraphModules of ``model`` (the whole model, or its fused parts), with their paths."""
    found: list[tuple[str, fx.GraphModule]] = []
    for name, module in model.named_modules():
        if isinstance(module, fx.GraphModule) and not any(name.startswith(f"{p}.") or p == "" for p, _ in found):
            found.append((name, module))
    return found


def _weights(model: nn.Module) -> dict:
    """Copies of every module's ``weight``, by the name :func:`reparam.quant.analyze_model` gives the layer."""
    return {
        name or "(model)": m.weight.detach().clone()
        for name, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
    }


def _run(model: nn.Module, inputs: tuple):
    with torch.no_grad():
        return model(*fresh(inputs))


def _refuse_under(report: Report, prefix: str) -> Callable[[str, str], None]:
    """``refuse(where, why)`` recording the refusal at ``prefix + where`` (a part's path in the model)."""
    return lambda where, why: report.refuse(prefix + where, why)


def equalize_in_place(model: nn.Module, inputs: tuple | None, report: Report, check: bool = True) -> Equalization:
    """Equalize the float64 ``model``'s GraphModules in place; refusals and per-layer rewrites go to ``report``.

    Precondition: ``model`` is float64 and its layers belong to it alone.  With ``check`` and ``inputs``
    (float64), the result must match the model before equalization to :data:`EXACT` (``EquivalenceError``).
    """
    reference = copy.deepcopy(model) if check and inputs is not None else None
    before_w = _weights(model)
    before = {row.name: row for row in analyze_model(model).layers}
    result = Equalization()
    for path, gm in _graphs(model):
        done, rounds, change = equalize_graph(gm, _refuse_under(report, f"{path}." if path else ""))
        result.links += len(done)
        result.rounds, result.last_change = max(result.rounds, rounds), max(result.last_change, change)
    if result.last_change >= CONVERGED:
        report.notes.append(
            f"equalization stopped after {MAX_ROUNDS} rounds with scales still moving by up to "
            f"{result.last_change:.1e} (not fully balanced; still exact)"
        )
    after_w = _weights(model)
    for row in analyze_model(model).layers:
        old = before.get(row.name)
        if old is None or torch.equal(before_w[row.name], after_w[row.name]):
            continue
        result.layers.append(
            LayerSNR(
                row.name,
                old.per_tensor_snr_db,
                row.per_tensor_snr_db,
                old.per_tensor_worst_channel_snr_db,
                row.per_tensor_worst_channel_snr_db,
            )
        )
        report.rewrites.append(
            Rewrite(
                row.name,
                f"int8 per-tensor SNR {old.per_tensor_snr_db:.1f} dB",
                f"{row.per_tensor_snr_db:.1f} dB",
                ("equalize",),
            )
        )
    if reference is not None:
        x = random_like(inputs) if is_degenerate(inputs) else inputs
        noisy = perturbed(reference)
        result.max_rel_error = compare_outputs(
            _run(model, x),
            _run(reference, x),
            "equalized output",
            EXACT,
            noise=lambda: _run(noisy, x),
            notes=report.notes,
        )
    elif check:
        report.notes.append("equalization not verified: no example inputs")
    report.notes.append(str(result).splitlines()[0])
    report.equalization = result
    return result


def equalize(model: nn.Module, example_inputs=None, *, check: bool = True) -> nn.Module:
    """A copy of ``model`` with cross-layer equalization applied (see the module docstring).

    ``model``: usually the output of :func:`reparam.fuse` (``reparam.fuse(model, equalize=True)`` does both); a
    plain model is traced with torch.fx first.  Equalization runs in float64; the result keeps each tensor's
    dtype and device.  ``check=True`` verifies it against ``model`` in float64 on ``example_inputs`` (inferred
    when omitted).  The report is at ``result.reparam_report``, the SNR rows at ``result.reparam_report.equalization``.
    """
    if not isinstance(model, nn.Module):
        raise ReparamError(f"reparam.equalize expects an nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model).eval()
    if not _graphs(work):
        try:
            work = T.symbolic_trace(work)
        except Exception as err:  # noqa: BLE001  tracing the user's code: any failure is reported, chained
            raise ReparamError(
                f"{type(model).__name__} does not trace with torch.fx ({type(err).__name__}); "
                "fuse it first: reparam.fuse(model, equalize=True)"
            ) from err
    dtypes = {n: t.dtype for n, t in list(work.named_parameters()) + list(work.named_buffers())}
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    work.to(device="cpu", dtype=torch.float64)
    if example_inputs is None:
        gm = work if isinstance(work, fx.GraphModule) else None
        inputs = T.infer_example_inputs(work, gm, torch.float64, "cpu")
    else:
        inputs = to_float64(example_inputs if isinstance(example_inputs, tuple) else (example_inputs,))
        inputs = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in inputs)
    report = Report()
    equalize_in_place(work, inputs, report, check)
    for name, t in list(work.named_parameters()) + list(work.named_buffers()):
        t.data = t.data.to(dtype=dtypes.get(name, t.dtype) if t.is_floating_point() else t.dtype, device=device)
    work.reparam_report = report
    return work
