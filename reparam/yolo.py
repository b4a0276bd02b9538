"""ultralytics YOLO models for the command line: random-weight builds from yaml configs, training checkpoints
loaded safely, heads prepared for export as ``yolo export`` prepares them.

- :func:`is_config` / :func:`build`: an ultralytics model yaml (a name shipped with ultralytics such as
  ``yolov8n.yaml``, or a path) built with random weights by the class of its task (``DetectionModel``,
  ``SegmentationModel``, ``PoseModel``, ``OBBModel``, ``ClassificationModel``, ``RTDETRDetectionModel``).
- :func:`is_checkpoint` / :func:`load_checkpoint`: a ``torch.save``'d dict whose ``model`` / ``ema`` entry is a
  pickled ultralytics model (what ultralytics' trainer writes, usually in float16).  It is read with
  ``weights_only=True`` plus an allow-list (:func:`allowed_globals`), never with ``weights_only=False``:
  the pickle may only name ``torch.nn.Module`` subclasses defined in ``ultralytics.nn`` or ``torch.nn.modules``
  and the few plain data types in :data:`DATA_TYPES`.  Unpickling such a class creates it without running its
  ``__init__`` and fills in its attributes; the code that later runs is the installed package's own.
- :func:`prepare` puts the model in float32 eval mode with its heads in export mode (outputs: the prediction
  tensor alone, as in ``yolo export``).

Every failure a user can cause raises an :class:`reparam.errors.InputError` (the CLI exits with code 2).
"""

from __future__ import annotations

import importlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from reparam import architectures, checkpoints
from reparam.dtypes import dtype_name
from reparam.errors import CheckpointError, UnknownArchError, UnsafeCheckpointError, one_line

__all__ = [
    "PREFIX",
    "DATA_TYPES",
    "is_config",
    "build",
    "is_checkpoint",
    "allowed_globals",
    "load_checkpoint",
    "prepare",
    "input_size",
    "num_classes",
    "Loaded",
]

PREFIX = "ultralytics:"
CONFIG_SUFFIXES = (".yaml", ".yml")
#: Packages whose ``nn.Module`` subclasses a checkpoint may name.
MODULE_PACKAGES = ("ultralytics.nn.", "torch.nn.modules.")
#: Plain data types an ultralytics checkpoint pickles besides modules (the trainer's hyperparameters).
DATA_TYPES = frozenset({"ultralytics.utils.IterableSimpleNamespace", "types.SimpleNamespace", "pathlib.PosixPath"})
MODEL_KEYS = ("ema", "model")  # what ultralytics' own loader prefers: the EMA copy, else the model
DEFAULT_IMGSZ = 640


def _ultralytics() -> Any:
    """The ultralytics package, os.environ's YOLO_OFFLINE set first (no update checks, no downloads)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    return architectures.require("ultralytics")


# ---------------------------------------------------------------------------------------------- configs


def is_config(name: str | os.PathLike | None) -> bool:
    """Whether ``name`` names a model yaml (by its suffix)."""
    return name is not None and str(name).lower().endswith(CONFIG_SUFFIXES)


_TASK_CLASSES = {
    "detect": "DetectionModel",
    "segment": "SegmentationModel",
    "pose": "PoseModel",
    "obb": "OBBModel",
    "classify": "ClassificationModel",
}


def build(cfg: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """The model of ultralytics yaml ``cfg`` with random weights, in eval mode (nothing is downloaded);
    ``num_classes`` overrides the config's ``nc``.

    Raises :class:`reparam.errors.UnknownArchError` when ultralytics is missing, the config is unknown, or its task
    has no model class here.
    """
    _ultralytics()
    from ultralytics.nn import tasks

    try:
        spec = tasks.yaml_model_load(cfg)
    except Exception as exc:  # FileNotFoundError from check_yaml, yaml errors
        raise UnknownArchError(
            f"cannot read the ultralytics config {cfg!r} ({one_line(exc)}). Give a "
            "config shipped with ultralytics (e.g. yolov8n.yaml, yolo11n-seg.yaml) or the "
            "path of a model yaml"
        ) from exc
    task = tasks.guess_model_task(spec)
    name = "RTDETRDetectionModel" if "rtdetr" in Path(str(cfg)).stem.lower() else _TASK_CLASSES.get(task)
    if name is None:
        raise UnknownArchError(
            f"{cfg}: ultralytics task {task!r} is not supported. Use a detect, segment, pose, obb or classify config"
        )
    if num_classes is not None:
        kwargs["nc"] = num_classes
    model = getattr(tasks, name)(cfg, verbose=False, **kwargs)
    return model.eval()


# ---------------------------------------------------------------------------------------------- checkpoints


def _named_globals(path: Path) -> list[str]:
    """The globals the checkpoint's pickle needs beyond torch's weights-only set (read, not executed); [] for
    a file that is not a ``torch.save`` zip."""
    if not zipfile.is_zipfile(path):
        return []
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):  # torch < 2.6
        raise CheckpointError(
            f"cannot read {path} safely with torch {torch.__version__}: scanning a checkpoint's "
            "pickle needs torch 2.6 or later. Upgrade torch, or pass --arch and a state dict"
        )
    return checkpoints.scanned_globals(path)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``torch.save`` file whose pickle names ultralytics classes (nothing is unpickled)."""
    return any(name.startswith("ultralytics.") for name in _named_globals(Path(path)))


