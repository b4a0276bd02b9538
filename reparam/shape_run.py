"""Shapes of every node of a traced graph (``node.meta['tensor_meta']``) from one run of the graph, without the
arithmetic of its convolutions and matrix products.

The passes need each node's shape and dtype, never its values.  :func:`record_shapes` runs the graph once with
*stand-ins* for the heavy ops (convolutions, matrix products, attention; batch norm and gathers of floating
tensors): their output shape, stride and dtype come from the op's meta kernel (or a formula), their output is
zeros; transcendental unary ops (GELU, SiLU, softmax ...) return zeros shaped like their input; pointwise ops,
reductions, concatenations, pools and resizes of large floating tensors (:data:`ELEMENTWISE_STAND_IN`) return zeros
laid out by their meta kernel, looked up once per signature.  Everything else runs as usual on those values, so a
shape run costs little more than the interpreter's walk of the graph (a float64 ViT-B/16 at 224x224 does 17 GMACs
in its matrix products; the cosine attention of swinv2_cr_small_384 clamps 5M-element maps 120 times).

An op whose output *shape* depends on tensor values (``nonzero``, boolean indexing, ``.item()`` and anything else
reading a value into Python) cannot run on stand-ins: the run is then repeated for real, as it is when the
stand-in run fails in any other way (an op without a meta kernel, say).  Strides recorded for stand-ins are
those of the op's meta kernel (for convolutions: channels-last out of a channels-last input, as the CPU kernels
give; the meta kernel gives contiguous), which may differ from the real kernel's; reparam reads shapes and
dtypes only.  Running everything on the meta device would need
no stand-ins, but PyTorch's meta kernels of elementwise ops and batch norm are Python decompositions, slower than
the real ops at these sizes.

Caches that a module's forward leaves behind during the stand-in run are removed afterwards
(:func:`reparam.interface.restore_state`): they may hold values computed from zeros.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from .interface import restore_state, snapshot_state
from .stats import as_args
from .taps import tensor_key

aten = torch.ops.aten

#: ops replaced by stand-ins: nearly all of a network's arithmetic, none of its shape logic
HEAVY = frozenset(
    {
        aten.convolution.default,
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten.baddbmm.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten._scaled_dot_product_attention_math.default,
    }
)
#: floating unary ops whose output has their input's shape and dtype: stand-ins too (and ``_softmax`` without
#: ``half_to_float``) (a float64 GELU or
#: softmax over a transformer's activations costs as much as a matrix product there)
SAME_AS_INPUT = frozenset(
    {
        aten.gelu.default,
        aten.silu.default,
        aten.sigmoid.default,
        aten.tanh.default,
        aten.hardswish.default,
        aten.hardsigmoid.default,
        aten.mish.default,
        aten.elu.default,
        aten.softplus.default,
        aten.erf.default,
        aten.exp.default,
        aten.log.default,
        aten.sqrt.default,
        aten.rsqrt.default,
        aten.reciprocal.default,
    }
)
IN_PLACE_SAME = frozenset(
    {
        aten.gelu_.default,
        aten.silu_.default,
        aten.sigmoid_.default,
        aten.tanh_.default,
        aten.hardswish_.default,
        aten.hardsigmoid_.default,
        aten.mish_.default,
        aten.elu_.default,
        aten.erf_.default,
        aten.exp_.default,
    }
)
#: ops on a floating tensor whose output layout their meta kernel gives from their inputs' shapes alone: stand-ins
#: too when their first argument is floating (a gather of attention biases over every pair of tokens, a pad)
FLOATING_HEAVY = frozenset({aten.index.Tensor, aten.constant_pad_nd.default})
#: batch norm ops -> the position of their ``training`` argument (None: never training); stand-ins on a floating
#: input, laid out without their meta kernel (a Python decomposition, slower than the real op): the output like
#: the input, the saved statistics per channel when training, empty when not
BATCH_NORMS = {
    aten.native_batch_norm.default: 5,
    aten._native_batch_norm_legit.default: 5,
    aten._native_batch_norm_legit.no_stats: 3,
    aten._native_batch_norm_legit_no_training.default: None,
}
#: ops whose stand-ins are laid out by a formula that does not check the shapes the real op checks (:func:`_refused`)
SHAPE_CHECKED = frozenset({aten.convolution.default, aten.native_layer_norm.default, *BATCH_NORMS})
#: ops whose output shape (or Python control flow) depends on tensor values: stand-ins cannot feed them
VALUE_DEPENDENT = frozenset(
    {
        aten._local_scalar_dense.default,
        aten.is_nonzero.default,
        aten.equal.default,
        aten.nonzero.default,
        aten.nonzero_static.default,
        aten.argwhere.default,
        aten.masked_select.default,
        aten.unique_dim.default,
        aten._unique2.default,
        aten.unique_consecutive.default,
        aten.bincount.default,
        aten.histc.default,
        aten.repeat_interleave.Tensor,
        aten.allclose.default,
    }
)

#: a pointwise op or reduction whose largest floating tensor has at least this many elements is a stand-in too, laid
#: out by its meta kernel (a few hundred microseconds the first time, a dictionary lookup for every later call of the
#: same signature); smaller ones cost less to run than to look up (swinv2_cr_small_384's cosine-attention clamps on
#: 5M-element float64 maps: 7.7 ms each, 0.9 s of its 1.5 s shape run)
ELEMENTWISE_STAND_IN = 1 << 16

_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


class NeedsValues(Exception):
    """The graph read a tensor value (an op of :data:`VALUE_DEPENDENT`): its shapes need a real run."""


def tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """fx's ``TensorMetadata`` of a dense, unquantized tensor, without the symbolic-shape machinery of
    ``shape_prop._extract_tensor_metadata`` (which costs about 0.5 ms a tensor)."""
    if t.is_quantized or t.layout != torch.strided:
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        return _extract_tensor_metadata(t)
    fmt = next((f for f in _FORMATS if t.is_contiguous(memory_format=f)), None)
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), fmt, False, {})


#: what a node may compute that the shape run records as it is (:attr:`ShapeRecorder.PLAIN`): a size, a count, a flag
_PLAIN_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _plain(value: Any) -> bool:
    """A scalar of :data:`_PLAIN_SCALARS`, or a tuple / list / ``torch.Size`` of them (nested)."""
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN_SCALARS)


class ShapeRecorder(fx.Interpreter):
    """Runs a graph and records ``meta['tensor_meta']`` (and ``meta['type']``) on each node, as fx's ShapeProp; a node
    that computes a plain value (:func:`_plain`: ``H // 2``, ``x.shape[-2:]``) also gets it as ``meta[PLAIN]`` (a
    stand-in run computes shapes, and values of its tensors are never read: such a value is the real run's)."""

    PLAIN = "plain_value"

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        found = False

        def extract(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return tensor_metadata(obj)
            return obj

        meta = fx.node.map_aggregate(value, extract)
        if found:
            n.meta["tensor_meta"] = meta
        elif _plain(value):
            n.meta[self.PLAIN] = tuple(value) if isinstance(value, list) else value
        n.meta["type"] = type(value)
        return value


def _meta_like(t: Any) -> Any:
    if not isinstance(t, torch.Tensor):
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _zeros_like(t: Any, device: torch.device) -> Any:
    """Zeros laid out as ``t`` on ``device``.  On the CPU their memory comes zeroed from the system (numpy's
    ``calloc``), so a stand-in nobody reads costs no page: filling a fresh 19 MB one (a float64 map of MaxViT at 384
    pixels) costs 10-25 ms of page faults on a busy VM, and a shape run may make a hundred."""
    if not isinstance(t, torch.Tensor):
        return t
    if device.type != "cpu" or t.numel() == 0:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).zero_()
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))  # elements the strides reach
    zeros = torch.from_numpy(numpy.zeros(extent * t.element_size(), numpy.uint8)).view(t.dtype)
    return zeros.as_strided(t.shape, t.stride())


