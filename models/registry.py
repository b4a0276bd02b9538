"""Name -> builder registry of the training-time model zoo.

Each entry records what a user (or the CLI) needs besides the builder: the input size the model was
designed for, its default number of classes, and what a fully fused deploy model runs (number of
convolutions, counting squeeze-excitation convs; residual adds that no re-parameterization removes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.nn as nn

__all__ = ["ModelSpec", "register", "register_variant", "create", "names", "spec"]


@dataclass(frozen=True)
class ModelSpec:
    """Metadata of one registered model."""

    name: str
    builder: Callable[..., nn.Module]
    input_size: Tuple[int, int, int]
    num_classes: int
    deploy_convs: int
    deploy_adds: int = 0
    description: str = ""


_REGISTRY: Dict[str, ModelSpec] = {}


def register(
    name: str,
    *,
    deploy_convs: int,
    input_size: Tuple[int, int, int] = (3, 224, 224),
    num_classes: int = 1000,
    deploy_adds: int = 0,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``builder(num_classes=..., **kwargs) -> nn.Module`` under ``name``."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        doc = (builder.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = ModelSpec(
            name=name,
            builder=builder,
            input_size=input_size,
            num_classes=num_classes,
            deploy_convs=deploy_convs,
            deploy_adds=deploy_adds,
            description=doc[0] if doc else "",
        )
        return builder

    return decorate


def register_variant(
    name: str, doc: str, build: Callable[..., nn.Module], *, deploy_convs: int, **options: Any
) -> None:
    """Register one named configuration of a family's builder: ``name`` builds
    ``build(num_classes, **options, **kwargs)`` (``build`` is, say, ``official_repvgg`` with its depths and widths
    bound), ``doc`` is its docstring (the first line is its description) and ``deploy_convs`` goes to
    :func:`register`."""

    def builder(num_classes: int = 1000, **kwargs) -> nn.Module:
        return build(num_classes, **options, **kwargs)

    builder.__name__ = name
    builder.__doc__ = doc
    register(name, deploy_convs=deploy_convs)(builder)


def spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered under ``name`` (``KeyError`` listing the known names otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(names())}") from None


def create(name: str, num_classes: Optional[int] = None, **kwargs) -> nn.Module:
    """Build the training-time model ``name`` with fresh random weights.

    ``num_classes=None`` uses the model's own default (1000 for the ImageNet models, 10 for
    ``repvgg_digits``), so that ``create(name)`` always matches the published / shipped checkpoints.
    Extra keyword arguments go to the model's builder.
    """
    entry = spec(name)
    return entry.builder(num_classes=entry.num_classes if num_classes is None else num_classes, **kwargs)


def names() -> List[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)
