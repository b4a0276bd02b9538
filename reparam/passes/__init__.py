"""Graph rewrite passes: each one rule, run by :mod:`reparam.pipeline` in a fixed order.

Every pass takes the traced ``GraphModule`` (rewritten in place) and the :class:`~reparam.report.Report` (where each
rewrite and each refusal, with its reason, is recorded) and returns a :class:`PassResult`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PassResult:
    """What one pass did to a graph.

    ``changed``: rewrites applied (0: the graph is as it was).  ``created``: qualified names of the submodules it
    registered (the pipeline gives their tensors a dtype; the pass never writes the pipeline's bookkeeping).
    ``replaces``: for a created submodule, the original modules it computes in their place (their qualified
    names, in the order the pipeline's dtype rule reads them); absent when it stands for no particular one.
    ``shapes_stale``: tensor shapes in the graph changed, so recorded shapes must be propagated again.
    ``buffer_dtypes``: qualified names of the tensors it registered directly (not in a submodule it created) -> the
    dtype each is cast back to.
    """

    changed: int = 0
    created: tuple[str, ...] = ()
    shapes_stale: bool = False
    replaces: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    buffer_dtypes: Mapping[str, torch.dtype] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.changed > 0

    def __add__(self, later: PassResult) -> PassResult:
        """Two runs, this one first."""
        return PassResult(
            self.changed + later.changed,
            self.created + later.created,
            self.shapes_stale or later.shapes_stale,
            {**self.replaces, **later.replaces},
            {**self.buffer_dtypes, **later.buffer_dtypes},
        )