#: ``op(bias, a, b, ...)`` -> the op whose meta kernel gives its output layout from ``(a, b)`` alone (PyTorch's meta
#: kernels of addmm / baddbmm are Python decompositions, 25x slower than mm's / bmm's)
_WITHOUT_BIAS = {aten.addmm.default: aten.mm.default, aten.baddbmm.default: aten.bmm.default}


class StandIns(TorchDispatchMode):
    """Inside this mode, the ops of :data:`HEAVY` (and of :data:`FLOATING_HEAVY` on a floating tensor) return zeros
    of the shape, stride and dtype their meta kernel gives; batch and layer norms (:data:`BATCH_NORMS`), softmaxes,
    clones and :data:`SAME_AS_INPUT` of a floating tensor zeros like their input (running statistics are not
    updated); the ops of :data:`VALUE_DEPENDENT` raise :class:`NeedsValues`; all other ops run as usual.

    Stand-ins of one layout are one zero tensor, handed out again (filling a fresh one costs as much as a
    cheap op): an op that updates one in place changes values nobody reads, never a shape."""

    def __init__(self):
        super().__init__()
        self._zeros: dict = {}
        self._layouts: dict = {}  # (op, its arguments' signature) -> its output on meta tensors
        #: the geometry of every convolution run: (input shape, weight shape, stride, padding, dilation, transposed,
        #: the weight's :func:`reparam.taps.tensor_key`)
        self.convolutions: list = []

    def _stand_in(self, like: Any, device: torch.device) -> Any:
        if not isinstance(like, torch.Tensor):
            return like
        key = (tuple(like.shape), like.stride(), like.dtype, device)
        if key not in self._zeros:
            self._zeros[key] = _zeros_like(like, device)
        return self._zeros[key]

    def _like(self, x: torch.Tensor, layout: torch.memory_format = torch.preserve_format) -> torch.Tensor:
        """A stand-in of ``x``'s shape and dtype, laid out as ``torch.empty_like(x, memory_format=layout)``."""
        return self._stand_in(torch.empty_like(_meta_like(x), memory_format=layout), x.device)

    def _normalised(self, x: torch.Tensor, stats: tuple, layout=torch.preserve_format) -> tuple:
        """A norm's outputs: a stand-in like ``x``, and two statistics of shape ``stats`` (values nobody reads)."""
        return self._like(x, layout), *(torch.empty(stats, dtype=x.dtype, device=x.device) for _ in range(2))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in VALUE_DEPENDENT or (func is aten.index.Tensor and _boolean_index(args)):
            raise NeedsValues(str(func))
        if func in SHAPE_CHECKED and _refused(func, args):  # the real op raises its own error
            return func(*args, **kwargs)
        if func in HEAVY or (func in FLOATING_HEAVY and _floating(args)):
            if func is aten.convolution.default:
                layout = convolution_layout(*args[:9])
                if any(side < 1 for side in layout.shape[2:]):  # a map smaller than the kernel: the real op refuses
                    return func(*args, **kwargs)
                x, w, _, stride, padding, dilation, transposed = args[:7]
                geometry = (tuple(x.shape), tuple(w.shape), stride, padding, dilation, transposed, tensor_key(w))
                self.convolutions.append(geometry)
                return self._stand_in(layout, x.device)
            device = next(
                t.device for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
            )
            if func in _WITHOUT_BIAS and not kwargs:  # bias broadcast to a @ b: same layout as a @ b
                out = _WITHOUT_BIAS[func](_meta_like(args[1]), _meta_like(args[2]))
            else:
                out = func(*tree_map(_meta_like, args), **tree_map(_meta_like, kwargs))
            return tree_map(lambda t: self._stand_in(t, device), out)
        if func in BATCH_NORMS and _floating(args):
            x, at = args[0], BATCH_NORMS[func]
            return self._normalised(x, (x.shape[1],) if at is not None and args[at] else (0,))
        if func is aten.native_layer_norm.default and _floating(args):
            x, normalized = args[0], len(args[1])
            stats = (*x.shape[: x.dim() - normalized], *(1,) * normalized)
            return self._normalised(x, stats, torch.contiguous_format)
        if func is aten.clone.default and _floating(args):  # a copy of values nobody reads: its layout only
            return self._like(args[0], kwargs.get("memory_format", torch.preserve_format))
        if (func in SAME_AS_INPUT or _softmax_in_its_dtype(func, args, kwargs)) and _floating(args):
            # the layout elementwise kernels give: the input's strides if it is dense, else contiguous
            return self._like(args[0])
        if func in IN_PLACE_SAME and _floating(args):
            return args[0]  # its values do not matter here, and it stays the same tensor
        if _laid_out_by_meta(func) and "out" not in kwargs and _largest(args) >= ELEMENTWISE_STAND_IN:
            return self._elementwise_stand_in(func, args, kwargs)
        return func(*args, **kwargs)

    def _elementwise_stand_in(self, func, args: tuple, kwargs: dict) -> Any:
        """A pointwise op or reduction on a large floating tensor: stand-ins laid out as its meta kernel lays out its
        output (an in-place op: its first argument, once the meta kernel accepts the arguments' shapes); run as usual
        when that output is not all floating (a comparison's mask) or the meta kernel fails."""
        key = (func, _signature(args), _signature(kwargs))
        try:
            hash(key)
        except TypeError:  # an argument that is no value (an object without a hash): the real op decides
            return func(*args, **kwargs)
        if key not in self._layouts:
            try:
                self._layouts[key] = func(*tree_map(_meta_like, args), **tree_map(_meta_like, kwargs))
            except Exception:  # noqa: BLE001  no meta kernel for it (or arguments it refuses): the real op decides
                self._layouts[key] = None
        layout = self._layouts[key]
        outputs = torch.utils._pytree.tree_leaves(layout)
        if layout is None or not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in outputs):
            return func(*args, **kwargs)
        if torch.Tag.inplace in func.tags:
            return args[0]  # its values do not matter here, and it stays the same tensor of the same shape
        device = next(t.device for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor))
        return tree_map(lambda t: self._stand_in(t, device), layout)


