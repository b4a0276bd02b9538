"""Example inputs that do not fit the model, reported as such: the shape its first layer expects.

A model given inputs of the wrong rank or channel count fails deep inside with an error about a weight
("weight of size [16, 1, 3, 3], expected input[1, 3, 8, 8] to have 1 channels").  :func:`check_example_inputs`
turns that into an :class:`InputShapeError` naming the expected layout, e.g. ``(N, 1, H, W)``, derived from the
model's first conv / linear.

Which layer is first is read from the registration order (:func:`reparam.trace.first_layer`) to decide, for free,
whether the inputs look wrong; only then is the model run (on stand-ins first: a space-to-depth stem or a head
registered before the stem costs no float64 pass), and only a failing run is blamed on the inputs, judged
against the conv / linear that the run reached first (a model may register its head before its stem).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import InputError
from .shape_run import runs_on_stand_ins
from .stats import as_args
from .trace import first_layer, input_spec

__all__ = ["InputShapeError", "expected_layout", "shape_mismatch", "run_checked", "check_example_inputs"]

_SPATIAL = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


class InputShapeError(InputError):
    """The example inputs have a shape (rank, channels) that the model does not take.

    ``shape``: the given input's shape; ``reason``: what the first layer takes; ``layout``: the expected batched
    layout, e.g. ``("N", "1", "H", "W")``.
    """

    def __init__(self, message: str, shape: tuple = (), reason: str = "", layout: tuple[str, ...] = ()):
        super().__init__(message)
        self.shape, self.reason, self.layout = tuple(shape), reason, tuple(layout)


def _layout(module: nn.Module) -> tuple[str, ...]:
    channels, rank = input_spec(module)
    if rank == 0:
        return ("N", str(channels))
    return ("N", str(channels), *_SPATIAL.get(rank, tuple(f"S{i}" for i in range(rank))))


def expected_layout(model: nn.Module) -> tuple[str, ...] | None:
    """The batched input layout the model's first registered conv/linear takes, e.g. ``("N", "1", "H", "W")``."""
    found = first_layer(model)
    return None if found is None else _layout(found[1])


def _mismatch(name: str, module: nn.Module, tensor: torch.Tensor) -> str | None:
    """Why ``tensor`` cannot be the input of conv/linear ``module`` (named ``name``), or None when it can be.

    Convolutions take batched (``N, C, *spatial``) and unbatched (``C, *spatial``) inputs; a Linear takes any
    rank whose last axis has its ``in_features``.
    """
    channels, rank = input_spec(module)
    layer = f"its first layer {name or '(the model)'} ({type(module).__name__})"
    if rank == 0:
        if tensor.ndim >= 1 and tensor.shape[-1] == channels:
            return None
        return f"{layer} takes {channels} input features in the last axis"
    if tensor.ndim not in (rank + 1, rank + 2):
        return f"{layer} takes inputs of rank {rank + 2} (batched) or {rank + 1}, not {tensor.ndim}"
    got = tensor.shape[tensor.ndim - rank - 1]
    if got != channels:
        return f"{layer} takes {channels} input channel{'s' * (channels != 1)}, not {got}"
    return None


def _first_tensor(inputs: Any) -> torch.Tensor | None:
    return next((a for a in as_args(inputs) if isinstance(a, torch.Tensor)), None)


def shape_mismatch(model: nn.Module, inputs: Any) -> str | None:
    """Why the first tensor of ``inputs`` cannot be the input of the model's first registered conv/linear, or
    None (also when the model has no conv/linear or there is no tensor input).  A guess: nothing is run."""
    found, tensor = first_layer(model), _first_tensor(inputs)
    return None if found is None or tensor is None else _mismatch(*found, tensor)


def _shape(shape: tuple) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def run_checked(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on ``inputs`` once without grad and return its output.

    When the run fails and the first tensor input has a rank or channel count that the first conv/linear the run
    reached does not take (the first registered one when it reached none), raises :class:`InputShapeError`
    naming the expected layout; any other failure propagates unchanged.
    """
    names = {m: n for n, m in model.named_modules()}
    reached: list[nn.Module] = []

    def note(module: nn.Module, args: tuple) -> None:
        if not reached:
            reached.append(module)

    handles = [m.register_forward_pre_hook(note) for m in model.modules() if input_spec(m) is not None]
    try:
        with torch.no_grad():
            return model(*as_args(inputs))
    except Exception as exc:  # the model's own error, whatever its type
        tensor = _first_tensor(inputs)
        layer = (names[reached[0]], reached[0]) if reached else first_layer(model)
        reason = _mismatch(*layer, tensor) if layer is not None and tensor is not None else None
        if reason is None:
            raise
        shape = tuple(tensor.shape)
        layout = _layout(layer[1])
        raise InputShapeError(
            f"the example input of shape {_shape(shape)} does not fit the model: {reason}, so it "
            f"expects {_shape(layout)}. Pass inputs of that shape",
            shape,
            reason,
            layout,
        ) from exc
    finally:
        for handle in handles:
            handle.remove()


def check_example_inputs(model: nn.Module, inputs: Any) -> None:
    """Raise :class:`InputShapeError` when ``inputs`` (a tensor or tuple; None: nothing to check) have a rank or
    channel count the model's first conv/linear does not take and the model fails on them.

    Costs nothing when the shape fits the first registered conv/linear; otherwise runs ``model`` once without
    grad, first on stand-ins (:func:`reparam.shape_run.runs_on_stand_ins`: the shapes without the arithmetic, the
    caches it leaves undone), and only when that does not get through for real (:func:`run_checked`; pass a copy in
    eval mode if running it must not update anything, e.g. BatchNorm statistics in training mode).  A failure that
    is not about the input shape propagates as the model raised it.
    """
    if inputs is not None and shape_mismatch(model, inputs) is not None and not runs_on_stand_ins(model, inputs):
        run_checked(model, inputs)
