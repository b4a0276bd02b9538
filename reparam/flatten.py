"""Flat call targets: a fused GraphModule reaches each kernel as one attribute of itself.

before: ``getattr(getattr(self.stages, "0").blocks, "0").conv.reparam(x)`` (a nested attribute walk per call)
after:  ``self.stages_0_blocks_0_conv_reparam(x)``

Every ``call_module`` and ``get_attr`` target that is a dotted path becomes a top-level attribute named after
that path (dots become ``_``, so the name still says where the kernel came from; a suffix keeps names unique),
and the nested modules no node reaches any more are deleted.  Objects are registered once: two nodes that call
the same module (or read the same parameter) through any paths call the same object under one name, so modules
and tensors shared before stay shared.  Parameters stay parameters and buffers stay buffers (persistent or not).
State-dict keys of the GraphModule change accordingly (``stages.0.blocks.0.conv.reparam.weight`` ->
``stages_0_blocks_0_conv_reparam.weight``); the report, written before this step, names the original paths.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn


def flatten_targets(gm: fx.GraphModule) -> dict:
    """Flatten ``gm``'s dotted call targets in place; returns ``{old target: new name}`` for those it moved.

    Precondition: ``gm``'s graph is its code (the pipeline's fused graphs); the generated code is recompiled.
    """
    moved: dict = {}
    names_of: dict = {}  # id(object) -> the flat name it is registered under
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr") or "." not in str(node.target):
            continue
        target = str(node.target)
        if target not in moved:
            owner_path, _, attr = target.rpartition(".")
            owner = gm.get_submodule(owner_path)
            value = getattr(owner, attr)
            shared = isinstance(value, (nn.Module, torch.Tensor))  # plain values (ints, specs) are not objects
            name = names_of.get(id(value)) if shared else None
            if name is None:
                name = _free_name(gm, target)
                _register(gm, name, owner, attr, value)
                if shared:
                    names_of[id(value)] = name
            moved[target] = name
        node.target = moved[target]
    if moved:
        gm.delete_all_unused_submodules()
        _order_by_first_use(gm)
        gm.recompile()
    return moved


def _order_by_first_use(gm: fx.GraphModule) -> None:
    """Submodules, parameters and buffers of ``gm`` listed in the order the graph first uses them (as the nested
    tree listed them), so ``named_modules()`` and ``state_dict()`` follow the forward; unused ones last."""
    first: dict = {}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            first.setdefault(str(node.target).split(".")[0], len(first))
    for table in (gm._modules, gm._parameters, gm._buffers):
        entries = sorted(table.items(), key=lambda item: first.get(item[0], len(first)))
        table.clear()
        table.update(entries)


def flatten_all(modules: list) -> None:
    """:func:`flatten_targets` on each GraphModule of ``modules``."""
    for gm in modules:
        if isinstance(gm, fx.GraphModule):
            flatten_targets(gm)


def _free_name(gm: nn.Module, target: str) -> str:
    """``a.b.0.conv`` -> ``a_b_0_conv``: a name no attribute of ``gm`` has yet (``0_conv`` for a Sequential's
    ``0.conv``: not an identifier, the generated code reads it with one ``getattr``, as fx reads ``self.0``)."""
    stem = re.sub(r"\W", "_", target.replace(".", "_"))
    name, i = stem, 1
    while hasattr(gm, name):
        name, i = f"{stem}_{i}", i + 1
    return name


def _register(gm: nn.Module, name: str, owner: nn.Module, attr: str, value: Any) -> None:
    """``gm.<name>`` is ``owner.<attr>``, of the same kind: submodule, parameter, buffer or plain attribute."""
    if isinstance(value, nn.Module):
        gm.add_module(name, value)
    elif attr in owner._parameters:
        gm.register_parameter(name, value)
    elif attr in owner._buffers:
        gm.register_buffer(name, value, persistent=attr not in owner._non_persistent_buffers_set)
    else:
        setattr(gm, name, value)
