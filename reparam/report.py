"""What the compiler did: every rewrite, every merge refused and why, and verification numbers."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Rewrite:
    where: str  # the block (module path prefix) or node
    before: str  # what the region held
    after: str  # what replaced it
    events: tuple  # rewrite kinds counted in it: fold_bn, merge_parallel, ...


@dataclass(frozen=True)
class Refusal:
    where: str
    reason: str


@dataclass
class Report:
    """Returned by :func:`reparam.explain`; attached to fused models as ``.reparam_report``."""

    rewrites: list = field(default_factory=list)
    refusals: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # e.g. untraceable parts, skipped verification
    max_rel_error: Optional[float] = None
    equalization: Optional[object] = None  # reparam.equalization.Equalization, when equalize=True

    def counts(self) -> Counter:
        """How many of each rewrite kind: fold_bn, merge_parallel, merge_concat, compose, skip, ..."""
        total = Counter()
        for r in self.rewrites:
            total.update(r.events)
        return total

    def refuse(self, where: str, reason: str) -> None:
        item = Refusal(where, reason)
        if item not in self.refusals:
            self.refusals.append(item)

    def __str__(self) -> str:
        lines = [f"reparam: {len(self.rewrites)} regions rewritten"]
        counts = self.counts()
        if counts:
            lines.append("  " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
        for r in self.rewrites:
            lines.append(f"  {r.where}: {r.before} -> {r.after}")
        if self.refusals:
            lines.append(f"refused ({len(self.refusals)}):")
            lines += [f"  {r.where}: {r.reason}" for r in self.refusals]
        lines += [f"note: {n}" for n in self.notes]
        if self.max_rel_error is not None:
            lines.append(f"verified: max relative error {self.max_rel_error:.2e} (float64)")
        return "\n".join(lines)
