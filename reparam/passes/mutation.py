"""Graph facts every pass needs before it moves work around: who really reads a tensor, which
tensors share storage, and which are updated in place while something else also reads them.

fx orders nodes, but a rewrite that inserts a merged kernel right after its root moves reads
earlier.  That is only safe for tensors nobody mutates in place behind the reader's back, so the
passes leave the readers an update could be reordered with alone (:func:`mutation_barriers`), and
dead-code elimination keeps in-place updates whose result nobody uses (:func:`eliminate_dead_code`).
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn

from ..match import called_module

METADATA_ATTRS = {"ndim", "dtype", "device", "is_cuda", "layout"}
METADATA_METHODS = {"dim", "ndimension", "get_device"}

#: what fx's tracer calls to check that an input traced as None (a concrete argument) is None when called
_ASSERT_IS_NONE = torch.fx._symbolic_trace._assert_is_none
_INPLACE_FUNCTIONS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.setitem,
}

#: methods that return a view of their first argument and compute nothing
VIEW_METHODS = frozenset(
    {
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "flatten",
        "unflatten",
        "permute",
        "transpose",
        "t",
        "squeeze",
        "unsqueeze",
        "expand",
        "expand_as",
        "narrow",
        "select",
        "detach",
        "movedim",
        "moveaxis",
        "swapaxes",
        "swapdims",
        "diagonal",
        "unfold",
        "as_strided",
        "contiguous",
        "unbind",
        "chunk",
        "split",
        "tensor_split",
    }
)
# ops whose result may share storage with their first argument: the views, and casts that return it unchanged
# when it already has the dtype
_VIEW_NAMES = VIEW_METHODS | {
    "real",
    "imag",
    "view_as_real",
    "view_as_complex",
    "to",
    "type_as",
    "float",
    "double",
    "half",
    "bfloat16",
    "clone_if_needed",
    "getitem",
    "__getitem__",
}
_ALIAS_MODULES = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Flatten,
    nn.Unflatten,
)


def is_metadata_user(user: fx.Node) -> bool:
    """Reads only a tensor's rank/dtype/device (e.g. timm's ``_assert(x.ndim == 4)``)."""
    if user.op == "call_function" and user.target is getattr and len(user.args) > 1:
        return user.args[1] in METADATA_ATTRS
    return user.op == "call_method" and user.target in METADATA_METHODS


def real_users(node: fx.Node) -> list:
    return [u for u in node.users if not is_metadata_user(u)]


def updates_in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``node`` writes into its first argument (``x.add_(y)``, ``x += y``, ``ReLU(inplace=True)``, ``x[i] = v``)."""
    if node.op == "call_method":
        return _in_place_name(str(node.target))
    if node.op == "call_function":
        return (
            node.target in _INPLACE_FUNCTIONS
            or node.kwargs.get("inplace") is True
            or _in_place_torch_function(node.target)
        )
    if node.op == "call_module":
        return _flag(called_module(node, modules), "inplace")
    return False


def _in_place_name(name: str) -> bool:
    """torch's naming of an in-place op: one trailing underscore (``add_``, ``relu_``), not a dunder (``__add__``)."""
    return name.endswith("_") and not name.endswith("__")


def _in_place_torch_function(target) -> bool:
    """``torch.relu_``, ``F.relu_``, ``torch.sigmoid_`` ...: a torch function with an in-place name."""
    name = getattr(target, "__name__", "")
    if not _in_place_name(name):
        return False
    return getattr(torch, name, None) is target or getattr(torch.nn.functional, name, None) is target


def _flag(module: nn.Module | None, name: str) -> bool:
    """``getattr(module, name, False) is True``, without nn.Module's ``__getattr__`` raising (and formatting) an
    AttributeError for each module that has no such flag: this runs for every call of every graph analysis."""
    if module is None:
        return False
    if name in vars(module):
        return vars(module)[name] is True
    return hasattr(type(module), name) and getattr(module, name, False) is True


