"""Constant folding: what a forward computes from parameters and buffers alone is computed once, at fuse time.

    x + self.attention_biases[:, self.attention_bias_idxs]              (LeViT: a gather on every forward)
 -> x + self.attention_biases_folded                                    (a buffer holding its value)

    F.conv2d(x, F.batch_norm(self.weight.reshape(1, o, -1), ...).reshape_as(self.weight))    (StdConv2d)
 -> F.conv2d(x, self.weight_folded)

A node is *constant* when it is a ``get_attr`` of a tensor, or a pure, deterministic ``call_function`` /
``call_method`` (of torch, ``operator``, ``math`` or a few builtins; not random, not in-place, no ``out=``, no
BatchNorm updating running statistics, no move to a literal device) whose node inputs are all constant; literals
are allowed.  A placeholder, a ``call_module`` (stateful) and anything reading them are not, nor is a tensor
whose storage something writes in place or hands to code fx did not trace (which could write it).

A constant node with a tensor value that a non-constant node reads is a *result*; every constant it is computed
from is constant too, so its subgraph is a maximal constant one.  A result is folded -- evaluated once (the
graph is float64 on the CPU here, so the value is exactly what each forward computed), registered as a
persistent buffer ``<block>.<first tensor read>_folded``, read by a ``get_attr`` in its place, its subgraph then
dead -- unless

- it only views one tensor (a ``get_attr`` or a chain of views): nothing would be saved, the memory doubled;
- its value is not a tensor (a shape, a number): nothing to register;
- it is too large (:class:`SizeRule`); the refusal is reported, and the constants it reads are tried instead
  (``(b * s).expand(...)`` too large: ``b * s`` still folds).

dtype: the buffer holds the float64 value while the pipeline folds and checks.  The dtype it is cast back to is
the one the user's precision computes it in: the subgraph run on meta tensors, each input in the dtype the
pipeline casts it back to (``dtypes``), so a float16 model gets a float16 buffer and an integer result stays
integer (:attr:`PassResult.buffer_dtypes`).

Runs before collapse: a functional conv whose weight was computed then reads a buffer (the lifted conv's weight
is the same value).  The passes after it build modules on activations and leave no new parameter-only
subgraphs, so it runs once.
"""

from __future__ import annotations

import functools
import inspect
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..match import attr_path
from ..proofs import REWRITE
from ..report import Report, Rewrite
from . import PassResult
from .cleanup import finish
from .mutation import VIEW_METHODS, storage_classes, updates_in_place
from .naming import block_prefix, fresh_name

EVENT = "fold_constant"
MIB = 2**20

_SAFE_MODULES = ("torch", "_operator", "operator", "math")
_SAFE_BUILTINS = {getattr, len, int, float, bool, min, max, abs, round, sum, tuple, list, slice, pow, divmod}
# random (F.normalize is not: "normal" followed by "ize" is deterministic), or uninitialised memory
_RANDOM_NAME = re.compile(
    r"rand|dropout|bernoulli|multinomial|poisson|uniform|exponential|geometric|cauchy|gumbel|rrelu|empty|seed"
    r"|binomial|dirichlet|standard_gamma|normal(?!i[sz]e)"
)
# methods whose value depends on more than the tensor's value, move it across devices, or act on autograd
_UNSAFE_METHODS = {
    "cuda",
    "cpu",
    "pin_memory",
    "share_memory_",
    "record_stream",
    "data_ptr",
    "storage",
    "untyped_storage",
    "storage_offset",
    "numpy",
    "backward",
    "register_hook",
    "retain_grad",
}
_DEVICE_MOVES = {"to", "type"}  # constant unless a literal device is among their arguments
_NORMS_WITH_STATISTICS = {F.batch_norm: "training", F.instance_norm: "use_input_stats"}

_VIEW_FUNCTIONS = {
    getattr(torch, name)
    for name in VIEW_METHODS
    if name not in ("view", "view_as", "reshape_as", "expand", "expand_as", "contiguous", "unflatten")
    and hasattr(torch, name)
}
_VIEW_ATTRIBUTES = {"T", "mT", "H", "mH", "data", "real"}


