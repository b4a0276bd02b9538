"""Numerical equivalence: fused vs original, both in float64, relative L2 error per output."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils._pytree import tree_flatten_with_path, keystr

from .errors import EquivalenceError

TOLERANCE = 1e-8  # float64 folding error is ~1e-15 per op; deep random nets amplify it


NOT_COMPUTED = object()  # compare(): the reference output is not known yet, run the reference


def to_float64(inputs: Any) -> Any:
    """Copies of the floating tensors in ``inputs`` (any pytree) in float64; the rest untouched."""
    return torch.utils._pytree.tree_map(
        lambda t: t.to(torch.float64, copy=True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
        inputs)


def fresh(inputs: Any) -> Any:
    """Clones of the tensors in ``inputs``, so a model that updates its input in place cannot change
    what the other model sees."""
    return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs)


def is_degenerate(inputs: Any) -> bool:
    """Some floating input is constant (``torch.zeros(1, 3, 224, 224)``): it cannot expose wrong weights."""
    leaves = torch.utils._pytree.tree_leaves(inputs)
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 0
               and bool((t == t.reshape(-1)[0]).all()) for t in leaves)


def random_like(inputs: Sequence[Any], seed: int = 1) -> tuple:
    """Fresh standard-normal tensors shaped like the floating tensors of ``inputs``."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.utils._pytree.tree_map(
        lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)
        if isinstance(t, torch.Tensor) and t.is_floating_point() else t, x) for x in inputs)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``||y - ref|| / ||ref||`` (absolute when ``ref`` is zero)."""
    diff = (y.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    return diff / scale if scale > 0 else diff


def compare(fused, reference, inputs: Sequence[Any], want: Any = NOT_COMPUTED, tolerance: float = TOLERANCE) -> float:
    """Run both on ``inputs`` (``want``: the reference's output when an eager run of it already
    produced it); return the worst relative error or raise :class:`EquivalenceError`."""
    with torch.no_grad():
        got = fused(*fresh(inputs))
        if want is NOT_COMPUTED:
            want = reference(*fresh(inputs))
    got_leaves, got_spec = tree_flatten_with_path(got)
    want_leaves, want_spec = tree_flatten_with_path(want)
    if got_spec != want_spec:
        raise EquivalenceError("fused model returns a different output structure; please report this model")
    worst = 0.0
    for (path, a), (_, b) in zip(got_leaves, want_leaves):
        where = "output" + keystr(path)
        if isinstance(b, torch.Tensor):
            if not isinstance(a, torch.Tensor) or a.shape != b.shape:
                raise EquivalenceError(f"{where}: fused shape {getattr(a, 'shape', None)} != original {tuple(b.shape)}")
            if not b.is_floating_point():
                if not torch.equal(a, b):
                    raise EquivalenceError(f"{where}: integer outputs differ")
                continue
            err = relative_error(a, b)
            if not err <= tolerance:  # also catches NaN
                raise EquivalenceError(
                    f"{where}: fused model disagrees with the original, relative error {err:.3e} "
                    f"(tolerance {tolerance:.0e}); this is a reparam bug, please report the model"
                )
            worst = max(worst, err)
        elif a != b:
            raise EquivalenceError(f"{where}: non-tensor outputs differ ({a!r} vs {b!r})")
    return worst
