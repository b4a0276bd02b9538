"""nn.Module -> torch.fx GraphModule with shapes, and example inputs when none are given.

Leaf policy: torch.nn modules are leaves (fx's default), plus any module without children whose forward does not
trace (:meth:`Tracer.call_module`), and, for a whole-model trace (:func:`trace_whole`), any module with children
whose own forward does not trace; functions timm marks as not traceable are called as they are.
Parameter and buffer look-ups are resolved from a dictionary built once, so tracing stays linear in
model size (fx's stock tracer scans every parameter for each functional access).
"""

from __future__ import annotations

import contextlib
import dis
import functools
import inspect
import io
import operator
import sys
import warnings
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.immutable_collections import immutable_dict, immutable_list

from .interface import keep_attributes, restore_state, snapshot_state
from .match import arg, attr_path, called_module, is_conv
from .shape_run import record_shapes


def _timm_functions() -> set:
    """The functions timm registers as not traceable (``register_notrace_function``): called as they are."""
    if "timm" not in sys.modules:  # a model that is not timm's: no need to import it (seconds cold)
        return set()
    try:
        from timm.layers import get_notrace_functions

        return set(get_notrace_functions())
    except (ImportError, TypeError):  # timm absent or reorganised: the stock policy still works
        return set()


class _Extras:
    """What reparam's Proxies add to fx's: item assignment, ``*size`` and attribute proxies of the same kind.

    ``t[index] = value`` is recorded as an ``operator.setitem`` node (fx's own Proxy raises
    ``TypeError``, so a model that writes a slice did not trace at all).  The node is an in-place
    update of ``t``: :mod:`reparam.passes.mutation` treats it as one, and
    :mod:`reparam.passes.inplace` reads it functionally where ``t`` is private."""

    def __setitem__(self, index, value) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})

    def __len__(self) -> int:
        # Python asks for a length hint while spreading ``*size`` into a call (see Tracer.iter)
        if _spread_size(self, inspect.currentframe().f_back):
            return 1
        return fx.Proxy.__len__(self)

    def __getattr__(self, name: str):
        tensor = self.__dict__.get("_tensor")  # a proxy of a parameter or buffer (Tracer.getattr)
        if tensor is not None and name in _STATIC_METHODS:
            return getattr(tensor, name)
        return _Attribute(self, name)


class _Proxy(_Extras, fx.Proxy):
    pass


#: methods of a parameter or buffer whose result its proxy gives as the number it is (``assert
#: self.periods.numel() == dim`` in timm's rotary embeddings reads one into Python): its size never depends on the
#: inputs
_STATIC_METHODS = frozenset({"numel", "dim", "ndimension"})


class _Attribute(_Extras, fx.proxy.Attribute):
    pass


#: fx's base tracer's handlers of the plain types it passes through as they are (numbers, strings, dtypes, None)
#: or recurses into (tuples, lists, dicts), less tensors, which fx's ``Tracer`` turns into get_attr nodes or
#: constants first; an fx without the table leaves every argument to fx's own checks
_PASSED_AS_IS = {
    kind: handler
    for kind, handler in getattr(fx.proxy, "_create_arg_bypass", {}).items()
    if not issubclass(kind, (torch.Tensor, fx.Proxy))
}


# torch methods that take a size as ``*sizes`` or as one sequence alike
_SIZE_METHODS = {"reshape", "view", "expand", "repeat", "new_zeros", "new_ones", "new_empty"}
_LOADS = {"LOAD_FAST", "LOAD_DEREF", "LOAD_NAME", "LOAD_GLOBAL"}


def _is_size(proxy: fx.Proxy) -> bool:
    """``proxy`` is a whole ``x.size()`` / ``x.shape``."""
    node = proxy.node
    if node.op == "call_method" and node.target == "size":
        return len(node.args) == 1 and not node.kwargs
    return node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)


def _spread_size(proxy: fx.Proxy, frame) -> bool:
    """``frame`` is at ``x.method(*proxy)`` with ``proxy`` a whole size and ``method`` size-taking."""
    return frame is not None and _is_size(proxy) and _spread_into(frame) in _SIZE_METHODS  # cheap test first


