"""Whether a merge pays: the one place a rewrite asks before it trades several kernels for one.

A pass that could merge builds a :class:`Candidate` (the region as it is and as it would be, both runnable on the
region's real input shapes) and asks a cost model; the :class:`Decision` it gets back says yes or no, why, and, for a
measured decision, both times.  Two models:

- ``MacCost`` (``cost="macs"``, the default): merge when the merged form costs no more multiply-accumulates.
- ``LatencyCost`` (``cost="latency"``): merge without timing when the profit is certain (no more kernels and no
  more MACs); otherwise time both forms on the target device and dtype and keep the faster (a tie within
  measurement noise goes as ``MacCost`` decides: latency departs from the MAC rule only for a measured gain).
  Timings are cached per (device, dtype, op signature): :mod:`reparam.latency_cache`.

MACs are counted in one currency everywhere: what :class:`torch.utils.flop_counter.FlopCounterMode` counts
(convolutions and matrix products; BatchNorms, channel-wise ops, pads, pools and adds cost none), so that under
``cost="macs"`` ``reparam.stats.count_macs(fused) <= count_macs(original)``.
"""

from __future__ import annotations

import copy
import math
import platform
import statistics
from dataclasses import dataclass, replace
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from . import affine as A
from .errors import ReparamError
from .latency_cache import LatencyCache
from .match import attr_path

MAC_SLACK = 1e-9  # relative: float rounding in MAC sums never decides a merge
NOISE = 0.03  # relative: two measured times closer than this are a tie (then the MAC rule decides)
COST_NAMES = ("macs", "latency")


@dataclass(frozen=True)
class Candidate:
    """A merge a pass could do at ``where`` (a module path or node name, as the report names it).

    ``before`` / ``after`` build (lazily: only a measuring model calls them) modules that compute the region as it is
    and as merged, each taking ``input_shapes`` tensors and returning the region's outputs (float64 on the CPU, as
    the passes hold them; a measuring model copies them to its device and dtype).  Only their time matters, so
    ``after`` may be built on the meta device (:func:`stand_in`: computing merged weights can take longer than timing
    them); a measuring model gives such a module random weights.  MACs: one run on the region's real
    input shapes, counted as FlopCounterMode counts them (:func:`affine_macs`).
    """

    where: str
    kind: str  # the rewrite it would record: merge_parallel, merge_siblings, compose, ...
    before_macs: float
    after_macs: float
    before_kernels: int
    after_kernels: int
    input_shapes: tuple[torch.Size, ...] = ()
    before: Optional[Callable[[], nn.Module]] = None
    after: Optional[Callable[[], Optional[nn.Module]]] = None  # None from it: no single module computes the merge

    @property
    def more_macs(self) -> bool:
        return self.after_macs > self.before_macs * (1 + MAC_SLACK) + MAC_SLACK

    @property
    def certain(self) -> bool:
        """Merging pays by every proxy (no more kernels, no more MACs): no measurement could refuse it."""
        return self.after_kernels <= self.before_kernels and not self.more_macs


@dataclass(frozen=True)
class Decision:
    """``merge``: do it.  ``reason``: one line for the report (a refusal's reason when ``merge`` is false)."""

    merge: bool
    reason: str
    before_s: Optional[float] = None  # measured seconds per run of the region as it is
    after_s: Optional[float] = None  # ... and merged


class CostModel(Protocol):
    def decide(self, candidate: Candidate) -> Decision: ...


class MacCost:
    """Merge when the merged form costs no more multiply-accumulates than the region it replaces."""

    name = "macs"

    def decide(self, candidate: Candidate) -> Decision:
        before, after = _macs(candidate.before_macs), _macs(candidate.after_macs)
        if not candidate.more_macs:
            return Decision(True, f"{after} MACs, not more than {before}")
        return Decision(
            False,
            f"kept {_kernels(candidate.before_kernels)}: merging would cost more MACs than it "
            f"saves ({before} -> {after})",
        )


Measure = Callable[[nn.Module, nn.Module, tuple], tuple[float, float]]