def convolution_layout(x, w, bias, stride, padding, dilation, transposed, output_padding, groups) -> torch.Tensor:
    """A meta tensor laid out as ``aten.convolution``'s output (its meta kernel, a Python function, costs 0.2 ms a
    call): the shape from the usual formulas, channels-last when the input is and is not also contiguous."""
    sides = []
    for axis in range(w.dim() - 2):
        n, k, s, p, d = x.shape[2 + axis], w.shape[2 + axis], stride[axis], padding[axis], dilation[axis]
        if transposed:
            sides.append((n - 1) * s - 2 * p + d * (k - 1) + output_padding[axis] + 1)
        else:
            sides.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
    channels = w.shape[1] * groups if transposed else w.shape[0]
    out = torch.empty((x.shape[0], channels, *sides), dtype=x.dtype, device="meta")
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if last is not None and x.is_contiguous(memory_format=last) and not x.is_contiguous():
        out = out.contiguous(memory_format=last)
    return out


def _refused(func, args: tuple) -> bool:
    """Would the real op refuse these shapes, where its stand-in (laid out by a formula, not its meta kernel) would
    not?  A convolution whose input has the wrong rank or channel count (one whose map is smaller than its dilated
    kernel: :meth:`StandIns.__torch_dispatch__`, from the layout it computes anyway); a batch norm whose input's
    channels are not its statistics'; a layer norm whose input does not end in its normalized shape.  Without this
    a stand-in run gets through inputs the model does not take."""
    if func is aten.convolution.default:
        x, w, transposed, groups = args[0], args[1], args[6], args[8]
        takes = w.shape[0] if transposed else w.shape[1] * groups
        return x.dim() != w.dim() or x.shape[1] != takes
    if func is aten.native_layer_norm.default:
        shape = tuple(args[1])
        return tuple(args[0].shape[args[0].dim() - len(shape) :]) != shape
    x, stats = args[0], [t for t in args[1:5] if isinstance(t, torch.Tensor)]  # a batch norm: weight, bias, mean, var
    return x.dim() < 2 or any(t.numel() != x.shape[1] for t in stats)


