"""Where a node sits in the model: the module path the report names it by, and the name of the module a pass
emits in its place (``<block>.reparam``, ``<block>.reparam_rows`` ...), so that every pass names alike."""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx
import torch.nn as nn

from ..match import has_attr_path, node_name


def where(node: fx.Node) -> str:
    """The module path a report names ``node`` by: the module it calls, else the innermost module whose forward
    holds it (``nn_module_stack``), else its own name."""
    if node.op == "call_module":
        return node_name(node)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0] or node.name
    return node.name


def _block_path(node: fx.Node) -> list[str] | None:
    """Path of the module whose forward holds ``node`` (a module call's parent), if recorded."""
    if node.op == "call_module":
        return str(node.target).split(".")[:-1]
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path.split(".") if path else []
    return None


def block_prefix(nodes: Iterable[fx.Node]) -> str:
    """Longest common module path of the nodes' blocks, e.g. ``stage1.0`` ("" at the root or when unknown)."""
    paths = [p for p in (_block_path(n) for n in nodes) if p is not None]
    if not paths:
        return ""
    common = paths[0]
    for p in paths[1:]:
        k = 0
        while k < min(len(common), len(p)) and common[k] == p[k]:
            k += 1
        common = common[:k]
    return ".".join(common)


def fresh_name(root: nn.Module, nodes: Iterable[fx.Node], stem: str) -> str:
    """``<block>.<stem>`` for the block that holds ``nodes`` (:func:`block_prefix`), numbered ``<stem>_1``,
    ``<stem>_2`` ... while ``root`` already has that path."""
    base = block_prefix(nodes)
    first = f"{base}.{stem}" if base else stem
    name, i = first, 1
    while has_attr_path(root, name):
        name, i = f"{first}_{i}", i + 1
    return name
