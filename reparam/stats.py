"""Measurements of a model: what it executes, how big it is, how fast it runs, how far apart two outputs are.

Everything here runs the model as it is, under ``torch.no_grad``, and never changes the model's mode: put it in
eval mode first (a model in training mode updates its BatchNorm running statistics when it runs).
``example_inputs`` is either one tensor or a tuple of positional arguments.

Public API (stable; used by the CLI, the benchmarks and the tests):

``count_kernels(model, example_inputs) -> dict[str, int]``
    runs the model once under a :class:`~torch.utils._python_dispatch.TorchDispatchMode` and counts the ATen ops
    executed, in the keys of :data:`KERNEL_KINDS`:

    - ``"conv"``: convolutions (``aten.convolution``, ``aten.conv1d/2d/3d``, transposed and backend variants such
      as ``mkldnn_convolution`` / ``cudnn_convolution``);
    - ``"batch_norm"``: any op whose name contains ``batch_norm``
      (``native_batch_norm``, ``_native_batch_norm_legit_no_training``, ``cudnn_batch_norm`` ...);
    - ``"add"``: ``aten.add.Tensor`` / ``aten.add_.Tensor`` whose two operands are tensors with the same number of
      elements, i.e. residual and branch adds; bias adds (broadcast) and adds of a scalar are not counted;
    - ``"linear"``: ``aten.addmm``, ``aten.mm``, ``aten.linear``;
    - ``"total"``: every ATen op seen, including views and allocations.

``count_norms(model, example_inputs) -> dict[str, int]``
    the normalisations a forward pass executes and how many of them plain conv+BN folding would remove:

    - ``"batch_norm"``: batch-norm ops (as in :func:`count_kernels`);
    - ``"channel_affine"``: constant per-channel scalings of an activation, ``x * s`` or ``addcmul(b, x, s)``
      with ``s`` computed from the model's own tensors only and broadcasting along the channel axis alone
      (``torchvision.ops.FrozenBatchNorm2d``, a BN written out by hand, an unfolded layer scale); a scale that
      depends on the input (squeeze-and-excitation) is not one;
    - ``"foldable"``: how many of those read the output of a convolution that nothing else reads, i.e. what
      conv+BN folding in the style of ``torch.fx.experimental.optimization.fuse`` removes.

``count_params(model) -> int``
    number of elements in the model's parameters (each shared tensor counted once; buffers are not counted).

``count_macs(model, example_inputs) -> int``
    multiply-accumulates of one forward pass, from :class:`torch.utils.flop_counter.FlopCounterMode` (flops / 2).

``latency_ms(model, example_inputs, warmup=3, repeats=10, budget_s=None) -> float``
    median wall-clock time of one forward pass, in milliseconds (synchronising CUDA when the inputs live there);
    ``budget_s`` caps the time spent on the timed passes.

``latencies_ms(models, example_inputs, ...)`` / ``interleaved_times_ms(models, example_inputs, ...)``
    several models timed in turn, round by round (so that load on the machine hits them alike): the medians, or
    every round's time of each model (what :mod:`reparam.timing` makes the CLI's speed figure of).

``relative_error(actual, expected) -> float``
    the largest ‖actual − expected‖₂ / ‖expected‖₂ over the output tensors, computed in float64 by
    :func:`reparam.verify.relative_error` (0 for equal tensors; ``inf`` for an all-zero expected tensor that
    ``actual`` does not match exactly); ``inf`` when a difference is not finite (NaN or inf in either output), so
    ``err <= tol`` fails.

``max_abs_error(actual, expected) -> float``
    the largest element-wise ``|actual − expected|`` over the output tensors.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from reparam import verify

__all__ = [
    "KERNEL_KINDS",
    "count_kernels",
    "count_norms",
    "count_params",
    "count_macs",
    "latency_ms",
    "latencies_ms",
    "interleaved_times_ms",
    "relative_error",
    "max_abs_error",
    "as_args",
]

KERNEL_KINDS = ("conv", "batch_norm", "add", "linear", "total")

_CONV_OPS = frozenset(
    {
        "convolution",
        "_convolution",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "mkldnn_convolution",
        "cudnn_convolution",
        "cudnn_convolution_transpose",
        "miopen_convolution",
        "miopen_depthwise_convolution",
        "_mps_convolution",
        "thnn_conv2d",
        "_slow_conv2d_forward",
        "slow_conv3d",
        "slow_conv_dilated2d",
        "slow_conv_dilated3d",
        "slow_conv_transpose2d",
        "slow_conv_transpose3d",
        "_conv_depthwise2d",
        "conv_depthwise3d",
    }
)
_LINEAR_OPS = frozenset({"addmm", "mm", "linear"})
_ADD_OPS = frozenset({("add", "Tensor"), ("add_", "Tensor")})


def as_args(example_inputs: Any) -> tuple:
    """Normalise ``example_inputs`` (a tensor, a tuple/list of arguments, or None) to a tuple of arguments."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def _kind_of(func: Any, args: Sequence[Any]) -> str | None:
    """The :data:`KERNEL_KINDS` bucket of one executed ATen op, or None when it is in none of the named ones."""
    name = func.overloadpacket.__name__
    if name in _CONV_OPS:
        return "conv"
    if "batch_norm" in name:
        return "batch_norm"
    if name in _LINEAR_OPS:
        return "linear"
    if (name, func._overloadname) in _ADD_OPS and len(args) >= 2:
        a, b = args[0], args[1]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.numel() == b.numel():
            return "add"
    return None