def _allowed_module_class(name: str) -> type | None:
    """The ``nn.Module`` subclass ``name`` names, if it is defined in one of :data:`MODULE_PACKAGES`."""
    module_name, _, attr = name.rpartition(".")
    if not module_name.startswith(MODULE_PACKAGES):
        return None
    try:
        obj = getattr(importlib.import_module(module_name), attr, None)
    except ImportError:
        return None
    defined_here = isinstance(obj, type) and obj.__module__ == module_name
    return obj if defined_here and issubclass(obj, nn.Module) else None


def _data_type(name: str) -> type:
    module_name, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def allowed_globals(names: list[str], path: Path) -> list[type]:
    """The classes to allow for a checkpoint whose pickle needs ``names``.

    Allowed: ``nn.Module`` subclasses defined in ``ultralytics.nn.*`` or ``torch.nn.modules.*`` (re-exports
    and anything else in those modules are not), and :data:`DATA_TYPES`.  Anything else raises
    :class:`reparam.errors.UnsafeCheckpointError` naming it.
    """
    allowed, refused = [], []
    for name in names:
        obj = _data_type(name) if name in DATA_TYPES else _allowed_module_class(name)
        (allowed if obj is not None else refused).append(obj if obj is not None else name)
    if refused:
        shown = ", ".join(sorted(refused)[:8]) + (f" and {len(refused) - 8} more" if len(refused) > 8 else "")
        raise UnsafeCheckpointError(
            f"refusing to load {path}: besides ultralytics and torch.nn modules, its "
            f"pickle needs {shown}. {checkpoints.TRUST_HINT}",
            refused,
        )
    return allowed


@dataclass
class Loaded:
    """A model read from an ultralytics checkpoint: the model (float32, eval), where it was found, its
    training image size (None if not recorded)."""

    model: nn.Module
    source: str
    imgsz: int | None


def _read(path: Path, trust: bool) -> Any:
    """``torch.load`` of an ultralytics checkpoint: weights-only with :func:`allowed_globals`, unless ``trust``."""
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    allowed = allowed_globals(_named_globals(path), path)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {path} as an ultralytics checkpoint ({type(exc).__name__}: "
            f"{one_line(exc)}). {checkpoints.TRUST_HINT}"
        ) from exc


def load_checkpoint(path: str | os.PathLike, trust: bool = False, prefer_ema: bool = True) -> Loaded:
    """The model of ultralytics checkpoint ``path`` (its ``ema`` entry, else ``model``; ``prefer_ema=False``
    reverses that), in float32 eval mode.

    Raises :class:`reparam.errors.CheckpointError` when the file holds no ultralytics model, and
    :class:`reparam.errors.UnsafeCheckpointError` when its pickle needs globals outside the allow-list.
    """
    path = checkpoints.check_checkpoint_path(path)
    if not is_checkpoint(path):
        raise CheckpointError(
            f"{path} is not an ultralytics checkpoint (its pickle names no ultralytics "
            "class). Give a .pt file written by ultralytics, or a model yaml"
        )
    _ultralytics()
    ckpt = _read(path, trust)
    keys = MODEL_KEYS if prefer_ema else MODEL_KEYS[::-1]
    found = [k for k in keys if isinstance(ckpt, dict) and isinstance(ckpt.get(k), nn.Module)]
    if not found:
        raise CheckpointError(
            f"no model in {path} ({checkpoints.describe(ckpt)}). Expected an ultralytics "
            "checkpoint with a pickled model under 'ema' or 'model'"
        )
    model = ckpt[found[0]]
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    cast = "" if dtype == torch.float32 else f", {dtype_name(dtype)} → float32"
    args = ckpt.get("train_args") or {}
    return Loaded(
        model.float().eval(),
        f"checkpoint[{found[0]!r}] (a pickled {type(model).__name__}{cast})",
        _imgsz(args.get("imgsz") if isinstance(args, dict) else None),
    )


def _imgsz(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        return max(value)
    return None


# ---------------------------------------------------------------------------------------------- deploy


def prepare(model: nn.Module) -> nn.Module:
    """``model`` (in place) in float32 eval mode with every head in export mode, as ``yolo export`` does: the model
    then returns its prediction tensor alone (no raw feature dict)."""
    model.float().eval()
    for module in model.modules():
        if hasattr(module, "export") and isinstance(module.export, bool):
            module.export = True
    return model


def input_size(model: nn.Module, imgsz: int | None) -> tuple[int, int, int, int]:
    """Batch-1 example input shape: the training image size, else :data:`DEFAULT_IMGSZ`."""
    channels = getattr(model, "yaml", {}).get("channels", 3) if isinstance(getattr(model, "yaml", None), dict) else 3
    size = imgsz or DEFAULT_IMGSZ
    return (1, int(channels), size, size)


def num_classes(model: nn.Module) -> int | None:
    """The number of classes ultralytics records on the model, or None."""
    names = getattr(model, "names", None)
    if isinstance(names, (dict, list)) and names:
        return len(names)
    nc = getattr(model, "nc", None)
    return nc if isinstance(nc, int) else None