@functools.lru_cache(maxsize=4096)
def _instructions(code) -> tuple[list, dict]:
    """(the bytecode instructions of ``code``, offset -> index); disassembled once per code object (a trace
    asks for the same few forwards thousands of times)."""
    instructions = list(dis.get_instructions(code))
    return instructions, {inst.offset: i for i, inst in enumerate(instructions)}


def _spread_into(frame) -> str | None:
    """The method name when ``frame`` is at ``obj.method(*s)`` with ``s`` a name, ``y.shape`` or
    ``y.size()`` (the only argument); None otherwise."""
    code, offsets = _instructions(frame.f_code)
    at = offsets.get(frame.f_lasti)
    if at is None or code[at].opname != "CALL_FUNCTION_EX" or code[at].argval:
        return None
    before = [inst for inst in code[:at] if inst.opname not in ("PRECALL", "CACHE")]
    if before and before[-1].opname == "CALL" and before[-1].argval == 0:
        before = before[:-1]  # y.size()
    if before and before[-1].opname in ("LOAD_ATTR", "LOAD_METHOD") and before[-1].argval in ("shape", "size"):
        before = before[:-1]
    if len(before) < 2 or before[-1].opname not in _LOADS:
        return None
    callee = before[-2]
    return callee.argval if callee.opname in ("LOAD_ATTR", "LOAD_METHOD") else None


UNTRACEABLE = "reparam_untraceable"  # on a TraceError: the innermost module with children whose forward raised it


def untraceable_module(err: BaseException) -> torch.nn.Module | None:
    """The innermost module with children whose forward made a trace fail (None if unknown): every module that
    contains it fails the same way, so its ancestors need not be traced again."""
    return getattr(err, UNTRACEABLE, None)


class Tracer(fx.Tracer):
    """fx tracer with O(1) parameter/buffer look-up, opaque modules that do not trace (childless ones always, those
    with children when made with ``opaque_parents``), timm's not-traceable functions, item assignment and sizes
    spread into reshapes."""

    def __init__(self, root: torch.nn.Module | None = None, opaque_parents: bool = False, **kwargs):
        # root is optional: GraphModule re-creates its tracer class with no arguments when unpickled
        super().__init__(autowrap_functions=tuple(_timm_functions()), **kwargs)
        self._opaque: set = set()  # modules whose forward does not trace: called as they are
        self._opaque_parents = opaque_parents  # a module with children whose forward does not trace: opaque too
        self.parents: dict = {}  # each such module -> the TraceError its forward raised
        self._parameter_proxies: dict | None = None  # fx's cache of get_attr proxies (see ``getattr``)
        self._names = {}
        if root is not None:
            for name, p in root.named_parameters(remove_duplicate=False):
                self._names.setdefault(id(p), name)
            for name, b in root.named_buffers(remove_duplicate=False):
                self._names.setdefault(id(b), name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def iter(self, obj: fx.Proxy):
        """``x.reshape(*y.size())`` (official RepMLP's ``out.reshape(*origin_shape)``): a whole size
        spread into a size-taking torch method is passed as one sequence, ``x.reshape(y.size())``,
        which those methods read alike.  Any other iteration of a Proxy fails as in fx."""
        if _spread_size(obj, inspect.currentframe().f_back.f_back):  # the caller of Proxy.__iter__
            return iter((obj,))
        return super().iter(obj)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return m in self._opaque or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        """A module whose forward does not trace (Python control flow on a traced value, such as timm's
        ``Conv2dSame`` padding from the input's size) becomes one ``call_module`` node, run as it is, and the trace
        goes on; what its failed attempt recorded is undone.  A module *with* children does so only when the tracer
        was made with ``opaque_parents`` (its children's rewrites are then the caller's to do: :attr:`parents`);
        otherwise it fails the trace, the error naming it (:func:`untraceable_module`)."""
        if self.is_leaf_module(m, ""):  # torch.nn's, or made opaque by an earlier call
            return super().call_module(m, forward, args, kwargs)
        parent = next(m.children(), None) is not None
        last, depth = self.graph._root.prev, len(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
        except fx.proxy.TraceError as err:
            if parent and not self._opaque_parents:
                if not hasattr(err, UNTRACEABLE):  # the innermost module with children whose forward failed
                    setattr(err, UNTRACEABLE, m)
                raise
            if parent:
                self.parents[m] = err
            self._undo_after(last)
            while len(self.module_stack) > depth:  # scopes the failed attempt left open
                self.module_stack.popitem()
            self._opaque.add(m)
            return super().call_module(m, forward, args, kwargs)

    def _undo_after(self, last: fx.Node) -> None:
        """Erase every node recorded after ``last`` (newest first) and forget the proxies of erased get_attrs."""
        while self.graph._root.prev is not last:
            self.graph.erase_node(self.graph._root.prev)  # its users came later: erased already
        if self._parameter_proxies:
            live = set(self.graph.nodes)
            for name in [k for k, p in self._parameter_proxies.items() if p.node not in live]:
                del self._parameter_proxies[name]

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        self._parameter_proxies = parameter_proxy_cache
        if isinstance(attr_val, torch.Tensor) and self._names:
            name = self._names.get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    proxy = self.create_proxy("get_attr", name, (), {})
                    proxy._tensor = attr_val  # its numel() / dim() are numbers (_STATIC_METHODS)
                    parameter_proxy_cache[name] = proxy
                return parameter_proxy_cache[name]
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a):
        """fx's, with the common cases first: a proxy of this tracer is its node, and a value of a type fx's base
        tracer passes through or recurses into as it is (:data:`_PASSED_AS_IS`) skips the checks fx's ``Tracer``
        makes first (parameters, modules, named tuples, opaque types), which it never is; a tensor that is a
        parameter or buffer of the root is read with ``get_attr``.  Same result; a graph of three thousand nodes has
        some 10^4 arguments, and the trace of one takes a sixth less time (docs/benchmarks.md)."""
        kind = type(a)
        if kind is _Proxy:
            return a.node
        passed = _PASSED_AS_IS.get(kind)
        if passed is not None:
            return passed(self, a)
        if isinstance(a, torch.Tensor):
            name = self._names.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)