class _KernelCounter(TorchDispatchMode):
    """Counts the ATen ops that reach the dispatcher (only the outermost call of each op is seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = dict.fromkeys(KERNEL_KINDS, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = _kind_of(func, args)
        if kind is not None:
            self.counts[kind] += 1
        self.counts["total"] += 1
        return func(*args, **(kwargs or {}))


def count_kernels(model: Callable, example_inputs: Any) -> dict[str, int]:
    """Run ``model`` once and count the convolutions, batch norms, tensor adds and linears it executes.

    Returns a dict with the keys of :data:`KERNEL_KINDS` (see the module docstring for what each counts).
    """
    counter = _KernelCounter()
    with torch.no_grad(), counter:
        model(*as_args(example_inputs))
    return dict(counter.counts)


class _NormCounter(TorchDispatchMode):
    """Follows which tensors derive from the inputs and which are convolution outputs, and counts the
    normalisations (see :func:`count_norms`).  Tensors are told apart by identity; every tensor seen is
    kept alive for the run so that an identity is never reused."""

    def __init__(self, inputs: Sequence[Any]) -> None:
        super().__init__()
        self.counts = {"batch_norm": 0, "channel_affine": 0, "foldable": 0}
        self.alive: list = []
        self.dependent = {id(t) for t in self._tensors(inputs)}  # derived from the inputs
        self.alive += self._tensors(inputs)
        self.conv_uses: dict = {}  # id of a conv output -> how many ops read it
        self.normed: list = []  # ids of the conv outputs a normalisation reads

    @staticmethod
    def _tensors(tree: Any) -> list:
        return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]

    def _norm_input(self, func, args: Sequence[Any]) -> Any:
        """The activation a batch norm or constant channel affine normalises, else None."""
        name = func.overloadpacket.__name__
        if "batch_norm" in name:
            return args[0]
        pairs = {"mul": (0, 1), "mul_": (0, 1), "addcmul": (1, 2)}.get(name)
        if pairs is None or len(args) <= max(pairs):
            return None
        a, b = args[pairs[0]], args[pairs[1]]
        for x, s in ((a, b), (b, a)):
            if self._is_channel_scale(x, s):
                return x
        return None

    def _is_channel_scale(self, x: Any, s: Any) -> bool:
        if not (isinstance(x, torch.Tensor) and isinstance(s, torch.Tensor)) or x.dim() < 2 or s.dim() > x.dim():
            return False
        if id(x) not in self.dependent or id(s) in self.dependent:
            return False
        shape = (1,) * (x.dim() - s.dim()) + tuple(s.shape)
        return shape[1] == x.shape[1] > 1 and all(n == 1 for i, n in enumerate(shape) if i != 1)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        read = self._tensors((args, kwargs))
        for t in read:
            if id(t) in self.conv_uses:
                self.conv_uses[id(t)] += 1
        x = self._norm_input(func, args)
        if x is not None:
            self.counts["batch_norm" if "batch_norm" in func.overloadpacket.__name__ else "channel_affine"] += 1
            if id(x) in self.conv_uses:
                self.normed.append(id(x))
        written = self._tensors(out)
        if any(id(t) in self.dependent for t in read):  # outputs, and inputs written in place (copy_, add_ ...)
            mutated = [
                a
                for a, spec in zip(args, func._schema.arguments, strict=False)  # trailing defaults left out
                if isinstance(a, torch.Tensor) and spec.alias_info is not None and spec.alias_info.is_write
            ]
            self.dependent.update(id(t) for t in written + mutated)
        if func.overloadpacket.__name__ in _CONV_OPS:
            self.conv_uses.update((id(t), 0) for t in written)
        self.alive += read + written
        return out

    def result(self) -> dict[str, int]:
        counts = dict(self.counts)
        counts["foldable"] = sum(self.conv_uses[i] == 1 for i in self.normed)
        return counts


def count_norms(model: Callable, example_inputs: Any) -> dict[str, int]:
    """Run ``model`` once and count its batch norms, constant channel affines and how many of them read a
    convolution output nothing else reads (see the module docstring)."""
    args = as_args(example_inputs)
    counter = _NormCounter(args)
    with torch.no_grad(), counter:
        model(*args)
    return counter.result()


def count_params(model: torch.nn.Module) -> int:
    """Number of parameter elements of ``model``; a tensor shared by several modules is counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_macs(model: Callable, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on ``example_inputs`` (FlopCounterMode flops / 2)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*as_args(example_inputs))
    return counter.get_total_flops() // 2