class LatencyCost:
    """Keep the faster form, measured on ``device`` in ``dtype``; a certain profit merges without timing.

    ``cache``: a :class:`~reparam.latency_cache.LatencyCache`, a path to its JSON file, or None for the default
    (``$REPARAM_CACHE_DIR/latency.json``, else ``~/.cache/reparam/latency.json``).  ``measure(before, after,
    inputs) -> (before_s, after_s)``: the timer (default :func:`interleaved_seconds`; tests inject a fake one).
    A decision found in the cache is reused verbatim, so repeated fuses time nothing and decide alike.
    """

    name = "latency"

    def __init__(
        self,
        device=None,
        dtype: torch.dtype = torch.float32,
        cache=None,
        measure: Optional[Measure] = None,
        noise: float = NOISE,
    ):
        self.device = torch.device("cpu" if device is None else device)
        self.dtype = dtype
        self.cache = cache if isinstance(cache, LatencyCache) else LatencyCache.at(cache)
        self.measure = measure or interleaved_seconds
        self.noise = noise
        self.measured = 0  # how many candidates this model timed (not found in the cache)

    def decide(self, candidate: Candidate) -> Decision:
        if candidate.certain:
            return Decision(
                True,
                f"{_kernels(candidate.before_kernels)} -> {_kernels(candidate.after_kernels)}, "
                f"{_macs(candidate.after_macs)} MACs, not more than "
                f"{_macs(candidate.before_macs)}: not timed",
            )
        forms = self._forms(candidate)
        if isinstance(forms, str):  # cannot be timed: the MAC rule decides, and says why
            return self._untimed(candidate, forms)
        key = "|".join(
            (
                device_name(self.device),
                str(self.dtype).replace("torch.", ""),
                "x".join(",".join(map(str, s)) for s in candidate.input_shapes),
                signature(forms[0]),
                signature(forms[1]),
            )
        )
        entry = self.cache.get(key)
        if entry is None:
            inputs = tuple(torch.randn(tuple(s), device=self.device, dtype=self.dtype) for s in candidate.input_shapes)
            try:
                before, after = (self._on_target(f) for f in forms)
                before_s, after_s = self.measure(before, after, inputs)
            except Exception as err:  # noqa: BLE001 - any failure to run a form alone: the MAC rule decides, says why
                return self._untimed(candidate, f"{type(err).__name__}: {err}")
            self.measured += 1
            entry = {
                "before_s": float(before_s),
                "after_s": float(after_s),
                "merge": self._faster_merged(candidate, before_s, after_s),
            }
            self.cache.put(key, entry)
        return self._decision(candidate, entry)

    def _forms(self, candidate: Candidate):
        """Both forms as the candidate builds them, or why they cannot be built."""
        if candidate.before is None or candidate.after is None or not candidate.input_shapes:
            return "the region's forms or input shapes are unknown"
        try:
            forms = (candidate.before(), candidate.after())
        except Exception as err:  # noqa: BLE001 - a region that cannot be built alone: the MAC rule decides, says why
            return f"the region cannot be built alone ({type(err).__name__}: {err})"
        return "no single module computes the merged form" if None in forms else forms

    def _on_target(self, module: nn.Module) -> nn.Module:
        """A copy of ``module`` on the target device and dtype (the passes' float64 modules share their parameters
        with the graph being fused); a module on the meta device gets random weights of its shapes."""
        tensors = list(module.parameters()) + list(module.buffers())
        if not any(t.is_meta for t in tensors):
            return copy.deepcopy(module).to(device=self.device, dtype=self.dtype).eval()
        module = module.to_empty(device=self.device).to(dtype=self.dtype)
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                if t.is_floating_point():
                    t.normal_(0.0, 0.1)
        return module.eval()

    @staticmethod
    def _untimed(candidate: Candidate, why: str) -> Decision:
        fallback = MacCost().decide(candidate)
        return Decision(fallback.merge, f"{fallback.reason} (not timed: {why})")

    def _tie(self, before_s: float, after_s: float) -> bool:
        return abs(before_s - after_s) <= self.noise * min(before_s, after_s)

    def _faster_merged(self, candidate: Candidate, before_s: float, after_s: float) -> bool:
        if self._tie(before_s, after_s):  # within measurement noise: no measured reason to depart from the MAC rule
            return not candidate.more_macs
        return after_s < before_s

    def _decision(self, candidate: Candidate, entry: dict) -> Decision:
        before_s, after_s, merge = entry["before_s"], entry["after_s"], bool(entry["merge"])
        times = f"{_ms(before_s)} -> {_ms(after_s)} on {self.device.type} {str(self.dtype).replace('torch.', '')}"
        tie = f"a tie within {self.noise:.0%}, and merging costs {'more' if candidate.more_macs else 'no more'} MACs"
        if merge:
            verdict = tie if self._tie(before_s, after_s) else "measured faster"
            return Decision(
                True,
                f"merged {_kernels(candidate.before_kernels)} into "
                f"{_kernels(candidate.after_kernels)}: {verdict} ({times})",
                before_s,
                after_s,
            )
        verdict = tie if self._tie(before_s, after_s) else "merging is measured slower"
        return Decision(False, f"kept {_kernels(candidate.before_kernels)}: {verdict} ({times})", before_s, after_s)


