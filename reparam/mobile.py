"""Mobile deployment files: ExecuTorch programs (``.pte``, XNNPACK) and Core ML packages (``.mlpackage``).

Both take the *fused* model (``reparam.fuse(model)``) and its example inputs.

- :func:`export_pte` exports with ``torch.export`` (static shapes: the example inputs' shapes, as mobile runtimes
  plan memory ahead), lowers with ``executorch.exir.to_edge_transform_and_lower(program,
  partitioner=[XnnpackPartitioner()]).to_executorch()``, writes the program atomically and verifies it by loading
  the file in ExecuTorch's host runtime (``executorch.runtime.Runtime``) and running it on the example inputs and on
  a second random input of the same shape; every relative L2 error ‖y − ref‖ / ‖ref‖ against the fused model (and
  the original model, when given) must be within tolerance (1e-4 for float32, 1e-2 for float16), else
  :class:`reparam.errors.ExportMismatchError` and nothing is written (``check=False`` only reports).
  float16 models are delegated to XNNPACK like float32 ones; bfloat16 is refused (XNNPACK delegates nothing in
  bfloat16, so the program would run on ExecuTorch's slow reference kernels).
- :func:`export_coreml` converts with ``coremltools`` (``mlprogram``, float32 or float16 compute precision).
  Conversion only: Core ML runs on Apple platforms, so the package is checked for well-formedness (its spec loads
  and names the expected inputs and outputs) but not run.

Both packages are optional (``pip install 'reparam[mobile]'``): without them the functions raise
:class:`~reparam.errors.MissingPackageError` (an :class:`~reparam.errors.InputError`, exit code 2 in the CLI) with
a one-line message saying what to install.  :func:`executorch_status` / :func:`coreml_status` tell whether a package
can be used and, if not, why.

To compare a float16 deploy model with its float32 original on the same inputs, give the original wrapped in
:class:`reparam.modules.CastInputs`.
"""

from __future__ import annotations

import contextlib
import io as _io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from reparam.dtypes import dtype_name, floating_dtype
from reparam.errors import (
    ExportError,
    InputError,
    MissingPackageError,
    OutputPathError,
    UnsupportedDtypeError,
    one_line,
)
from reparam.export import ExportResult, _output_dtype, _references, _verify, default_tolerance
from reparam.io import atomic_write, atomic_write_dir
from reparam.packages import package_version
from reparam.stats import as_args
from reparam.verify import random_like

__all__ = [
    "INSTALL_HINT",
    "MobileResult",
    "executorch_status",
    "coreml_status",
    "require_executorch",
    "require_coremltools",
    "check_pte_dtype",
    "check_coreml_dtype",
    "export_pte",
    "export_coreml",
]

#: What to run to get the optional mobile packages (executorch, which pins coremltools).
INSTALL_HINT = "pip install 'reparam[mobile]'"


@dataclass
class MobileResult(ExportResult):
    """An :class:`~reparam.export.ExportResult` with mobile details.

    ``delegated`` / ``total_ops``: operators of the lowered program that XNNPACK runs, out of all (``.pte``;
    ``None`` when unknown).  ``verified_in``: the runtime that ran the file, or ``None`` when it was not run
    (Core ML off Apple platforms).  ``precision``: the dtype the file computes in.
    """

    delegated: int | None = None
    total_ops: int | None = None
    verified_in: str | None = None
    precision: str | None = None


# ---------------------------------------------------------------------------------------- optional packages


