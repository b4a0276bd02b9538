"""The matcher vocabulary: what a module is, what an fx node calls, which argument it passes, what it carries.

Every pass, the lifter (:mod:`reparam.lift`, which re-exports these names) and the tracer ask these questions in
these words, so that "is this a convolution?" or "is this an add?" has one answer in the whole compiler:

- modules: :func:`is_conv` (a ``ConvNd``, not a transposed one), :func:`is_transposed_conv`, :func:`called_module`,
  :func:`called_conv`, and :func:`conv_affine` (a conv module -> its :class:`~reparam.affine.Affine`, in float64);
- op sets: :data:`ADD_FUNCTIONS`, :data:`ADD_FUNCTIONS_WITH_INPLACE`, :data:`MUL_FUNCTIONS`, :data:`CONCAT_FUNCTIONS`;
- arguments: :func:`arg` (positional or keyword, with its default); :func:`node_name` (what reports call a node);
- metadata recorded by shape propagation: :func:`node_shape`, :func:`node_rank`, :func:`node_dtype`,
  :func:`shape_meta`;
- attribute paths: :func:`attr_path` / :func:`has_attr_path` (``"stage1.0.conv"`` walked from a root).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from . import affine as A

__all__ = [
    "ADD_FUNCTIONS",
    "ADD_FUNCTIONS_WITH_INPLACE",
    "MUL_FUNCTIONS",
    "CONCAT_FUNCTIONS",
    "is_conv",
    "computes_as_conv",
    "POOL_MODULES",
    "is_transposed_conv",
    "called_module",
    "called_conv",
    "as_float64",
    "conv_affine",
    "arg",
    "node_name",
    "node_shape",
    "node_rank",
    "node_dtype",
    "shape_meta",
    "attr_path",
    "has_attr_path",
]

# --------------------------------------------------------------------------------------------
# op sets

#: ``a + b`` as fx records it, a new tensor (a merged kernel may replace it; ``a += b`` writes into ``a``).
ADD_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset({operator.add, torch.add})
#: ``a + b`` or ``a += b``: for passes that rewrite the sum as a whole and check that its operands have no
#: other reader, so the in-place form computes the same value as the plain one.
ADD_FUNCTIONS_WITH_INPLACE = ADD_FUNCTIONS | {operator.iadd}
#: ``a * b``, a new tensor.
MUL_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset({operator.mul, torch.mul})
#: ``torch.cat(tensors, dim)`` and its aliases.
CONCAT_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset({torch.cat, torch.concat, torch.concatenate})


# --------------------------------------------------------------------------------------------
# modules


#: the pooling modules of torch.nn (max, average, adaptive; 1-3 d): each output is a max or mean of input values
POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)

_CONV_FORWARDS = frozenset({nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward})


def is_conv(module: object) -> TypeGuard[_ConvNd]:
    """``module`` is a Conv1d/2d/3d (or a subclass, lazy ones included), not a transposed convolution."""
    return isinstance(module, _ConvNd) and not isinstance(module, _ConvTransposeNd)


def computes_as_conv(module: object) -> TypeGuard[_ConvNd]:
    """``module`` is a convolution (:func:`is_conv`) whose forward is its class's own: a subclass that pads from
    the input's size first (timm's ``Conv2dSame``, a call_module the tracer keeps opaque) computes something else."""
    return is_conv(module) and type(module).forward in _CONV_FORWARDS


def is_transposed_conv(module: object) -> TypeGuard[_ConvTransposeNd]:
    """``module`` is a ConvTranspose1d/2d/3d."""
    return isinstance(module, _ConvTransposeNd)


def called_module(node: fx.Node, modules: Mapping[str, nn.Module] | nn.Module) -> nn.Module | None:
    """The module a ``call_module`` node calls, looked up in ``modules`` (``dict(gm.named_modules())``, or the
    GraphModule itself); None for other nodes."""
    if node.op != "call_module":
        return None
    if isinstance(modules, nn.Module):
        return modules.get_submodule(str(node.target))
    return modules.get(str(node.target))


def called_conv(node: fx.Node, modules: Mapping[str, nn.Module] | nn.Module) -> _ConvNd | None:
    """The convolution (:func:`computes_as_conv`) a ``call_module`` node calls; None when it calls anything else."""
    module = called_module(node, modules)
    return module if computes_as_conv(module) else None


def as_float64(t: Any) -> Any:
    """A tensor as a detached float64 copy (the algebra folds in float64); anything else as it is."""
    return t.detach().to(torch.float64) if isinstance(t, torch.Tensor) else t


def conv_affine(conv: _ConvNd) -> A.Affine:
    """A convolution module -> its :class:`~reparam.affine.Affine` (weights in float64; padding as the module's)."""
    return A.from_conv(
        as_float64(conv.weight),
        as_float64(conv.bias),
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.padding_mode,
    )


# --------------------------------------------------------------------------------------------
# arguments and metadata


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """The argument ``node`` passes at position ``index`` or as keyword ``name``; ``default`` when it passes neither."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def node_name(node: fx.Node) -> str:
    """The module path a ``call_module`` node calls; any other node's own name."""
    return str(node.target) if node.op == "call_module" else node.name


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The shape shape propagation recorded for ``node`` (``meta['tensor_meta']``); None when none was recorded."""
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return tuple(shape) if shape is not None else None


def node_rank(node: fx.Node) -> int | None:
    """The rank of ``node``'s recorded shape; None when unknown."""
    shape = node_shape(node)
    return len(shape) if shape is not None else None


def node_dtype(node: fx.Node, default: torch.dtype = torch.float64) -> torch.dtype:
    """The dtype shape propagation recorded for ``node``; ``default`` when none was recorded."""
    return getattr(node.meta.get("tensor_meta"), "dtype", default)


def shape_meta(like: fx.Node, shape: tuple[int, ...]) -> Any:
    """``meta['tensor_meta']`` for a new node of ``shape`` with ``like``'s dtype (no run needed)."""
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    return _extract_tensor_metadata(torch.empty(shape, dtype=node_dtype(like), device="meta"))


# --------------------------------------------------------------------------------------------
# attribute paths


def attr_path(root: Any, path: str) -> Any:
    """``root.a.b.c`` for ``path == "a.b.c"`` (a submodule, parameter or buffer); AttributeError if a step is
    missing."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def has_attr_path(root: Any, path: str) -> bool:
    """Whether :func:`attr_path` finds ``path`` under ``root``."""
    try:
        attr_path(root, path)
    except AttributeError:
        return False
    return True
