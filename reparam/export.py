"""Verified deployment files: ``.pt2`` (torch.export) and ``.onnx``.

Each export is written through :func:`reparam.io.atomic_write`: the file is produced under a temporary name,
loaded back and run (``torch.export.load`` / ONNX Runtime) on the example inputs and on a second batch size, and
compared with the fused model and, when given, the original model.  Only when every relative error
‖y − ref‖ / ‖ref‖ is within tolerance (1e-4 for float32) is the file moved to its final name; otherwise
:class:`ExportMismatchError` is raised and nothing is left on disk (``check=False`` writes it anyway and only
reports the errors).

Both formats get a dynamic batch axis (dimension 0 of every input) when the model allows it.

The same program gives the same bytes: a ``.pt2`` is serialised in memory (the archive gets torch's fixed root
name, not the temporary file's) without the pass-provenance metadata that records ``id()``s of graphs, and is then
written by Python, so that a full disk is an ``OSError`` (:class:`reparam.errors.OutputPathError`), not a C++
abort.

Public API: :func:`export_program`, :func:`export_pt2`, :func:`export_onnx` (returning an :class:`ExportResult`).
Drawings of a block's graph are :mod:`reparam.drawing`'s job.
"""

from __future__ import annotations

import contextlib
import io as _io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from reparam.errors import ExportError, ExportMismatchError, InputError, one_line
from reparam.io import atomic_write
from reparam.stats import as_args, max_abs_error, relative_error

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "ExportResult",
    "default_tolerance",
    "export_program",
    "export_pt2",
    "export_onnx",
]

#: ONNX opset written by default.  torch's exporter implements opset 18 and later; asking for 17 triggers a
#: down-conversion that fails on common graphs (Reduce* axes), so 18 is the lowest opset that always works.
DEFAULT_OPSET = 18
#: Lowest opset accepted.
MIN_OPSET = 17