def symbolic_trace(model: torch.nn.Module) -> fx.GraphModule:
    """Trace ``model`` (in its current mode) into a GraphModule sharing its submodules; a module with children whose
    forward does not trace fails the trace (:func:`untraceable_module` names it).

    Whatever the forward caches on its modules while tracing (torchvision's ``MultiScaleRoIAlign`` keeps
    scales computed from the inputs: proxies, here) is undone, traced or not.
    """
    return _trace(Tracer(model), model)


def trace_whole(model: torch.nn.Module, given: int | None = None) -> tuple[fx.GraphModule, dict]:
    """:func:`symbolic_trace`, except that a module with children whose own forward does not trace is called as it
    is (one ``call_module``); returns (the GraphModule, ``{path of each such module: the TraceError it raised}``).
    Its children are left to the caller (:mod:`reparam.inside` fuses them).

    ``given``: how many positional inputs the model is called with (None: not known, one); each later parameter of
    its forward whose default is a constant is traced as that value (:func:`defaults_not_given`)."""
    tracer = Tracer(model, opaque_parents=True)
    gm = _trace(tracer, model, defaults_not_given(model, 1 if given is None else given))
    return gm, {tracer.path_of_module(m): err for m, err in tracer.parents.items()}


#: the defaults a parameter the call leaves out is traced as (:func:`defaults_not_given`): an optional input's None, a
#: flag, a number, a mode's name
_CONSTANT_DEFAULTS = (type(None), bool, int, float, str)