@dataclass(frozen=True)
class SizeRule:
    """Which results are small enough to keep as buffers; sizes in bytes, in the dtype each is cast back to.

    A result folds when it is at most ``max_bytes`` and either at most ``small_bytes`` or at most ``max_growth``
    times the tensors it is computed from (each counted once).  LeViT's gather, ``(heads, N, N)`` from ``(heads,
    N)`` biases and ``(N, N)`` int64 indices, holds at most ``heads / 2`` times the bytes it reads and is below
    1 MiB at timm's resolutions (timm's eval mode caches exactly it); a weight standardisation holds as many bytes
    as the weight.  A bias expanded to an activation's size grows by that size and is refused.
    """

    max_bytes: int = 64 * MIB
    small_bytes: int = 1 * MIB
    max_growth: float = 16.0

    def refusal(self, result_bytes: int, input_bytes: int) -> Optional[str]:
        """Why a result of ``result_bytes`` computed from ``input_bytes`` is kept as code; None: it folds."""
        limits = (
            f"(a buffer holds at most {_size(self.max_bytes)}, and more than {_size(self.small_bytes)} only "
            f"when at most {self.max_growth:g}x its inputs)"
        )
        if result_bytes > self.max_bytes:
            return f"its {_size(result_bytes)} would be too large a buffer {limits}"
        if result_bytes <= self.small_bytes or result_bytes <= self.max_growth * input_bytes:
            return None
        growth = f"{result_bytes / input_bytes:.0f}x the {_size(input_bytes)}" if input_bytes else "made from no"
        return f"its {_size(result_bytes)} would be {growth} tensors it is computed from {limits}"