def _softmax_in_its_dtype(func, args: tuple, kwargs: dict) -> bool:
    """A softmax whose output has its input's dtype (``_softmax`` without ``half_to_float``, ``_safe_softmax``, the
    masked-row-safe one of attention, without a ``dtype``)."""
    if func is aten._softmax.default:
        return not args[2]
    if func is aten._safe_softmax.default:
        return (args[2] if len(args) > 2 else kwargs.get("dtype")) is None
    return False


_ELEMENTWISE_TAGS = (torch.Tag.pointwise, torch.Tag.reduction)
#: ops besides pointwise ones and reductions whose output layout their meta kernel gives from their inputs' layouts
LAID_OUT_BY_META = frozenset(
    {
        aten.cat.default,
        aten.stack.default,
        aten.avg_pool2d.default,
        aten._adaptive_avg_pool2d.default,
        aten.upsample_nearest2d.default,
        aten.upsample_nearest2d.vec,
        aten.upsample_bilinear2d.default,
        aten.upsample_bilinear2d.vec,
    }
)


def _laid_out_by_meta(func) -> bool:
    """A pointwise op, a reduction (by their tags) or one of :data:`LAID_OUT_BY_META`: an op whose output layout
    its meta kernel gives from its inputs' layouts, and whose values only their values decide."""
    return func in LAID_OUT_BY_META or any(tag in func.tags for tag in _ELEMENTWISE_TAGS)


