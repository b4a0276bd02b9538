"""Graph rewrite passes: each one rule, run by :mod:`reparam.pipeline` in a fixed order.

Every pass takes the traced ``GraphModule`` (rewritten in place) and the :class:`~reparam.report.Report` (where each
rewrite and each refusal, with its reason, is recorded) and returns a :class:`PassResult`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PassResult:
    """What one pass did to a graph.

    ``changed``: rewrites applied (0: the graph is as it was).  ``created``: qualified names of the submodules it
    registered (the pipeline gives their tensors a dtype; the pass never writes the pipeline's bookkeeping).
    ``shapes_stale``: tensor shapes in the graph changed, so recorded shapes must be propagated again.
    """

    changed: int = 0
    created: tuple[str, ...] = ()
    shapes_stale: bool = False

    def __bool__(self) -> bool:
        return self.changed > 0