def defaults_not_given(model: torch.nn.Module, given: int) -> dict:
    """``{name: default}`` for each parameter of ``model.forward`` that a call with ``given`` positional inputs and no
    keywords leaves at its default, when that default is a constant (:data:`_CONSTANT_DEFAULTS`).  Traced as fx's
    concrete arguments, the graph computes that call: traced as a proxy, timm's Hiera takes its masked branch
    (``if mask is not None``) and its graph fails on a call without a mask, and a ViT's ``attn_mask is not None or
    is_causal`` would read a proxied flag.  The graph keeps each parameter and asserts it has that value, so a call
    with another fails instead of computing the wrong thing."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin or wrapped forward): nothing specialised
        return {}
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {
        p.name: p.default
        for i, p in enumerate(parameters)
        if type(p.default) in _CONSTANT_DEFAULTS
        and (p.kind is inspect.Parameter.KEYWORD_ONLY or (p.kind in positional and i >= given))
    }


def _trace(tracer: Tracer, model: torch.nn.Module, concrete: dict | None = None) -> fx.GraphModule:
    state = snapshot_state(model)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
        constants = _traced_constants(tracer.root, graph, state)
    finally:
        restore_state(model, state)
    name = model.__class__.__name__
    for attr, value in constants.items():  # on the root only while the GraphModule copies them (restore undid them)
        object.__setattr__(tracer.root, attr, value)
    try:
        gm = graph_module(tracer.root, graph, name)
    finally:
        for attr in constants:
            delattr(tracer.root, attr)
    keep_attributes(model, gm)  # a parent's forward may read them off the replacement
    return gm


def graph_module(root: torch.nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    """``fx.GraphModule(root, graph, name)``, except that its Python code is generated when it is first called (or
    its ``code`` read, or ``recompile()`` called), not now: a trace is mostly rewritten before it runs, and
    generating the code of a graph of two thousand nodes takes 50-70 ms on one core."""
    gm = fx.GraphModule.__new__(fx.GraphModule, root, graph, name)
    own = type(gm)  # fx gives every GraphModule a class of its own, where recompile() puts its forward
    own.recompile = _no_code  # type: ignore[method-assign]
    try:
        gm.__init__(root, graph, name)  # type: ignore[misc]
    finally:
        del own.recompile
    own.forward = _generate_code_then_forward  # type: ignore[method-assign]
    own.code = property(_generated_code)  # type: ignore[assignment]
    return gm


def _no_code(gm: fx.GraphModule) -> None:
    return None


def _generate_code_then_forward(gm: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
    gm.recompile()  # replaces this forward on the GraphModule's class by the generated one
    return gm.forward(*args, **kwargs)


def _generated_code(gm: fx.GraphModule) -> str:
    if "_code" not in vars(gm):
        gm.recompile()
    return vars(gm)["_code"]


def _traced_constants(root: torch.nn.Module, graph: fx.Graph, before: dict) -> dict:
    """Attributes the tracer itself put on ``root`` for the graph to read (``x * torch.tensor([2.])`` becomes
    ``get_attr _tensor_constant0``): those the snapshot ``before`` did not hold, by name."""
    had = before.get(root, {})
    names = {str(n.target).split(".")[0] for n in graph.nodes if n.op == "get_attr"}
    return {a: vars(root)[a] for a in names if a in vars(root) and a not in had}


@dataclass
class Run:
    """What a shape-propagation run returned: the traced graph's output on the inputs, and the geometry of the
    convolutions it ran (:func:`reparam.shape_run.record_shapes`; None when unknown)."""

    output: Any
    convolutions: list | None = None


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Run | None:
    """Record ``meta['tensor_meta']`` on every node by running ``example_inputs``; None if it fails (candidate
    inputs the model does not take; given inputs that fail here fail again, with their error, when the fused
    model is verified).

    Convolutions, matrix products and transcendental ops do no arithmetic in this run: zero stand-ins of their
    outputs' shapes take their place (:func:`reparam.shape_run.record_shapes`), unless the graph reads a value.
    """
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")  # a module's forward may print or warn for a candidate that fails
            output, convolutions = record_shapes(gm, example_inputs)  # inputs stay as given
            return Run(plain_containers(output), convolutions)
    except Exception:  # noqa: BLE001  the model's own code on trial inputs: any failure means "these do not run"
        return None


def plain_containers(value: Any) -> Any:
    """before -> after: fx's immutable containers (what the interpreter returns, a node's arguments) -> plain dicts,
    lists and tuples, as the compiled module returns them and a module's forward may update them."""
    if isinstance(value, immutable_dict):
        return {k: plain_containers(v) for k, v in value.items()}
    if isinstance(value, immutable_list):
        return [plain_containers(v) for v in value]
    if type(value) is tuple:
        return tuple(plain_containers(v) for v in value)
    return value


