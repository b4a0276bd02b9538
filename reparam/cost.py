"""Whether a merge pays: the one place a rewrite asks before it trades several kernels for one.

A pass that could merge builds a :class:`Candidate` (the region as it is and as it would be, both runnable on the
region's real input shapes) and asks a cost model; the :class:`Decision` it gets back says yes or no, why, and, for a
measured decision, both times.  ``MacCost`` (the default) merges when the merged form costs no more multiply-accumulates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
import torch.nn as nn

MAC_SLACK = 1e-9  # relative: float rounding in MAC sums never decides a merge


@dataclass(frozen=True)
class Candidate:
    """A merge a pass could do at ``where`` (a module path or node name, as the report names it).

    ``before`` / ``after`` build (lazily: only a measuring model calls them) modules that compute the region as it is
    and as merged, each taking ``input_shapes`` tensors and returning the region's outputs.  MACs per sample.
    """

    where: str
    kind: str  # the rewrite it would record: merge_parallel, merge_siblings, compose, ...
    before_macs: float
    after_macs: float
    before_kernels: int
    after_kernels: int
    input_shapes: tuple[torch.Size, ...] = ()
    before: Optional[Callable[[], nn.Module]] = None
    after: Optional[Callable[[], nn.Module]] = None


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
        if candidate.after_macs <= candidate.before_macs * (1 + MAC_SLACK) + MAC_SLACK:
            return Decision(True, f"{_macs(candidate.after_macs)} MACs, not more than {_macs(candidate.before_macs)}")
        return Decision(False, f"merging would cost more MACs than it saves ({_macs(candidate.before_macs)} -> "
                               f"{_macs(candidate.after_macs)} per sample)")


def _macs(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"