def _size(n: float) -> str:
    for unit, scale in (("MiB", MIB), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fold_constants(
    gm: fx.GraphModule,
    report: Report,
    dtypes: Optional[Mapping] = None,
    default_dtype: Optional[torch.dtype] = None,
    sizes: SizeRule = SizeRule(),
) -> PassResult:
    """Fold every result (module docstring) that ``sizes`` accepts; the graph is rewritten in place.

    ``dtypes`` (read only): tensor name -> the dtype the pipeline casts it back to; ``default_dtype``: that of
    floating tensors missing there (the pipeline's rule for fx's own constants); without either, a tensor's own
    dtype.  Returns the folds, and each new buffer's cast-back dtype (``buffer_dtypes``); shapes do not change.
    A refusal (too large; a value that cannot be evaluated) is reported with its reason.
    """
    folder = _Folder(gm, report, dtypes or {}, default_dtype, sizes)
    made = folder.run()
    if made:
        finish(gm)
    return PassResult(len(made), buffer_dtypes=made)


def constant_nodes(gm: fx.GraphModule) -> set:
    """The nodes of ``gm`` whose value is the same on every forward (module docstring)."""
    return _analyse(gm)[0]


def _analyse(gm: fx.GraphModule) -> tuple[set, set]:
    """(the constant nodes, the nodes whose storage (or a view's) the graph returns)."""
    modules = dict(gm.named_modules())
    klass = storage_classes(gm, modules)
    written = _sharing(klass, _writes(gm, modules))
    constant: set = set()
    for node in gm.graph.nodes:
        if node in written:
            continue
        if node.op == "get_attr":
            ok = isinstance(_attribute(gm, str(node.target)), torch.Tensor)
        else:
            ok = _pure(node) and all(n in constant for n in node.all_input_nodes)
        if ok:
            constant.add(node)
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return constant, _sharing(klass, output.all_input_nodes)


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    try:
        return attr_path(gm, target)
    except AttributeError:
        return None


def _sharing(klass: dict, nodes: Iterable) -> set:
    """The nodes that may share storage with one of ``nodes`` (``klass``: mutation's storage classes)."""
    classes = {klass[n] for n in nodes}
    return {n for n, rep in klass.items() if rep in classes}


def _writes(gm: fx.GraphModule, modules: dict) -> list:
    """Nodes some node writes: in place, through ``out=``, or possibly, because code fx did not trace (a custom
    module, a wrapped function) receives them."""
    sinks: list = []
    for node in gm.graph.nodes:
        if updates_in_place(node, modules) and node.args and isinstance(node.args[0], fx.Node):
            sinks.append(node.args[0])
        sinks += _nodes_in(node.kwargs.get("out"))
        if _opaque(node, modules):
            sinks += node.all_input_nodes
    return sinks


def _nodes_in(value: Any) -> list:
    found: list = []
    fx.node.map_arg(value, found.append)
    return found


def _opaque(node: fx.Node, modules: dict) -> bool:
    """Code fx did not trace into, which may write its arguments."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return module is None or not type(module).__module__.startswith("torch.nn.")
    return node.op == "call_function" and not _trusted(node.target)


def _trusted(function: Any) -> bool:
    if function in _SAFE_BUILTINS:
        return True
    home = str(getattr(function, "__module__", None) or "")
    return home.split(".")[0] in _SAFE_MODULES


def _pure(node: fx.Node) -> bool:
    """``node`` computes a value from its arguments alone and writes nothing."""
    if node.op == "call_function":
        if not _trusted(node.target):
            return False
        name = getattr(node.target, "__name__", "")
    elif node.op == "call_method":
        name = str(node.target)
        if name in _UNSAFE_METHODS:
            return False
    else:
        return False
    if _RANDOM_NAME.search(name.lower()) or updates_in_place(node, {}) or node.kwargs.get("out") is not None:
        return False
    return not (_moves_to_device(node, name) or _updates_statistics(node))


def _moves_to_device(node: fx.Node, name: str) -> bool:
    """A literal device among the arguments (``w.to("cuda")``, ``torch.zeros(3, device="cuda")``): the value's place
    is the code's choice; the fused model's buffers all go to the model's device."""
    literals = list(node.args) + list(node.kwargs.values())
    if "device" in node.kwargs and not isinstance(node.kwargs["device"], fx.Node):
        return True
    return name in _DEVICE_MOVES and any(isinstance(a, (str, int, torch.device)) for a in literals[1:])


def _updates_statistics(node: fx.Node) -> bool:
    """A BatchNorm / InstanceNorm using batch statistics while it has running ones: it updates them."""
    if node.op != "call_function":
        return False
    function: Any = node.target
    flag = _NORMS_WITH_STATISTICS.get(function)
    if flag is None:  # another spelling (torch.batch_norm ...): its arguments are not read here
        return bool(re.search(r"batch_norm|instance_norm", getattr(function, "__name__", "")))
    try:
        bound = _signature_of(function).bind(*node.args, **node.kwargs)
    except TypeError:
        return True
    bound.apply_defaults()
    stats = (bound.arguments.get("running_mean"), bound.arguments.get("running_var"))
    return any(s is not None for s in stats) and bound.arguments.get(flag) is not False


@functools.cache
def _signature_of(function: Callable) -> inspect.Signature:
    return inspect.signature(function)


# ----------------------------------------------------------------------------------------------------------


class _Values:
    """Values of constant nodes (memoised), each ``get_attr`` read through ``leaf``.

    ``by_signature``: an op's value is reused for another node calling it on arguments of the same signature
    (:func:`_signature`), which is sound for meta tensors only, whose values are their shapes, strides and dtypes
    (a network's repeated blocks standardise weights of few distinct shapes; the meta kernel of a batch norm is a
    Python decomposition costing a millisecond a call)."""

    def __init__(self, leaf: Callable[[fx.Node], Any], order: Mapping, by_signature: bool = False):
        self.leaf, self.order = leaf, order
        self.memo: dict = {}
        self.by_signature: Optional[dict] = {} if by_signature else None

    def __call__(self, node: fx.Node) -> Any:
        """``node``'s value; precondition: ``node`` is constant.  Raises what the model's code raises."""
        if node not in self.memo:
            for n in _subgraph(node, self.order):  # in graph order: no deep recursion
                if n not in self.memo:
                    self.memo[n] = self._run(n)
        return self.memo[node]

    def _run(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            return self.leaf(node)
        args = fx.node.map_arg(node.args, self.memo.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, self.memo.__getitem__)
        key = None
        if self.by_signature is not None:
            key = _signature((node.op, node.target, args, kwargs))
            if key is not None and key in self.by_signature:
                return self.by_signature[key]
        with torch.no_grad():
            if node.op == "call_method":
                value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
            else:
                function: Any = node.target
                value = function(*args, **kwargs)
        if key is not None and self.by_signature is not None:
            self.by_signature[key] = value
        return value


def _signature(value: Any) -> Any:
    """A hashable stand-in for ``value``, equal for equal values, tensors by shape, strides and dtype; None when
    there is none (an object that cannot be hashed; ``None`` itself has one)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.storage_offset(), value.device.type)
    if isinstance(value, (tuple, list)):
        items = tuple(_signature(v) for v in value)
        return None if any(i is None for i in items) else (type(value), items)
    if isinstance(value, dict):
        return _signature(tuple(value.items()))
    if isinstance(value, slice):
        return _signature(("slice", value.start, value.stop, value.step))
    try:
        hash(value)
    except TypeError:
        return None
    return (type(value), value)


def _subgraph(node: fx.Node, order: Mapping) -> list:
    """``node`` and every node it is computed from, in graph order (``order``: node -> its position)."""
    seen, stack = {node}, [node]
    while stack:
        for n in stack.pop().all_input_nodes:
            if n not in seen:
                seen.add(n)
                stack.append(n)
    return sorted(seen, key=order.__getitem__)


class _Folder:
    """One sweep of the pass over ``gm``."""

    def __init__(self, gm: fx.GraphModule, report: Report, dtypes: Mapping, default: Optional[torch.dtype], sizes):
        self.gm, self.report, self.dtypes, self.default, self.sizes = gm, report, dtypes, default, sizes
        self.constant, self.returned = _analyse(gm)
        self.order: dict = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.real = _Values(lambda n: attr_path(gm, str(n.target)), self.order)
        self.meta = _Values(self._meta_leaf, self.order, by_signature=True)  # in the cast-back dtypes

    def _cast_back_dtype(self, node: fx.Node) -> torch.dtype:
        t = attr_path(self.gm, str(node.target))
        if not t.is_floating_point():
            return t.dtype
        return self.dtypes.get(str(node.target), self.default or t.dtype)

    def _meta_leaf(self, node: fx.Node) -> torch.Tensor:
        t = attr_path(self.gm, str(node.target))
        return torch.empty_strided(t.shape, t.stride(), dtype=self._cast_back_dtype(node), device="meta")

    def run(self) -> dict:
        """Fold; ``{new buffer: its cast-back dtype}``."""
        made: dict = {}
        results = [n for n in self.gm.graph.nodes if n in self.constant and self._read_by_code(n)]
        tried: set = set()
        while results:
            node = results.pop(0)
            if node in tried:
                continue
            tried.add(node)
            outcome = self._fold(node, reported=self._read_by_code(node))
            if isinstance(outcome, tuple):
                made[outcome[0]] = outcome[1]
            elif outcome == "too large":
                results += [n for n in node.all_input_nodes if n.op != "get_attr"]
        return made

    def _read_by_code(self, node: fx.Node) -> bool:
        """A non-constant node reads ``node``."""
        return any(u not in self.constant for u in node.users)

    def _fold(self, node: fx.Node, reported: bool):
        """(buffer name, dtype) when ``node`` was folded; else why not: "trivial", "too large" or "failed"."""
        leaves = list({str(n.target): n for n in _subgraph(node, self.order) if n.op == "get_attr"}.values())
        where = block_prefix([node]) or (str(leaves[0].target) if leaves else node.name)
        try:
            shape = self.meta(node)
        except Exception as err:  # noqa: BLE001  the model's code on meta tensors: any failure keeps the code
            return self._unknown_dtype(where, node, leaves, err)
        if not isinstance(shape, torch.Tensor) or self._views_only(node):
            return "trivial"
        if node in self.returned:
            why = "the model returns it (or a view of it): a caller writing into it would change the next forward's"
            return self._refuse(where, node, leaves, why)
        why = self.sizes.refusal(_bytes(shape), sum(_bytes(self.meta(n)) for n in leaves))
        if why is not None:
            if reported:
                self._refuse(where, node, leaves, why)
            return "too large"
        try:
            value = _owned(self.real(node), [self.real(n) for n in leaves])
        except Exception as err:  # noqa: BLE001  the model's code on its own tensors: any failure keeps the code
            return self._refuse(where, node, leaves, f"evaluating it failed ({err})")
        before = self._describe(node, leaves)
        read = self._register(node, value, leaves, before)
        self.order[read] = self.order[node] - 0.5  # where it stands; its values are the node's
        self.real.memo[read], self.meta.memo[read] = value, shape
        name = str(read.target)
        after = f"buffer {name.rpartition('.')[2]} {_shape(value)}"
        self.report.rewrites.append(Rewrite(where, before, after, (EVENT,)))
        return name, shape.dtype

    def _unknown_dtype(self, where: str, node: fx.Node, leaves: list, err: Exception) -> str:
        """Meta tensors do not run ``node``'s subgraph (``.item()``, a data-dependent shape): a tensor result is kept,
        since its dtype in the user's precision is unknown; any other value needs nothing."""
        try:
            value = self.real(node)
        except Exception:  # noqa: BLE001  the model's code on its own tensors: any failure keeps the code
            value = None
        if not isinstance(value, torch.Tensor):
            return "trivial"
        why = f"its dtype in the model's precision cannot be derived without computing in it ({err})"
        return self._refuse(where, node, leaves, why)

    def _refuse(self, where: str, node: fx.Node, leaves: list, why: str) -> str:
        self.report.refuse(where, f"constant kept: {self._describe(node, leaves)}: {why}")
        return "failed"

    def _views_only(self, node: fx.Node) -> bool:
        """``node`` is a ``get_attr`` or a chain of views of one (other inputs: shapes, sizes, numbers)."""
        while node.op != "get_attr":
            if not _is_view(node, self.meta):
                return False
            data = node.args[0]
            assert isinstance(data, fx.Node)  # _is_view's precondition
            as_other = str(getattr(node.target, "__name__", node.target)).endswith("_as")
            others = [n for n in node.all_input_nodes if n is not data]
            if not as_other and any(isinstance(self.meta(n), torch.Tensor) for n in others):
                return False
            node = data
        return True

    def _describe(self, node: fx.Node, leaves: list) -> str:
        """``getitem of attention_biases, attention_bias_idxs`` (the ops in graph order, then what they read)."""
        ops: list = []
        for n in _subgraph(node, self.order):
            if n.op in ("call_function", "call_method"):
                name = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
                if name not in ops and name != "getattr":
                    ops.append(name)
        read = list(dict.fromkeys(str(n.target).rpartition(".")[2] for n in leaves))
        what = ", ".join(ops) or node.name
        return f"{what} of {', '.join(read)}" if read else what

    def _register(self, node: fx.Node, value: torch.Tensor, leaves: list, before: str) -> fx.Node:
        """``value`` as a persistent buffer next to ``node``'s block, read by a ``get_attr`` in ``node``'s place
        (returned)."""
        floating = [n for n in leaves if attr_path(self.gm, str(n.target)).is_floating_point()]
        first = (floating or leaves or [node])[0]
        stem = f"{str(first.target).rpartition('.')[2] if leaves else node.name}_folded"
        name = fresh_name(self.gm, [node], stem)
        owner_path, _, attr = name.rpartition(".")
        if owner_path and not isinstance(_attribute(self.gm, owner_path), nn.Module):
            owner_path, attr = "", fresh_name(self.gm, [], stem)  # the block is no module of gm any more: the root
            name = attr
        owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
        owner.register_buffer(attr, value, persistent=True)
        graph = self.gm.graph
        with graph.inserting_before(node):
            read = graph.get_attr(name)
        read.meta.update(node.meta)  # shape, module stack, origin: the proofs compare it with the node's value
        read.meta[REWRITE] = f"{before} -> constant buffer"
        node.replace_all_uses_with(read)
        self.constant.add(read)
        return read


def _is_view(node: fx.Node, meta: _Values) -> bool:
    """``node`` returns a view of its first argument (never a copy of its data)."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        return str(node.target) in VIEW_METHODS
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _VIEW_ATTRIBUTES
    if node.target is operator.getitem:
        return len(node.args) > 1 and _basic_index(node.args[1], meta)
    return node.target in _VIEW_FUNCTIONS


def _basic_index(index: Any, meta: _Values) -> bool:
    """An index that views: integers, slices, None, Ellipsis (no tensor or list: those gather a copy)."""
    if isinstance(index, tuple):
        return all(_basic_index(i, meta) for i in index)
    if isinstance(index, fx.Node):
        return not isinstance(meta(index), (torch.Tensor, list, tuple))
    if isinstance(index, slice):
        return all(_basic_index(i, meta) for i in (index.start, index.stop, index.step))
    return index is None or index is Ellipsis or isinstance(index, (int, bool))


def _owned(value: torch.Tensor, leaves: list) -> torch.Tensor:
    """``value`` as a buffer of its own: contiguous, its storage no larger than it and shared with none of the
    ``leaves`` (a view of a parameter, or of a larger intermediate, is copied)."""
    value = value.detach()
    storage = value.untyped_storage()
    whole = value.is_contiguous() and value.storage_offset() == 0 and storage.nbytes() == _bytes(value)
    if whole and all(t.untyped_storage().data_ptr() != storage.data_ptr() for t in leaves):
        return value
    return value.clone(memory_format=torch.contiguous_format)


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape) if t.dim() else "scalar"