# --------------------------------------------------------------------------------------------
# example inputs


def _first_consumer_channels(gm: fx.GraphModule, placeholder: fx.Node) -> tuple[int, int] | None:
    """(channels, spatial rank) of the first conv/linear reached from ``placeholder``, breadth first."""
    modules = dict(gm.named_modules())
    frontier, seen = [placeholder], {placeholder}
    while frontier:
        nxt = []
        for node in frontier:
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                spec = input_spec(called_module(user, modules))
                if spec is not None:
                    return spec
                if user.op == "call_function" and user.target in _FUNCTIONAL_CONVS and arg(user, 0, "input") is node:
                    w = arg(user, 1, "weight")
                    if isinstance(w, fx.Node) and w.op == "get_attr":
                        t = attr_path(gm, str(w.target))
                        return t.shape[1] * int(arg(user, 6, "groups", 1)), t.dim() - 2
                nxt.append(user)
        frontier = nxt
    return None


_FUNCTIONAL_CONVS = {
    torch.nn.functional.conv1d,
    torch.nn.functional.conv2d,
    torch.nn.functional.conv3d,
    torch.conv2d,
    torch.conv1d,
    torch.conv3d,
}


def _configured_size(model: torch.nn.Module) -> int | None:
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            size = cfg["input_size"]
            return int(size[-1])
    return None


def input_spec(module: torch.nn.Module | None) -> tuple[int, int] | None:
    """(input channels or features, spatial rank: 0 for a Linear) of a conv (not transposed) or linear
    module; None for any other module (or None)."""
    if is_conv(module):
        return module.in_channels, module.weight.dim() - 2
    if isinstance(module, torch.nn.Linear):
        return module.in_features, 0
    return None


def first_layer(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """(qualified name, module) of the model's first conv/linear in registration order; None when it has none."""
    return next(((name, m) for name, m in model.named_modules() if input_spec(m) is not None), None)


def _first_layer_channels(model: torch.nn.Module) -> tuple[int, int] | None:
    """(channels, spatial rank) of the model's first conv/linear in registration order (for a model
    that does not trace, so its inputs cannot be followed)."""
    found = first_layer(model)
    return None if found is None else input_spec(found[1])


def infer_example_inputs(model: torch.nn.Module, gm: fx.GraphModule | None, dtype, device, runs=None) -> tuple | None:
    """Random inputs a forward pass accepts, from the first conv/linear the inputs reach (``gm``:
    the traced model; None for a model that does not trace: one input, for its first layer).

    Tries small sizes first, then the model's configured input size (timm ``pretrained_cfg``) and a
    few common sizes; None if no candidate runs.  ``runs(inputs) -> bool`` tries one candidate
    (default: a forward pass of ``model``).
    """
    if gm is None:
        specs = [_first_layer_channels(model)]
    else:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        required = [n for n in placeholders if not n.args]  # args hold the default value
        specs = [_first_consumer_channels(gm, node) for node in required]
    if any(spec is None for spec in specs):
        return None
    # small first: verification runs in float64 and cost grows with the area
    sizes = [s for s in (64, 32, _configured_size(model), 224, 96, 128, 256, 16) if s]
    generator = torch.Generator().manual_seed(0)
    for size in dict.fromkeys(sizes):
        inputs = tuple(
            torch.randn((2, c) + (size,) * nd, generator=generator, dtype=dtype).to(device) for c, nd in specs
        )
        if (runs or (lambda x: _forward_ok(model, x)))(inputs):
            return inputs
    return None


def _forward_ok(model: torch.nn.Module, inputs: tuple) -> bool:
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(*inputs)
        return True
    except Exception:  # noqa: BLE001  the model's own code on trial inputs: any failure means "these do not run"
        return False
