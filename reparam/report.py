"""What the compiler did: every rewrite, every merge refused and why, and verification numbers."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace


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


@dataclass(frozen=True)
class CostDecision:
    """A merge the cost model had to weigh (more MACs or more kernels after it, or timed): where, what it would
    do, both forms' kernels and MACs, both measured times (seconds per run) when measured, and what was chosen."""

    where: str
    kind: str  # the rewrite it would be: merge_concat, merge_parallel, compose, merge_siblings, ...
    merged: bool
    reason: str
    before_kernels: int
    after_kernels: int
    before_macs: float
    after_macs: float
    before_s: float | None = None
    after_s: float | None = None


@dataclass
class Report:
    """Returned by :func:`reparam.explain`; attached to fused models as ``.reparam_report``."""

    rewrites: list = field(default_factory=list)
    refusals: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # e.g. untraceable parts, skipped verification
    max_rel_error: float | None = None
    verified_on: str | None = None  # what the check ran on: "the inputs", or centre crops of them
    equalization: object | None = None  # reparam.equalization.Equalization, when equalize=True
    decisions: list = field(default_factory=list)  # CostDecision of every merge the cost model weighed

    def counts(self) -> Counter:
        """How many of each rewrite kind: fold_bn, merge_parallel, merge_concat, compose, skip, ..."""
        total = Counter()
        for r in self.rewrites:
            total.update(r.events)
        return total

    def refuse(self, where: str, reason: str) -> None:
        """Record a refused merge, once per site: a later round refusing the same merge at the module it emitted
        there (``block.reparam``, ``block.reparam_2``) does not add it again."""
        item = Refusal(where, reason)
        if item in self.refusals:
            return
        block = _emitted_block(where)
        if block is not None and any(r.reason == reason and _under(r.where, block) for r in self.refusals):
            return
        self.refusals.append(item)

    def tally(self) -> tuple[int, int, int]:
        """How many rewrites, refusals and cost decisions are recorded (a mark for :meth:`place_under`)."""
        return len(self.rewrites), len(self.refusals), len(self.decisions)

    def place_under(self, since: tuple[int, int, int], path: str, in_part: Callable[[str], bool]) -> None:
        """before -> after: the rewrites, refusals and decisions recorded after the mark ``since`` name places in a
        part of the model (a traced submodule at ``path``: ``body.1``, or a node name of its graph: ``_1``) -> they
        name places in the model (``path.body.1``; ``path`` for a node name).  ``in_part(where)``: ``where`` is a
        module path inside the part."""
        for items, start in zip((self.rewrites, self.refusals, self.decisions), since, strict=True):
            items[start:] = [
                replace(item, where=f"{path}.{item.where}" if in_part(item.where) else path) for item in items[start:]
            ]

    def decide(self, **fields) -> None:
        """Record a :class:`CostDecision` (``fields`` are its fields), once: a region weighed again while the
        pass re-plans is not listed twice."""
        item = CostDecision(**fields)
        if item not in self.decisions:
            self.decisions.append(item)

    def to_dict(self) -> dict:
        """Everything in the report as JSON-ready data (schema: ``docs/report-schema.json``, ``$defs/report``)."""
        return {
            "rewrites": [
                {"where": r.where, "before": r.before, "after": r.after, "events": list(r.events)}
                if isinstance(r, Rewrite)
                else {"where": str(r), "before": "", "after": "", "events": []}
                for r in self.rewrites
            ],
            "refusals": [{"where": r.where, "reason": r.reason} for r in self.refusals],
            "decisions": [asdict(d) for d in self.decisions],
            "notes": [str(n) for n in self.notes],
            "counts": dict(sorted(self.counts().items())),
            "max_rel_error": self.max_rel_error,
            "verified_on": self.verified_on,
        }

    def to_json(self, **kwargs) -> str:
        """:meth:`to_dict` as a JSON string (keyword arguments go to :func:`json.dumps`, e.g. ``indent=2``)."""
        return json.dumps(self.to_dict(), **kwargs)

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
        if self.decisions:
            lines.append(f"cost decisions ({len(self.decisions)}):")
            lines += [f"  {d.where}: {'merged' if d.merged else 'kept'} ({d.reason})" for d in self.decisions]
        lines += [f"note: {n}" for n in self.notes]
        if self.max_rel_error is not None:
            on = f", on {self.verified_on}" if self.verified_on else ""
            lines.append(f"verified: max relative error {self.max_rel_error:.2e} (float64{on})")
        return "\n".join(lines)


_EMITTED = re.compile(r"^(.*)\.reparam(?:_\d+)?$|^reparam(?:_\d+)?$")


def _emitted_block(where: str) -> str | None:
    """The block a fused module was emitted into (``a.b`` for ``a.b.reparam_2``; ``""`` at the root), else None."""
    match = _EMITTED.match(where)
    return None if match is None else (match.group(1) or "")


def _under(where: str, block: str) -> bool:
    """``where`` lies in ``block`` (at the root: is a top-level name)."""
    return "." not in where if not block else where == block or where.startswith(block + ".")