@contextlib.contextmanager
def _quiet_python() -> Iterator[None]:
    """Silence Python-level chatter (progress bars, warnings, log records) of a third-party step."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(_io.StringIO()),
        contextlib.redirect_stderr(_io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


@contextlib.contextmanager
def _quiet_native() -> Iterator[None]:
    """Silence native code's writes to file descriptor 2 (ExecuTorch's runtime logs CPU probing there).

    What was written is replayed to stderr if the block raises, so a failure keeps its native diagnostics.
    """
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (embedded interpreters): nothing to silence
        yield
        return
    failed = False
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 2)
            yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                sink.seek(0)
                text = sink.read().decode(errors="replace")
                if text:
                    import sys

                    sys.stderr.write(text)


def _import_executorch() -> dict[str, Any]:
    """The ExecuTorch entry points reparam uses; raises :class:`MissingPackageError` with the reason."""
    version = package_version("executorch")
    try:
        with _quiet_python():
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower
            from executorch.runtime import Runtime
    except Exception as exc:  # ImportError, or an ABI mismatch with this torch (OSError, RuntimeError...)
        if version is None:
            raise MissingPackageError(
                "writing a .pte file needs ExecuTorch (the executorch package), which is not "
                f"installed. Install it with {INSTALL_HINT}"
            ) from exc
        raise MissingPackageError(
            f"executorch {version} is installed but cannot be imported beside torch "
            f"{torch.__version__} ({type(exc).__name__}: {one_line(exc)}). Reinstall a matching "
            f"version with {INSTALL_HINT}"
        ) from exc
    try:
        from executorch.devtools.backend_debug import get_delegation_info
    except (ImportError, OSError, RuntimeError):  # devtools are optional for us: only the delegation count is lost
        get_delegation_info = None
    return {
        "XnnpackPartitioner": XnnpackPartitioner,
        "to_edge_transform_and_lower": to_edge_transform_and_lower,
        "Runtime": Runtime,
        "get_delegation_info": get_delegation_info,
        "version": version,
    }


def _import_coremltools() -> Any:
    version = package_version("coremltools")
    try:
        with _quiet_python():
            import coremltools
    except Exception as exc:
        if version is None:
            raise MissingPackageError(
                "writing a .mlpackage needs coremltools, which is not installed. Install it "
                f"with {INSTALL_HINT} (or pip install coremltools)"
            ) from exc
        raise MissingPackageError(
            f"coremltools {version} is installed but cannot be imported ({type(exc).__name__}: "
            f"{one_line(exc)}). Reinstall it with {INSTALL_HINT}"
        ) from exc
    return coremltools


def require_executorch() -> str:
    """Import ExecuTorch now (fail fast); returns its version.  Raises :class:`MissingPackageError`."""
    return _import_executorch()["version"] or "unknown"


def require_coremltools() -> str:
    """Import coremltools now (fail fast); returns its version.  Raises :class:`MissingPackageError`."""
    return getattr(_import_coremltools(), "__version__", None) or "unknown"


def executorch_status() -> tuple[bool, str]:
    """``(True, version)`` when ExecuTorch can be used, else ``(False, the one-line reason)``."""
    try:
        return True, require_executorch()
    except MissingPackageError as exc:
        return False, str(exc)


def coreml_status() -> tuple[bool, str]:
    """``(True, version)`` when coremltools can be used, else ``(False, the one-line reason)``."""
    try:
        return True, require_coremltools()
    except MissingPackageError as exc:
        return False, str(exc)


def check_pte_dtype(dtype: torch.dtype) -> None:
    """Raise :class:`UnsupportedDtypeError` unless ExecuTorch's XNNPACK backend delegates models of ``dtype``."""
    if dtype not in (torch.float32, torch.float16):
        raise UnsupportedDtypeError(
            f"a .pte file in {dtype_name(dtype)} would not run on XNNPACK (it delegates "
            "float32 and float16 only). Use --dtype float16 or float32 for --pte"
        )


def check_coreml_dtype(dtype: torch.dtype) -> None:
    """Raise :class:`UnsupportedDtypeError` unless Core ML can compute in ``dtype``."""
    if dtype not in (torch.float32, torch.float16):
        raise UnsupportedDtypeError(
            f"Core ML computes in float32 or float16, not {dtype_name(dtype)}. "
            "Use --dtype float16 or float32 for --coreml"
        )


# ------------------------------------------------------------------------------------------------ ExecuTorch


def export_pte(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    original: nn.Module | None = None,
    tolerance: float | None = None,
    check: bool = True,
) -> MobileResult:
    """Lower ``model`` to an ExecuTorch program with the XNNPACK partitioner and write it to ``path``, verified.

    The program has the example inputs' static shapes.  The written file is loaded in ExecuTorch's runtime and run
    on the example inputs and a random input of the same shapes, and compared with ``model`` and ``original``
    (when given; give a :class:`reparam.modules.CastInputs` wrapper when ``original`` takes another dtype).  Raises
    :class:`MissingPackageError` without ExecuTorch, :class:`UnsupportedDtypeError` for bfloat16,
    :class:`~reparam.errors.ExportError` when export or lowering fails and
    :class:`~reparam.errors.ExportMismatchError` when the program disagrees (nothing is written then).
    """
    et = _import_executorch()
    args = as_args(example_inputs)
    dtype = floating_dtype(model, args) or torch.float32
    check_pte_dtype(dtype)
    tol = tolerance if tolerance is not None else default_tolerance(_output_dtype(model, args))
    try:
        with _quiet_python(), torch.no_grad():
            program = torch.export.export(model, args)
    except Exception as exc:
        raise ExportError(
            f"torch.export could not trace the model for ExecuTorch ({type(exc).__name__}: "
            f"{one_line(exc)}). Re-run with --debug for the full error"
        ) from exc
    try:
        with _quiet_python():
            edge = et["to_edge_transform_and_lower"](program, partitioner=[et["XnnpackPartitioner"]()])
            delegated, total = _delegation(et["get_delegation_info"], edge)
            buffer = edge.to_executorch().buffer
    except Exception as exc:
        raise ExportError(
            f"ExecuTorch lowering failed ({type(exc).__name__}: {one_line(exc)}). Re-run with "
            "--debug for the full error, or export only the .pt2 / .onnx file"
        ) from exc

    def write(tmp: Path) -> tuple[dict, dict]:
        tmp.write_bytes(buffer)
        with _quiet_native():
            method = et["Runtime"].get().load_program(tmp).load_method("forward")

        def run(a: tuple) -> list:
            feeds = [t.contiguous() for t in a if isinstance(t, torch.Tensor)]
            with _quiet_native():
                return list(method.execute(feeds))

        inputs = [args, random_like(args)]
        return _verify(run, _references(model, original), inputs, tol, check, ".pte file (run in ExecuTorch)")

    errors, abs_errors = atomic_write(path, write)
    path = Path(path)
    return MobileResult(
        path,
        "pte",
        path.stat().st_size,
        False,
        errors,
        abs_errors,
        delegated=delegated,
        total_ops=total,
        verified_in=f"ExecuTorch {et['version'] or ''}".strip(),
        precision=dtype_name(dtype),
    )