def resolve_cost(cost, device=None, dtype: torch.dtype = torch.float32):
    """``cost`` as a cost model: "macs" -> :class:`MacCost`, "latency" -> :class:`LatencyCost` timing on ``device``
    in ``dtype``, an object with ``decide(candidate)`` as it is; anything else a one-line :class:`ReparamError`."""
    if isinstance(cost, str) and cost in COST_NAMES:
        if cost == "macs":
            return MacCost()
        return LatencyCost(_device(device), dtype)
    if not isinstance(cost, str) and callable(getattr(cost, "decide", None)):
        return cost
    raise ReparamError(
        f"cost must be one of {', '.join(map(repr, COST_NAMES))} or a cost model with a "
        f"decide(candidate) method, got {cost!r}"
    )


def _device(device) -> torch.device:
    try:
        return torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as err:
        raise ReparamError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r} ({err})") from None


def ask(model: CostModel, candidate: Candidate, report=None) -> Decision:
    """``model.decide(candidate)``; a decision that was not foregone (the candidate was not :attr:`certain`, or it
    was timed) is listed in ``report.decisions``, so the report says why every doubtful merge went as it did."""
    decision = model.decide(candidate)
    if report is not None and (not candidate.certain or decision.before_s is not None):
        report.decide(
            where=candidate.where,
            kind=candidate.kind,
            merged=decision.merge,
            reason=decision.reason,
            before_kernels=candidate.before_kernels,
            after_kernels=candidate.after_kernels,
            before_macs=float(candidate.before_macs),
            after_macs=float(candidate.after_macs),
            before_s=decision.before_s,
            after_s=decision.after_s,
        )
    return decision


# ---------------------------------------------------------------------------------------------- the MAC currency


def conv_macs(a: A.Affine, out_shape: Sequence[int]) -> float:
    """MACs of a conv (or linear: channels-last) computing ``a`` into a tensor of ``out_shape``, as FlopCounterMode
    counts them: ``numel(out) * in_channels/groups * prod(kernel)``; ``numel(out) * in_features`` for a linear."""
    per_output = a.in_channels if a.layout.channels_last else math.prod(a.w.shape[1:])
    return float(math.prod(out_shape) * per_output)


def affine_macs(a: A.Affine, out_shape: Sequence[int]) -> float:
    """MACs of the module :func:`reparam.emit.to_module` builds for ``a`` producing a tensor of ``out_shape``:
    none for a channel-wise scale (``ChannelAffine``) or a pad, else :func:`conv_macs`."""
    return conv_macs(a, out_shape) if emits_conv(a) else 0.0


def emits_conv(a: A.Affine) -> bool:
    """:func:`reparam.emit.to_module` builds a conv or linear for ``a`` (not a channel-wise scale or a pad)."""
    return not (a.kind is A.Kind.PAD or (a.kind.channelwise and not a.pads))


def emitted_kernels(a: A.Affine) -> int:
    """Kernels the module built for ``a`` launches: none for a plain identity, two for a conv that pads
    asymmetrically first (``Sequential(ConstantPadNd, ConvNd)``), else one."""
    if a.kind is A.Kind.IDENTITY and not a.pads:
        return 0
    if not emits_conv(a) or a.layout.channels_last:
        return 1
    return 1 if a.pad_lo == a.pad_hi else 2


# ---------------------------------------------------------------------------------------------- forms of a region


def stand_in(a: A.Affine) -> A.Affine:
    """``a`` with a weight of its shape on the meta device (no memory, no values): what to build the merged form's
    module from for timing, without computing its weight (a composed or concatenated weight is built lazily, and can
    take longer to compute than to time).  Build it with ``device="meta"``."""
    return replace(a, w=torch.empty(tuple(a.w.shape), dtype=torch.float64, device="meta"))


