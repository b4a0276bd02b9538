"""Post-training static int8 quantization of a fused model, written as an ExecuTorch ``.pte`` and / or a QDQ
``.onnx``, each run in its runtime after writing and compared with the float model.

before -> after: a float fused model and calibration inputs (:mod:`reparam.calib`) -> an int8 program whose
weights are int8 (per-channel symmetric by default, one scale per tensor with ``per_channel=False``) and whose
activations are int8 with ranges observed (min / max) on the calibration inputs.  Precondition: the model takes
one tensor and returns one tensor (a classifier or a backbone), and runs in float32.

- :func:`quantize_pte`: the PT2E flow — ``torch.export`` -> ``prepare_pt2e`` with ExecuTorch's
  ``XNNPACKQuantizer`` (``get_symmetric_quantization_config(is_per_channel=...)``: symmetric int8 weights,
  asymmetric int8 activations) -> one forward pass per calibration sample -> ``convert_pt2e`` -> ``torch.export``
  -> ``to_edge_transform_and_lower`` with the ``XnnpackPartitioner`` -> ``.pte``.  Static shape ``(1, C, H, W)``.
- :func:`quantize_onnx`: the float model exported to ONNX (verified in ONNX Runtime, :func:`reparam.export.
  export_onnx`), then ``onnxruntime.quantization.quantize_static`` (QDQ format, uint8 activations and int8
  weights — the U8S8 kernels ONNX Runtime's CPU provider runs fastest — per channel by default, min / max
  calibration).  Dynamic batch axis.

Each file is written atomically (:func:`reparam.io.atomic_write`): it is loaded and run in its own runtime on the
evaluation inputs (the calibration samples unless others are given) before it gets its name, and compared with
the float model there (:class:`Agreement`: output SNR, top-1 agreement, max abs error).  Quantization changes
the function, so nothing is enforced but finite outputs; the numbers and the calibration warnings are reported.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .calib import Calibration
from .errors import ExportError, one_line
from .export import DEFAULT_OPSET, ExportResult, export_onnx
from .io import atomic_write
from .quant import snr_db
from .verify import relative_error

__all__ = ["LOW_SNR_DB", "Agreement", "Int8Result", "agreement", "quantize_pte", "quantize_onnx"]

#: An int8 program whose output SNR against the float model is below this draws a warning.
LOW_SNR_DB = 20.0


@dataclass(frozen=True)
class Agreement:
    """An int8 program's outputs against the float model's on the same inputs.

    ``snr_db`` = ``10 log10(Σ y² / Σ (y − y_int8)²)`` over all outputs (:func:`reparam.quant.snr_db`);
    ``top1`` = fraction of samples whose arg-max class agrees (None unless the output is ``(N, classes)``);
    ``max_abs`` = ``max |y − y_int8|``; ``samples`` = how many inputs were compared.
    """

    snr_db: float
    top1: Optional[float]
    max_abs: float
    samples: int


def agreement(got: torch.Tensor, want: torch.Tensor) -> Agreement:
    """:class:`Agreement` of ``got`` (int8 program outputs) with ``want`` (float outputs), both ``(N, ...)``."""
    got, want = got.detach().double(), want.detach().double()
    top1 = float((got.argmax(1) == want.argmax(1)).double().mean()) if want.ndim == 2 and want.shape[1] > 1 else None
    return Agreement(snr_db(want, got), top1, float((got - want).abs().max()), len(want))


@dataclass
class Int8Result(ExportResult):
    """An :class:`~reparam.export.ExportResult` of an int8 program, with how it agrees with the float model.

    ``errors["fused"]`` / ``errors["original"]``: relative L2 error against the float fused / original model on
    the evaluation inputs (``abs_errors`` likewise).
    """

    runtime: str = ""
    per_channel: bool = True
    agreement: Optional[Agreement] = None
    calibration: str = ""
    warnings: list[str] = field(default_factory=list)
    delegated: Optional[int] = None
    total_ops: Optional[int] = None
    verified_in: Optional[str] = None
    precision: str = "int8"

    @property
    def granularity(self) -> str:
        return "per-channel" if self.per_channel else "per-tensor"


def _float_outputs(model: nn.Module, samples: Sequence[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x) for x in samples])


def _finish(
    path: Path,
    fmt: str,
    got: torch.Tensor,
    want: torch.Tensor,
    original: Optional[torch.Tensor],
    runtime: str,
    per_channel: bool,
    calibration: Calibration,
    dynamic: bool,
    **extra,
) -> Int8Result:
    """The :class:`Int8Result` of a written file; raises :class:`ExportError` on non-finite outputs."""
    if not torch.isfinite(got).all():
        raise ExportError(
            f"the int8 {fmt} program returns non-finite values in {runtime}. Check the calibration "
            "inputs (they set the activation ranges)"
        )
    agree = agreement(got, want)
    warnings = list(calibration.warnings)
    if agree.snr_db < LOW_SNR_DB:
        warnings.append(
            f"int8 {fmt} output SNR {agree.snr_db:.1f} dB < {LOW_SNR_DB:g} dB against the float model"
            + ("" if per_channel else "; per-channel weights usually do better")
            + "; see docs/quantization.md (equalization, mixed precision)"
        )
    errors, abs_errors = {"fused": relative_error(got, want)}, {"fused": agree.max_abs}
    if original is not None:
        errors["original"] = relative_error(got, original)
        abs_errors["original"] = float((got.double() - original.double()).abs().max())
    return Int8Result(
        path,
        fmt,
        path.stat().st_size,
        dynamic,
        errors,
        abs_errors,
        runtime=runtime,
        per_channel=per_channel,
        agreement=agree,
        calibration=calibration.source,
        warnings=warnings,
        verified_in=runtime,
        **extra,
    )


# ------------------------------------------------------------------------------------------------ ExecuTorch


def quantize_pte(
    model: nn.Module,
    calibration: Calibration,
    path: str | os.PathLike,
    *,
    per_channel: bool = True,
    eval_samples: Optional[Sequence[torch.Tensor]] = None,
    original: Optional[nn.Module] = None,
) -> Int8Result:
    """Quantize ``model`` (float32) with the PT2E flow for XNNPACK and write the ExecuTorch program (module
    docstring); returns how its outputs, run in ExecuTorch's runtime, agree with ``model``'s (and
    ``original``'s, when given)."""
    from .mobile import _delegation, _import_executorch, _quiet_native, _quiet_python

    et = _import_executorch()
    samples = list(eval_samples) if eval_samples is not None else calibration.samples
    example = (calibration.samples[0],)
    try:
        with _quiet_python(), torch.no_grad():
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
            prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
            for x in calibration.samples:
                prepared(x)
            quantized = convert_pt2e(prepared)
            program = torch.export.export(quantized, example)
            edge = et["to_edge_transform_and_lower"](program, partitioner=[et["XnnpackPartitioner"]()])
            delegated, total = _delegation(et["get_delegation_info"], edge)
            buffer = edge.to_executorch().buffer
    except Exception as exc:
        raise ExportError(
            f"int8 quantization for ExecuTorch failed ({type(exc).__name__}: "
            f"{one_line(exc)}). Re-run with --debug "
            "for the full error"
        ) from exc
    want = _float_outputs(model, samples)
    reference = _float_outputs(original, samples) if original is not None else None

    def write(tmp: Path) -> torch.Tensor:
        tmp.write_bytes(buffer)
        with _quiet_native():
            method = et["Runtime"].get().load_program(tmp).load_method("forward")
            return torch.cat([method.execute([x.contiguous()])[0] for x in samples])

    got = atomic_write(path, write)
    return _finish(
        Path(path),
        "pte",
        got,
        want,
        reference,
        f"ExecuTorch {et['version'] or ''} (XNNPACK)".strip(),
        per_channel,
        calibration,
        False,
        delegated=delegated,
        total_ops=total,
    )


# ------------------------------------------------------------------------------------------------ ONNX Runtime


def _reader(name: str, samples: Sequence[torch.Tensor]):
    """An ``onnxruntime.quantization.CalibrationDataReader`` feeding ``samples`` to input ``name``, once."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter([{name: x.numpy()} for x in samples])

        def get_next(self):
            return next(self._feeds, None)

    return Reader()


def quantize_onnx(
    model: nn.Module,
    calibration: Calibration,
    path: str | os.PathLike,
    *,
    per_channel: bool = True,
    opset: int = DEFAULT_OPSET,
    eval_samples: Optional[Sequence[torch.Tensor]] = None,
    original: Optional[nn.Module] = None,
) -> Int8Result:
    """Export ``model`` to ONNX, quantize it statically to QDQ int8 with ONNX Runtime and write it (module
    docstring); returns how its outputs, run in ONNX Runtime, agree with ``model``'s (and ``original``'s)."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .mobile import _quiet_python

    samples = list(eval_samples) if eval_samples is not None else calibration.samples
    want = _float_outputs(model, samples)
    reference = _float_outputs(original, samples) if original is not None else None
    with tempfile.TemporaryDirectory(prefix="reparam-int8-") as scratch:
        float_path = Path(scratch) / "float.onnx"
        float_result = export_onnx(model, (torch.cat(calibration.samples[:2]),), float_path, opset)

        def write(tmp: Path) -> torch.Tensor:
            with _quiet_python():
                quantize_static(
                    str(float_path),
                    str(tmp),
                    _reader("input", calibration.samples),
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                )
            session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            spec = session.get_inputs()[0]
            batches = [torch.cat(samples)] if not isinstance(spec.shape[0], int) else samples  # static batch: 1
            return torch.cat(
                [torch.from_numpy(session.run(None, {spec.name: np.ascontiguousarray(b.numpy())})[0]) for b in batches]
            )

        got = atomic_write(path, write)
    result = _finish(
        Path(path),
        "onnx",
        got,
        want,
        reference,
        f"ONNX Runtime {onnxruntime.__version__}",
        per_channel,
        calibration,
        float_result.dynamic_batch,
    )
    result.opset = float_result.opset
    return result