def _largest(args: tuple) -> int:
    """The most elements of any floating tensor among ``args`` and the lists in them (0 when none): what decides
    whether a stand-in pays; an op whose first tensor is not floating (a mask, an index) is not counted (0)."""
    leaves = [t for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    if not leaves or not leaves[0].is_floating_point():
        return 0
    return max((t.numel() for t in leaves if t.is_floating_point()), default=0)


def _signature(value: Any) -> Any:
    """What of an op's argument decides its output's layout, hashable: a tensor's shape, strides and dtype; a list's
    items; any other value with its type (``1``, ``1.0`` and ``True`` promote differently)."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.stride(), value.dtype)
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_signature(v) for v in value))
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in value.items())
    return (type(value), value)


def _floating(args: tuple) -> bool:
    return bool(args) and isinstance(args[0], torch.Tensor) and args[0].is_floating_point()


def _boolean_index(args: tuple) -> bool:
    """``x[mask]``: an ``aten.index`` with a boolean index, whose output length is the mask's count."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def record_shapes(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple[Any, list | None]:
    """(``gm``'s output on ``inputs`` (values computed from stand-ins unless the real run was needed), the geometry of
    every convolution the run made, modules called as they are included (:attr:`StandIns.convolutions`; None after
    a real run)), recording every node's ``tensor_meta``; raises what the real run raises when both fail.
    ``inputs`` are not modified.

    before -> after: nodes without ``tensor_meta`` -> every node that produces tensors has it, with the
    shapes and dtypes a real run on ``inputs`` gives.  Precondition: ``gm`` runs without grad (the caller's
    ``torch.no_grad()``).
    """
    state = snapshot_state(gm)
    try:
        with StandIns() as mode:
            return ShapeRecorder(gm).run(*tree_map(_clone, list(inputs))), mode.convolutions
    except Exception:  # noqa: BLE001  NeedsValues, or any failure on stand-in values: run it for real
        pass
    finally:
        restore_state(gm, state)  # caches computed from stand-ins
    return ShapeRecorder(gm).run(*tree_map(_clone, list(inputs))), None


def runs_on_stand_ins(module: nn.Module, inputs: Any) -> bool:
    """Does ``module(*inputs)`` (a tuple of positional inputs, or one tensor) run through on stand-ins
    (:class:`StandIns`, without grad)?  False when it raises anything, :class:`NeedsValues` included: only a real run
    tells then.  Caches the run leaves are undone; ``inputs`` are not modified."""
    state = snapshot_state(module)
    try:
        with torch.no_grad(), StandIns():
            module(*tree_map(_clone, list(as_args(inputs))))
        return True
    except Exception:  # noqa: BLE001  any failure on stand-in values: the real run decides
        return False
    finally:
        restore_state(module, state)


def _clone(t: Any) -> Any:
    return t.clone() if isinstance(t, torch.Tensor) else t
