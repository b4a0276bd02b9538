"""Architecture building: a model built by name with random weights, from the zoo, timm, torchvision or ultralytics.

- :func:`build_model` builds a ``reparam.models`` architecture, ``timm:NAME``, ``torchvision:NAME`` or
  ``ultralytics:CFG.yaml`` with random weights, in eval mode (nothing is ever downloaded); an unknown name raises
  :class:`~reparam.errors.UnknownArchError` with the closest known names.
- :func:`default_input_shape` is the batch-1 input an architecture was designed for, when it records one.
- :func:`require` imports an optional package that provides architectures, or says how to install it.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
from collections.abc import Iterable
from typing import Any

import torch

from reparam.errors import UnknownArchError, one_line

__all__ = ["ARCH_PREFIXES", "build_model", "zoo_names", "require", "default_input_shape"]

ARCH_PREFIXES = ("timm:", "torchvision:", "ultralytics:")


def build_model(arch: str, num_classes: int | None = None, **kwargs: Any) -> torch.nn.Module:
    """Build architecture ``arch`` with random weights, in eval mode.

    ``arch`` is a ``reparam.models`` name, ``timm:NAME``, ``torchvision:NAME`` or ``ultralytics:CFG.yaml`` (those
    need the package; models are always created without pretrained weights, so nothing is downloaded).
    ``num_classes=None`` keeps the architecture's default.  Raises :class:`UnknownArchError` with suggestions for
    an unknown name.
    """
    source, _, name = arch.partition(":") if ":" in arch else ("", "", arch)
    builders = {
        "": _build_zoo,
        "timm": _build_timm,
        "torchvision": _build_torchvision,
        "ultralytics": _build_ultralytics,
    }
    if source not in builders:
        raise UnknownArchError(
            f"unknown architecture source {source!r} in {arch!r}. "
            "Use a reparam.models name, timm:NAME, torchvision:NAME or ultralytics:CFG.yaml"
        )
    if not name:
        raise UnknownArchError(f"missing model name in {arch!r}. Write it as {source}:NAME")
    extra = {} if num_classes is None else {"num_classes": num_classes}
    model = builders[source](name, extra, kwargs)
    return model.eval()


def _unknown(arch: str, known: Iterable[str], fix: str) -> UnknownArchError:
    close = difflib.get_close_matches(arch.partition(":")[2] or arch, list(known), n=3, cutoff=0.6)
    prefix = arch.partition(":")[0] + ":" if ":" in arch else ""
    suggestion = f"Did you mean {', '.join(prefix + c for c in close)}? " if close else ""
    return UnknownArchError(f"unknown architecture {arch!r}. {suggestion}{fix}")


def zoo_names() -> list[str]:
    """The architectures of ``reparam.models`` (empty when the zoo is unavailable)."""
    try:
        from reparam import models
    except ImportError:  # pragma: no cover
        return []
    return list(getattr(models, "names", list)())


def _build_zoo(name: str, extra: dict, kwargs: dict) -> torch.nn.Module:
    known = zoo_names()
    if name not in known:
        raise _unknown(
            name, known, "Run `reparam list` to see the available architectures, or use timm:NAME / torchvision:NAME"
        )
    from reparam import models

    return models.create(name, **extra, **kwargs)


def require(module: str) -> Any:
    """The optional package ``module``, imported; :class:`~reparam.errors.UnknownArchError` saying how to install
    it when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UnknownArchError(
            f"{module} is not installed ({one_line(exc)}). Install it with `pip install {module}`"
        ) from exc


def _build_timm(name: str, extra: dict, kwargs: dict) -> torch.nn.Module:
    timm = require("timm")
    if not timm.is_model(name):
        raise _unknown(f"timm:{name}", timm.list_models(), "See timm.list_models() for the names timm knows")
    return timm.create_model(name, pretrained=False, **extra, **kwargs)


def _build_torchvision(name: str, extra: dict, kwargs: dict) -> torch.nn.Module:
    torchvision = require("torchvision")
    known = torchvision.models.list_models()
    if name not in known:
        raise _unknown(
            f"torchvision:{name}", known, "See torchvision.models.list_models() for the names torchvision knows"
        )
    return torchvision.models.get_model(name, weights=None, **extra, **kwargs)


def _build_ultralytics(name: str, extra: dict, kwargs: dict) -> torch.nn.Module:
    from reparam import yolo

    return yolo.build(name, extra.get("num_classes"), **kwargs)


def default_input_shape(arch: str, model: torch.nn.Module | None = None) -> tuple[int, ...] | None:
    """Batch-1 input shape the architecture was designed for, or None when unknown.

    From the zoo's registry for ``reparam.models`` names, from timm's ``pretrained_cfg['input_size']`` for timm
    models; torchvision models do not record one.
    """
    size = None
    if ":" not in arch:
        with contextlib.suppress(ImportError, KeyError):  # no zoo, or not one of its names: no recorded size
            from reparam import models

            size = tuple(models.spec(arch).input_size)
    elif model is not None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        size = tuple(cfg.get("input_size", ())) or None
    return (1, *size) if size else None