def _delegation(get_delegation_info: Any, edge: Any) -> tuple[int | None, int | None]:
    """(operators delegated to XNNPACK, all operators) of a lowered edge program, or (None, None)."""
    if get_delegation_info is None:
        return None, None
    try:
        info = get_delegation_info(edge.exported_program().graph_module)
        delegated, rest = int(info.num_delegated_nodes), int(info.num_non_delegated_nodes)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError):  # devtools of another shape: count unknown
        return None, None
    return delegated, delegated + rest


# ------------------------------------------------------------------------------------------------- Core ML


def export_coreml(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    precision: torch.dtype = torch.float32,
    minimum_deployment_target: str | None = None,
) -> MobileResult:
    """Convert ``model`` to a Core ML ``mlprogram`` package at ``path`` (a ``.mlpackage`` directory).

    The model is converted in float32 (a half-precision model is upcast first; its values are unchanged) and
    computes in ``precision`` (``torch.float32`` or ``torch.float16``) on the device.  Inputs keep the example
    inputs' static shapes and are named ``input`` (``input_<i>``), outputs ``output`` (``output_<i>``).
    ``minimum_deployment_target``: a ``coremltools.target`` name such as ``"iOS16"`` (default: coremltools').

    Conversion only: the package's spec is loaded back and its input / output names checked, but it is not run
    (Core ML needs macOS).  The package is written next to ``path`` and moved into place, replacing an existing
    package of that name only when conversion succeeded.  Raises :class:`MissingPackageError` without
    coremltools, :class:`UnsupportedDtypeError` for other precisions and :class:`~reparam.errors.ExportError`
    when conversion fails.
    """
    ct = _import_coremltools()
    check_coreml_dtype(precision)
    path = Path(path)
    if path.suffix.lower() != ".mlpackage":
        raise OutputPathError(
            f"a Core ML mlprogram is a .mlpackage directory, not {path.name}. "
            f"Name it {path.with_suffix('.mlpackage').name}"
        )
    args = tuple(
        a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in as_args(example_inputs)
    )
    model32 = model if (floating_dtype(model) or torch.float32) == torch.float32 else _float_copy(model)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    input_names = ["input"] if len(tensors) == 1 else [f"input_{i}" for i in range(len(tensors))]
    with torch.no_grad():
        n_outputs = len(tree_leaves(model32(*args)))
    output_names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    options: dict[str, Any] = {}
    if minimum_deployment_target is not None:
        target = getattr(ct.target, minimum_deployment_target, None)
        if target is None:
            raise InputError(
                f"unknown Core ML deployment target {minimum_deployment_target!r}. Use a "
                "coremltools.target name such as iOS16 or macOS13"
            )
        options["minimum_deployment_target"] = target
    try:
        with _quiet_python(), torch.no_grad():
            program = torch.export.export(model32, args).run_decompositions({})
            mlmodel = ct.convert(
                program,
                inputs=[ct.TensorType(name=n, shape=tuple(t.shape)) for n, t in zip(input_names, tensors, strict=True)],
                outputs=[ct.TensorType(name=n) for n in output_names],
                convert_to="mlprogram",
                compute_precision=ct.precision.FLOAT16 if precision == torch.float16 else ct.precision.FLOAT32,
                **options,
            )
    except Exception as exc:
        raise ExportError(
            f"Core ML conversion failed ({type(exc).__name__}: {one_line(exc)}). Re-run with "
            "--debug for the full error, or export only the .pt2 / .onnx / .pte file"
        ) from exc

    def write(staged: Path) -> None:
        with _quiet_python():
            mlmodel.save(str(staged))
            spec = ct.models.MLModel(str(staged), skip_model_load=True).get_spec()
        got_in = [i.name for i in spec.description.input]
        got_out = [o.name for o in spec.description.output]
        if got_in != input_names or got_out != output_names:
            raise ExportError(
                f"the Core ML package names inputs {got_in} and outputs {got_out}, expected "
                f"{input_names} and {output_names}. This is a bug in reparam; please report it"
            )

    atomic_write_dir(path, write)
    return MobileResult(
        path, "mlpackage", _tree_size(path), False, {}, {}, verified_in=None, precision=dtype_name(precision)
    )


def _float_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).float()


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