def _synchronize(args: tuple) -> None:
    for leaf in tree_leaves(args):
        if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
            torch.cuda.synchronize(leaf.device)
            return


def latency_ms(
    model: Callable, example_inputs: Any, warmup: int = 3, repeats: int = 10, budget_s: float | None = None
) -> float:
    """Median time of one forward pass in milliseconds, after ``warmup`` untimed passes.

    ``budget_s`` (optional) stops timing early once that many seconds have been spent on the timed passes
    (at least one pass is always timed), for a quick estimate on slow models.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    args = as_args(example_inputs)
    times: list[float] = []
    with torch.no_grad():
        for _ in range(warmup):
            model(*args)
        _synchronize(args)
        for _ in range(repeats):
            start = time.perf_counter()
            model(*args)
            _synchronize(args)
            times.append((time.perf_counter() - start) * 1e3)
            if budget_s is not None and sum(times) >= budget_s * 1e3:
                break
    return statistics.median(times)


def latencies_ms(
    models: list, example_inputs: Any, warmup: int = 3, repeats: int = 10, budget_s: float | None = None
) -> list[float]:
    """Median latency (ms) of each model, timed interleaved (round-robin) so that load on the machine
    hits every model alike; ``budget_s`` bounds the total timed seconds (at least one round runs)."""
    rounds = interleaved_times_ms(models, example_inputs, warmup=warmup, rounds=repeats, budget_s=budget_s)
    return [statistics.median(t) for t in rounds]


def interleaved_times_ms(
    models: list,
    example_inputs: Any,
    warmup: int = 3,
    rounds: int = 10,
    passes: int = 1,
    budget_s: float | None = None,
    alternate: bool = False,
    best: bool = False,
) -> list[list[float]]:
    """Per-round times (ms) of each model, the models timed in turn within every round.

    Each round runs every model ``passes`` times in a row and records the median of those passes (with ``best``,
    the fastest: other work on the machine only ever adds time, so the minimum is the least disturbed); with
    ``alternate`` the order of the models is reversed every other round (A B, B A, ...), so that a drift in the
    machine's speed favours no model.  ``warmup`` untimed rounds come first.  ``budget_s`` stops after the round in
    which the timed seconds reach it (at least one round runs).  Returns one list of round times per model.
    """
    if rounds < 1 or passes < 1:
        raise ValueError(f"rounds and passes must be at least 1, got {rounds} and {passes}")
    args = as_args(example_inputs)
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for _ in range(warmup):
            for model in models:
                model(*args)
        _synchronize(args)
        spent = 0.0
        for index in range(rounds):
            order = list(range(len(models)))
            if alternate and index % 2:
                order.reverse()
            for i in order:
                samples = []
                for _ in range(passes):
                    start = time.perf_counter()
                    models[i](*args)
                    _synchronize(args)
                    samples.append((time.perf_counter() - start) * 1e3)
                spent += sum(samples) / 1e3
                times[i].append(min(samples) if best else statistics.median(samples))
            if budget_s is not None and spent >= budget_s:
                break
    return times


def _leaf_pairs(actual: Any, expected: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Flatten two output structures (tensors, numpy arrays, tuples, dicts...) into aligned float64 CPU tensors."""
    a_leaves, e_leaves = tree_leaves(actual), tree_leaves(expected)
    if len(a_leaves) != len(e_leaves):
        raise ValueError(f"outputs differ in structure: {len(a_leaves)} tensors vs {len(e_leaves)}")
    pairs = []
    for a, e in zip(a_leaves, e_leaves, strict=True):
        a64 = _to_float64(a)
        e64 = _to_float64(e)
        if a64.shape != e64.shape:
            raise ValueError(f"outputs differ in shape: {tuple(a64.shape)} vs {tuple(e64.shape)}")
        pairs.append((a64, e64))
    return pairs


def _to_float64(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def relative_error(actual: Any, expected: Any) -> float:
    """Largest :func:`reparam.verify.relative_error` over the output tensors (0.0 when all are equal); ``inf``
    when one is not finite (a NaN or inf in either output), so that ``err <= tol`` fails."""
    worst = 0.0
    for a, e in _leaf_pairs(actual, expected):
        err = verify.relative_error(a, e)
        if not math.isfinite(err):
            return math.inf
        worst = max(worst, err)
    return worst


def max_abs_error(actual: Any, expected: Any) -> float:
    """Largest element-wise absolute difference over the output tensors."""
    worst = 0.0
    for a, e in _leaf_pairs(actual, expected):
        if a.numel():
            diff = (a - e).abs().max().item()
            worst = max(worst, diff) if math.isfinite(diff) else math.inf
    return worst