def subgraph_module(gm: fx.GraphModule, inputs: Sequence[fx.Node], outputs: Sequence[fx.Node]) -> fx.GraphModule:
    """The part of ``gm`` computing ``outputs`` from ``inputs`` as a module of its own (``inputs`` as positional
    arguments; one output, or a tuple).  Parameters, buffers and constants are shared with ``gm``, not copied.
    ``ValueError`` when an output depends on a graph input that is not among ``inputs``."""
    stop = set(inputs)
    needed: set = set()
    pending = list(outputs)
    while pending:
        node = pending.pop()
        if node in needed or node in stop:
            continue
        if node.op == "placeholder":
            raise ValueError(f"{node.name} depends on the graph input {node.target}, not only on the region's input")
        needed.add(node)
        pending += node.all_input_nodes
    graph = fx.Graph()
    env = {node: graph.placeholder(f"x{i}") for i, node in enumerate(inputs)}
    for node in gm.graph.nodes:
        if node in needed:
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    return fx.GraphModule(gm, graph)


def signature(module: nn.Module) -> str:
    """A canonical description of what ``module`` computes, without its weights: module types, hyper-parameters and
    tensor shapes, graph nodes renumbered (so that the same block anywhere in any model has the same signature)."""
    if isinstance(module, fx.GraphModule):
        names: dict = {}
        lines = []
        for node in module.graph.nodes:
            names[node] = f"%{len(names)}"
            args = fx.node.map_arg((node.args, node.kwargs), lambda n: names[n])
            if node.op == "call_module":
                what = signature(module.get_submodule(node.target))
            elif node.op == "get_attr":
                what = _tensor_signature(attr_path(module, node.target))
            else:
                what = getattr(node.target, "__name__", str(node.target))
            lines.append(f"{node.op}:{what}{args}")
        return "graph(" + "; ".join(lines) + ")"
    tensors = ",".join(
        f"{n}={_tensor_signature(t)}"
        for n, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    )
    children = ",".join(signature(c) for c in module.children())
    return f"{type(module).__name__}({module.extra_repr()})[{tensors}]{{{children}}}"


def _tensor_signature(t) -> str:
    return "x".join(map(str, t.shape)) if isinstance(t, torch.Tensor) else repr(t)


# ---------------------------------------------------------------------------------------------- timing


def interleaved_seconds(
    before: nn.Module,
    after: nn.Module,
    inputs: tuple,
    warmup: int = 3,
    rounds: int = 15,
    sample_s: float = 1e-3,
    max_rounds: int = 60,
    batch: int = 5,
) -> tuple[float, float]:
    """Seconds per run of each form, timed alternately (A B, B A, ...) after ``warmup`` rounds, on the caller's
    thread count (synchronising CUDA after each run): ``before`` the median of its rounds, ``after`` that times the
    median of the rounds' after/before ratios (each round's two samples are neighbours in time, so a burst of other
    work on the machine that slows both cancels out).

    A sample is the fastest of as many back-to-back runs as fill ``sample_s`` (microsecond kernels are not timer
    noise, and other work on the machine only ever adds time).  Rounds come ``batch`` at a time: timing stops early
    when every round so far agrees by more than three times :data:`NOISE`, after ``rounds`` unless the two times
    are within that margin, and at ``max_rounds`` in any case.
    """
    from .stats import interleaved_times_ms

    first = interleaved_times_ms([before, after], inputs, warmup=warmup, rounds=1)
    passes = max(1, min(100, math.ceil(sample_s * 1e3 / max(1e-6, min(t[0] for t in first)))))
    times: list = [[], []]
    margin = 3 * NOISE
    while True:
        more = interleaved_times_ms(
            [before, after], inputs, warmup=0, rounds=batch, passes=passes, alternate=True, best=True
        )
        times = [t + m for t, m in zip(times, more, strict=True)]
        ratios = [x / y for x, y in zip(times[1], times[0], strict=True)]
        b = statistics.median(times[0]) / 1e3
        a = b * statistics.median(ratios)
        unanimous = min(ratios) > 1 + margin or max(ratios) < 1 - margin
        if unanimous or len(ratios) >= max_rounds or (len(ratios) >= rounds and abs(b - a) > margin * min(a, b)):
            return b, a


def device_name(device: torch.device) -> str:
    """The device as the cache keys it: the GPU's name, or the CPU's with the thread count timings ran on."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{_cpu_model()}:{torch.get_num_threads()}threads"


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the platform's description of it."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------- wording


def _kernels(n: int) -> str:
    return f"{n} kernel" if n == 1 else f"{n} kernels"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _macs(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"
