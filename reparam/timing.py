"""The convert report's speed figure: how much faster the fused model runs than the original, with its spread.

Method (:func:`compare`): both models run on the same input, on one thread on the CPU (``torch.set_num_threads(1)``
for the duration, restored after), after warm-up rounds; then ``rounds`` timed rounds, each running the original
and the fused model ``passes`` times in a row, in alternating order (A B, B A, ...) so that a drift in the
machine's speed favours neither.  A round keeps each model's fastest pass (load from other processes only adds
time) and gives one ratio, original / fused; the figure is the median ratio, and the spread the lowest and highest
round's.  ``passes`` is chosen from one pass of each after the warm-up, so that all rounds fit in about
``budget_s`` seconds.  A spread wider than :data:`TRUST_SPREAD` (highest / lowest ratio)
is flagged: the machine was too busy for the figure to mean much.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["SpeedFigure", "compare", "TRUST_SPREAD", "ROUNDS", "WARMUP", "BUDGET_S", "THREADS"]

ROUNDS = 9  # timed rounds: an odd number, so the median is one of them
WARMUP = 2  # untimed rounds first
BUDGET_S = 4.0  # about this many seconds of timed passes in all
THREADS = 1  # CPU threads while timing: one, so that other processes and thread pools disturb it least
TRUST_SPREAD = 1.25  # highest / lowest round ratio beyond which the figure is flagged


@dataclass
class SpeedFigure:
    """Original vs fused latency, from interleaved rounds (times in milliseconds)."""

    ratio: float  # median over the rounds of original / fused
    low: float  # lowest round ratio
    high: float  # highest round ratio
    runs: int  # timed rounds
    passes: int  # passes of each model per round
    threads: int | None  # CPU threads used (None on CUDA)
    device: str
    before_ms: float  # median over the rounds of the original's fastest pass
    after_ms: float  # ... of the fused model's
    load: float | None  # 1-minute load average when timing ended (None where unknown)

    @property
    def trustworthy(self) -> bool:
        """The rounds agree closely enough (highest / lowest ratio at most :data:`TRUST_SPREAD`)."""
        return self.low > 0 and self.high / self.low <= TRUST_SPREAD

    def text(self) -> str:
        """``5.2× faster (4.9–5.6×, 9 runs)`` (or ``slower``)."""
        if self.ratio >= 1:
            return f"{self.ratio:.2f}× faster ({self.low:.2f}–{self.high:.2f}×, {self.runs} runs)"
        return f"{1 / self.ratio:.2f}× slower ({1 / self.high:.2f}–{1 / self.low:.2f}×, {self.runs} runs)"

    def warning(self) -> str | None:
        """Why the figure should not be trusted, or None."""
        if self.trustworthy:
            return None
        load = f" (load average {self.load:.1f})" if self.load is not None else ""
        return (
            f"the speed figure's runs disagree ({self.low:.2f}–{self.high:.2f}×): the machine is busy{load}; "
            "rerun on an idle machine before trusting it"
        )

    def to_dict(self) -> dict:
        """JSON-ready fields, with ``trustworthy``."""
        return {**asdict(self), "trustworthy": self.trustworthy}


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def compare(
    original: Any,
    fused: Any,
    example_inputs: Any,
    *,
    rounds: int = ROUNDS,
    warmup: int = WARMUP,
    budget_s: float = BUDGET_S,
    threads: int = THREADS,
) -> SpeedFigure:
    """Time ``original`` against ``fused`` (see the module docstring) and return the :class:`SpeedFigure`."""
    import torch

    from reparam import stats

    args = stats.as_args(example_inputs)
    on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    previous = torch.get_num_threads()
    if not on_cuda:
        torch.set_num_threads(threads)
    try:
        with torch.no_grad():  # warm-up, then one pass of each to size the rounds
            for _ in range(warmup):
                original(*args)
                fused(*args)
            stats._synchronize(args)
            start = time.perf_counter()
            original(*args)
            fused(*args)
            stats._synchronize(args)
            one = max(time.perf_counter() - start, 1e-6)
        passes = max(1, int(budget_s / max(rounds, 1) / one))
        before, after = stats.interleaved_times_ms(
            [original, fused], args, warmup=0, rounds=rounds, passes=passes, alternate=True, best=True
        )
    finally:
        if not on_cuda:
            torch.set_num_threads(previous)
    ratios = [b / a for b, a in zip(before, after, strict=True) if a > 0]  # one time of each per round
    device = str(next((a.device for a in args if isinstance(a, torch.Tensor)), "cpu"))
    return SpeedFigure(
        ratio=statistics.median(ratios),
        low=min(ratios),
        high=max(ratios),
        runs=len(ratios),
        passes=passes,
        threads=None if on_cuda else threads,
        device=device,
        before_ms=statistics.median(before),
        after_ms=statistics.median(after),
        load=_load_average(),
    )