@dataclass
class ExportResult:
    """What an export wrote and how closely the written file reproduces its references.

    ``errors`` / ``abs_errors`` map a reference name (``"fused"``, ``"original"``) to the largest relative L2 /
    absolute error of the file's outputs over the verification inputs.
    """

    path: Path
    format: str
    size: int
    dynamic_batch: bool
    errors: dict[str, float] = field(default_factory=dict)
    abs_errors: dict[str, float] = field(default_factory=dict)
    opset: int | None = None

    @property
    def max_error(self) -> float:
        """The largest relative error over all references (0.0 when nothing was compared)."""
        return max(self.errors.values(), default=0.0)


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative-error tolerance for outputs of ``dtype``: 1e-4 for float32, looser for 16-bit, tighter for 64."""
    return {torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-4)


# ------------------------------------------------------------------------------------------------ programs


def _batched(args: tuple, batch: int) -> tuple:
    """``args`` with every tensor's first axis resized to ``batch`` (rows repeated or dropped)."""

    def resize(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.ndim == 0:
            return t
        reps = -(-batch // t.shape[0])
        return t.repeat(reps, *([1] * (t.ndim - 1)))[:batch].clone()

    return tuple(resize(a) for a in args)


def _batch_size(args: tuple) -> int | None:
    sizes = {a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.ndim > 0}
    return sizes.pop() if len(sizes) == 1 else None


def export_program(
    model: torch.nn.Module, example_inputs: Any, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` in eval semantics, with a dynamic batch axis when possible.

    torch.export specialises a batch of 1, so the trace uses the example inputs repeated to a batch of 2.  When
    the model does not allow a dynamic batch (it reshapes with a fixed batch, say), a static export of the given
    example inputs is returned instead; ``program.range_constraints`` tells which one you got.
    Raises :class:`ExportError` when the model cannot be exported at all.
    """
    args = as_args(example_inputs)
    batch = _batch_size(args)
    if dynamic_batch and batch is not None:
        batch_dim = torch.export.Dim("batch")
        shapes = tuple({0: batch_dim} if isinstance(a, torch.Tensor) and a.ndim > 0 else None for a in args)
        with contextlib.suppress(Exception):
            return torch.export.export(model, _batched(args, max(batch, 2)), dynamic_shapes=shapes)
    try:
        return torch.export.export(model, args)
    except Exception as exc:
        raise ExportError(
            f"torch.export could not trace the model ({type(exc).__name__}: {one_line(exc)}). "
            "Re-run with --debug for the full error"
        ) from exc


def _is_dynamic(program: torch.export.ExportedProgram) -> bool:
    return bool(program.range_constraints)


def foreign_references(program: torch.export.ExportedProgram) -> list[str]:
    """Ops or functions in ``program`` that come from reparam (loading the file would need reparam installed)."""
    found = []
    for module in program.graph_module.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            target = node.target
            namespace = getattr(target, "namespace", None)
            origin = getattr(target, "__module__", "") or ""
            if namespace == "reparam" or origin == "reparam" or origin.startswith("reparam."):
                found.append(str(target))
    return found


def _verification_inputs(args: tuple, dynamic: bool) -> list[tuple]:
    """The example inputs, plus a copy with another batch size when the batch axis is dynamic."""
    inputs = [args]
    batch = _batch_size(args)
    if dynamic and batch is not None:
        inputs.append(_batched(args, batch + 1 if batch > 1 else 3))
    return inputs


def _verify(
    run_file: Callable[[tuple], Any],
    references: Mapping[str, Callable],
    inputs: Sequence[tuple],
    tolerance: float,
    check: bool,
    what: str,
) -> tuple[dict[str, float], dict[str, float]]:
    """Compare ``run_file`` with each reference on each input; raise when an error exceeds ``tolerance``."""
    errors = dict.fromkeys(references, 0.0)
    abs_errors = dict.fromkeys(references, 0.0)
    with torch.no_grad():
        for args in inputs:
            got = run_file(args)
            for name, reference in references.items():
                expected = reference(*args)
                errors[name] = max(errors[name], relative_error(got, expected))
                abs_errors[name] = max(abs_errors[name], max_abs_error(got, expected))
    bad = {name: err for name, err in errors.items() if not err <= tolerance}
    if bad and check:
        detail = ", ".join(f"{err:.3g} vs the {name} model" for name, err in bad.items())
        raise ExportMismatchError(
            f"the {what} disagrees with the model it was exported from: relative error "
            f"{detail} (tolerance {tolerance:g}). Re-run with --no-check to keep the file anyway "
            "and inspect it, or report the model"
        )
    return errors, abs_errors


def _references(model: torch.nn.Module, original: torch.nn.Module | None) -> dict[str, Callable]:
    refs = {"fused": model}
    if original is not None:
        refs["original"] = original
    return refs


def _output_dtype(model: torch.nn.Module, args: tuple) -> torch.dtype:
    with torch.no_grad():
        leaves = [t for t in tree_leaves(model(*args)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return leaves[0].dtype if leaves else torch.float32


#: Node metadata that records which pass created a node, with the ``id()`` of the graph it ran on: it would make
#: two saves of the same program differ, and a deploy file does not need it.
_PROVENANCE_KEYS = ("from_node",)


@contextlib.contextmanager
def _without_provenance(program: torch.export.ExportedProgram):
    """``program`` with its nodes' :data:`_PROVENANCE_KEYS` metadata set aside for the block (restored after)."""
    saved = []
    for module in program.graph_module.modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                for key in _PROVENANCE_KEYS:
                    if key in node.meta:
                        saved.append((node, key, node.meta.pop(key)))
    try:
        yield program
    finally:
        for node, key, value in saved:
            node.meta[key] = value


def export_pt2(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    original: torch.nn.Module | None = None,
    program: torch.export.ExportedProgram | None = None,
    tolerance: float | None = None,
    check: bool = True,
) -> ExportResult:
    """Export ``model`` with ``torch.export`` and save it to ``path`` (a ``.pt2`` archive), verified.

    The saved file is loaded back with ``torch.export.load`` and compared with ``model`` (and ``original`` when
    given) on the example inputs and another batch size.  It contains only ATen ops, so it loads without reparam
    installed; an op or function from reparam in the program raises :class:`ExportError`.  ``program`` reuses an
    :func:`export_program` result.  Returns an :class:`ExportResult`.
    """
    args = as_args(example_inputs)
    program = program if program is not None else export_program(model, args)
    foreign = foreign_references(program)
    if foreign:
        raise ExportError(
            f"the exported program calls reparam code ({', '.join(foreign[:3])}), so it would not load "
            "without reparam. This is a bug in reparam; please report it"
        )
    dynamic = _is_dynamic(program)
    tol = tolerance if tolerance is not None else default_tolerance(_output_dtype(model, args))

    # serialised in memory: the archive gets torch's fixed root name instead of the temporary file's random one
    # (the same program gives the same bytes), and a full disk fails in Python's write, not in C++ (an abort)
    archive = _io.BytesIO()
    with _without_provenance(program):
        torch.export.save(program, archive)

    def write(tmp: Path) -> tuple[dict, dict]:
        tmp.write_bytes(archive.getvalue())
        loaded = torch.export.load(tmp).module()
        inputs = _verification_inputs(args, dynamic)
        return _verify(lambda a: loaded(*a), _references(model, original), inputs, tol, check, ".pt2 file")

    errors, abs_errors = atomic_write(path, write)
    path = Path(path)
    return ExportResult(path, "pt2", path.stat().st_size, dynamic, errors, abs_errors)


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    *,
    original: torch.nn.Module | None = None,
    program: torch.export.ExportedProgram | None = None,
    tolerance: float | None = None,
    check: bool = True,
) -> ExportResult:
    """Export ``model`` to ONNX (``opset`` ≥ 17, dynamic batch axis) at ``path``, verified in ONNX Runtime.

    The file is checked with ``onnx.checker``, run in ONNX Runtime (CPU) on the example inputs and another batch
    size, and compared with ``model`` and ``original`` (when given).  Inputs are named ``input`` (``input_<i>``
    when there are several), outputs ``output`` / ``output_<i>``.  ``program`` reuses an :func:`export_program`
    result.  Returns an :class:`ExportResult` whose ``opset`` is the opset actually written.
    """
    if opset < MIN_OPSET:
        raise InputError(f"ONNX opset {opset} is too old. Use opset {MIN_OPSET} or later (default {DEFAULT_OPSET})")
    import onnx
    import onnxruntime

    args = as_args(example_inputs)
    program = program if program is not None else export_program(model, args)
    dynamic = _is_dynamic(program)
    tol = tolerance if tolerance is not None else default_tolerance(_output_dtype(model, args))
    tensor_args = [a for a in args if isinstance(a, torch.Tensor)]
    input_names = ["input"] if len(tensor_args) == 1 else [f"input_{i}" for i in range(len(tensor_args))]
    with torch.no_grad():
        n_outputs = len(tree_leaves(model(*args)))
    output_names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]

    try:
        with contextlib.redirect_stdout(_io.StringIO()):
            onnx_program = torch.onnx.export(
                program, opset_version=opset, input_names=input_names, output_names=output_names, verbose=False
            )
    except Exception as exc:
        raise _onnx_failure(exc) from exc

    def write(tmp: Path) -> tuple[dict, dict, int]:
        onnx_program.save(str(tmp))  # an OSError (full disk ...) is an output error, raised by atomic_write
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:
            raise _onnx_failure(exc) from exc
        written_opset = max(
            (
                o.version
                for o in onnx.load(str(tmp), load_external_data=False).opset_import
                if o.domain in ("", "ai.onnx")
            ),
            default=opset,
        )
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run(a: tuple) -> list:
            feeds = [t for t in a if isinstance(t, torch.Tensor)]
            return session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, feeds, strict=False)})

        errors, abs_errors = _verify(
            run,
            _references(model, original),
            _verification_inputs(args, dynamic),
            tol,
            check,
            "ONNX file (run in ONNX Runtime)",
        )
        return errors, abs_errors, written_opset

    errors, abs_errors, written_opset = atomic_write(path, write)
    path = Path(path)
    return ExportResult(path, "onnx", path.stat().st_size, dynamic, errors, abs_errors, written_opset)


def _onnx_failure(exc: BaseException) -> ExportError:
    return ExportError(
        f"ONNX export failed ({type(exc).__name__}: {one_line(exc)}). "
        "Re-run with --debug for the full error, or export only the .pt2 file"
    )