def _may_alias(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``node``'s result may share storage with its first argument."""
    if updates_in_place(node, modules):
        return True
    if node.op in ("call_method", "call_function"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        return name in _VIEW_NAMES
    if node.op == "call_module":
        return isinstance(called_module(node, modules), _ALIAS_MODULES)
    return False


def storage_classes(gm: fx.GraphModule, modules: dict) -> dict:
    """node -> representative of the set of nodes that may share its storage (union-find)."""
    parent: dict = {}

    def find(n):
        while parent.get(n, n) is not n:
            parent[n] = parent.get(parent[n], parent[n])
            n = parent[n]
        return n

    for node in gm.graph.nodes:
        if node.args and isinstance(node.args[0], fx.Node) and _may_alias(node, modules):
            parent[find(node)] = find(node.args[0])
    return {node: find(node) for node in gm.graph.nodes}


def updated_storage(gm: fx.GraphModule) -> set:
    """Nodes whose storage (or a view's) some node of ``gm`` updates in place."""
    modules = dict(gm.named_modules())
    return _updated(gm, modules, storage_classes(gm, modules))


def _updated(gm: fx.GraphModule, modules: dict, klass: dict) -> set:
    written = {
        klass[n] for n in gm.graph.nodes if n.args and isinstance(n.args[0], fx.Node) and updates_in_place(n, modules)
    }
    return {n for n, rep in klass.items() if rep in written}


class Mutations(NamedTuple):
    barriers: set  # nodes a pass must neither absorb into a region nor move
    shared: set  # tensors whose storage such an update writes: never alias a new name to them
    updated: set  # nodes whose storage (or a view's) some node updates in place: :func:`updated_storage`


def mutation_barriers(gm: fx.GraphModule) -> Mutations:
    """The readers an in-place update could be reordered with, and the storages it writes.

    before: ``z = y.add_(1); y.mul_(2); bn(z)``: ``bn`` reads the storage ``y.mul_`` wrote after it, so
    absorbing ``bn`` into a region inserted next to ``z`` would read it too early.  Barriers: the
    updates and views of such a storage, and its readers that run after an update without depending
    on it.  Readers that run before every update stay free (a region only ever moves work earlier,
    to just after its root), and so does the common ``relu_(conv(x))`` whose result alone is read on.
    ``shared``: the storage's tensors; replacing ``z = y * 1`` by ``y`` itself would let the update
    change ``z`` too.
    """
    modules = dict(gm.named_modules())
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    klass = storage_classes(gm, modules)
    members: dict = {}
    for node, rep in klass.items():
        members.setdefault(rep, []).append(node)
    out, shared = set(), set()
    for u in gm.graph.nodes:
        if not (u.args and isinstance(u.args[0], fx.Node) and updates_in_place(u, modules)):
            continue
        group = members[klass[u]]
        after = _downstream_within(u, set(group))  # members computed from the update's result
        producers = {n for n in group if n.args and n.args[0] in group}  # views / updates of the storage
        exposed = {r for m in group if m not in after for r in real_users(m) if r is not u and r not in producers}
        if exposed:
            out |= producers | {r for r in exposed if order[r] > order[u]}
            shared.update(group)
    return Mutations(out, shared, _updated(gm, modules, klass))


def _downstream_within(start: fx.Node, group: set) -> set:
    seen, stack = {start}, [start]
    while stack:
        n = stack.pop()
        for user in n.users:
            if user in group and user not in seen and user.args and user.args[0] is n:
                seen.add(user)
                stack.append(user)
    return seen


def _guards_a_specialised_input(node: fx.Node) -> bool:
    """fx's check that an input traced as a constant (``concrete_args``: an optional mask traced as None) still has
    that value: without it, a call that passes one would be silently wrong, where it now fails."""
    return node.op == "call_function" and node.target is _ASSERT_IS_NONE


def eliminate_dead_code(gm: fx.GraphModule) -> bool:
    """fx's dead-code elimination, except that an in-place update whose result is unused is kept
    while something else reads the storage it writes (fx deletes ``y.mul_(2)`` otherwise, silently
    changing whoever reads ``y`` later), or the storage is a model input or a buffer (the caller
    sees the update); and fx's checks of inputs traced as None stay.  Returns whether anything was removed."""
    removed_any = False
    while True:
        modules = dict(gm.named_modules())
        klass = storage_classes(gm, modules)
        members: dict = {}
        for node, rep in klass.items():
            members.setdefault(rep, []).append(node)
        removed = kept_update = False
        for node in reversed(list(gm.graph.nodes)):
            if node.users or node.is_impure() or _guards_a_specialised_input(node):
                continue
            if updates_in_place(node, modules):
                group = members[klass[node]]
                if any(m.op in ("placeholder", "get_attr") for m in group) or any(
                    u is not node for m in group for u in m.users
                ):
                    kept_update = True
                    continue
            gm.graph.erase_node(node)
            removed = removed_any = True
        # newest first, a node is reached after all its users: one sweep removes every dead chain; only an update
        # kept for a reader that the sweep removed later may have become dead, and only then is there another
        if not (removed and kept_update):
            return removed_any
