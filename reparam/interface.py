"""What a fused replacement keeps of the module it replaces: attributes, properties, output containers,
and the original modules' cached state.

A traced part replaces a module inside a parent whose Python ``forward`` still runs, and that forward
reads the part like the original: plain attributes (``self.attn.resolution``), properties of its class
(segmentation_models_pytorch reads ``self.encoder.output_stride``), and the exact container types of its
output (torchvision's backbones return an ``OrderedDict``; fx's generated code builds a plain ``dict``).
Modules that cache tensors during a forward (ultralytics' ``Detect`` keeps ``anchors`` / ``strides``)
must not keep what reparam's private float64 runs left behind.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_structure, tree_unflatten

_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # _parameters, _buffers, _modules, hooks, training ...


def _carried(value: Any) -> bool:
    """Values a replacement may share with the original: data, not modules, tensors or callables."""
    return not (isinstance(value, (nn.Module, torch.Tensor)) or callable(value))


def keep_attributes(original: nn.Module, replacement: nn.Module) -> None:
    """Copy ``original``'s instance attributes and the values of its class's properties onto ``replacement``.

    before -> after: ``replacement.x`` raises AttributeError -> ``replacement.x == original.x`` for every
    plain attribute and every property defined by ``original``'s classes (not ``nn.Module``'s).
    Precondition: none; names ``replacement`` already has, submodules, tensors, callables and
    properties that raise are left alone.  Property values are frozen at fusion time.
    """
    for key, value in vars(original).items():
        if key in _MODULE_INTERNALS or key.startswith("__") or _has(replacement, key) or not _carried(value):
            continue
        _set(replacement, key, value)
    for cls in type(original).__mro__:
        if cls in (nn.Module, object) or cls.__module__.startswith("torch.nn"):
            continue
        for key, attr in vars(cls).items():
            if not isinstance(attr, property) or _has(replacement, key):
                continue
            try:
                value = getattr(original, key)
            except Exception:  # noqa: BLE001  a user's property that fails on the original is not carried
                continue
            if _carried(value):
                _set(replacement, key, value)


def _has(module: nn.Module, key: str) -> bool:
    return key in vars(module) or hasattr(type(module), key)


def _set(module: nn.Module, key: str, value: Any) -> None:
    try:
        setattr(module, key, value)
    except (AttributeError, TypeError):  # a slot, a read-only name or a buffer's name: the attribute stays behind
        pass


# --------------------------------------------------------------------------------------------
# output containers


def restore_containers(output: Any, spec: TreeSpec) -> Any:
    """``output`` rebuilt with the containers of ``spec`` (same leaves in the same order)."""
    return tree_unflatten(tree_flatten(output)[0], spec)


torch.fx.wrap("restore_containers")

_SPEC_ATTRIBUTE = "_reparam_output_spec"


def match_containers(gm: fx.GraphModule, got: Any, want: Any) -> bool:
    """Make ``gm`` return ``want``'s container types where its traced code builds others; True if ``gm``
    was changed.

    before -> after: ``gm`` returns ``{'out': y}`` where the original returned ``OrderedDict(out=y)``
    -> ``gm`` returns ``OrderedDict(out=y)``.  Precondition: ``got`` (``gm``'s output) and ``want``
    (the original's) have the same number of leaves, in the same order (ValueError otherwise).
    """
    got_spec, want_spec = tree_structure(got), tree_structure(want)
    if got_spec == want_spec:
        return False
    if got_spec.num_leaves != want_spec.num_leaves:
        raise ValueError(f"{got_spec.num_leaves} outputs where the original returns {want_spec.num_leaves}")
    setattr(gm, _SPEC_ATTRIBUTE, want_spec)
    graph = gm.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    with graph.inserting_before(output), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx warns of a get_attr that is no tensor or module: this one is data
        spec = graph.get_attr(_SPEC_ATTRIBUTE)
        rebuilt = graph.call_function(restore_containers, (output.args[0], spec))
    output.args = (rebuilt,)
    gm.recompile()
    return True


# --------------------------------------------------------------------------------------------
# cached state


_BUFFERS = "_buffers"  # the snapshot's entry for a module's buffers (name -> tensor); an internal name, no attribute's


def snapshot_state(model: nn.Module) -> dict:
    """Each module's plain attributes before any forward run (to undo what caches a run leaves), with a shallow
    copy of the contents of each dict and list among them (caches that a forward fills in place, such as timm's
    ``attention_bias_cache``), and which tensor each of its buffers is (a forward that caches by assigning a buffer
    anew, as ConViT's ``rel_indices``)."""
    return {
        m: {
            **{k: (v, _contents(v)) for k, v in vars(m).items() if k not in _MODULE_INTERNALS},
            _BUFFERS: dict(m._buffers),
        }
        for m in model.modules()
    }


def _contents(value: Any) -> Any:
    """A shallow copy of a dict's or list's items (None for any other value)."""
    if type(value) is dict:
        return dict(value)
    if type(value) is list:
        return list(value)
    return None


def restore_state(fused: nn.Module, snapshot: dict) -> None:
    """Put every module of ``fused`` that was in ``snapshot`` back to its state before the runs.

    before -> after: ``detect.anchors`` is a float64 tensor cached by a verification run -> the attribute
    is as it was in the user's model (unset, so the next forward computes it in the model's dtype); a dict
    attribute that a run filled in place (``attention_bias_cache["cpu"]``, a float64 tensor) holds again
    what it held before; a buffer a run assigned anew (ConViT's ``rel_indices``, computed from stand-in values by
    the shape run) is the tensor it was.  Precondition: ``snapshot`` from :func:`snapshot_state` on the same module
    objects.
    """
    for module in fused.modules():
        before = snapshot.get(module)
        if before is None:
            continue
        buffers = before.get(_BUFFERS)
        if buffers is not None and _changed(module._buffers, buffers):
            module._buffers.clear()
            module._buffers.update(buffers)
        for key in [k for k in vars(module) if k not in _MODULE_INTERNALS]:
            if key not in before:
                delattr(module, key)
                continue
            value, contents = before[key]
            if vars(module)[key] is not value:
                object.__setattr__(module, key, value)
            if contents is not None and _changed(value, contents):
                value.clear()
                if type(value) is dict:
                    value.update(contents)
                else:
                    value.extend(contents)


def _changed(container: Any, contents: Any) -> bool:
    """``container`` (a dict or list) no longer holds exactly the objects ``contents`` lists."""
    if len(container) != len(contents):
        return True
    if type(container) is dict:
        return any(k not in contents or container[k] is not contents[k] for k in container)
    return any(a is not b for a, b in zip(container, contents, strict=True))
