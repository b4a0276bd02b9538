"""Numerical equivalence: fused vs original, both in float64, relative L2 error per output.

:func:`relative_error` is the one measure of how far apart two tensors are, used everywhere (the pipeline's
check, the proofs, the exported files' checks through :func:`reparam.stats.relative_error`); :func:`random_like`
the one way to draw fresh inputs shaped like given ones.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils._pytree import keystr, tree_flatten_with_path

from .errors import EquivalenceError, one_line

TOLERANCE = 1e-8  # float64 folding error is ~1e-15 per op; deep random nets amplify it


def to_dtype(inputs: Any, dtype: torch.dtype) -> Any:
    """Copies of the floating tensors in ``inputs`` (any pytree) in ``dtype``; the rest untouched."""
    return torch.utils._pytree.tree_map(
        lambda t: t.to(dtype, copy=True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, inputs
    )


def to_float64(inputs: Any) -> Any:
    """Copies of the floating tensors in ``inputs`` (any pytree) in float64; the rest untouched."""
    return to_dtype(inputs, torch.float64)


def fresh(inputs: Any) -> Any:
    """Clones of the tensors in ``inputs``, so a model that updates its input in place cannot change
    what the other model sees."""
    return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs)


def is_degenerate(inputs: Any) -> bool:
    """Some floating input is constant (``torch.zeros(1, 3, 224, 224)``): it cannot expose wrong weights."""
    leaves = torch.utils._pytree.tree_leaves(inputs)
    return any(
        isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 0 and bool((t == t.reshape(-1)[0]).all())
        for t in leaves
    )


def random_like(inputs: Sequence[Any], seed: int = 1) -> tuple:
    """``inputs`` (a sequence of arguments, each any pytree) with every floating tensor replaced by a fresh
    standard-normal one of its shape, dtype and device, drawn from a generator seeded with ``seed``; the rest kept."""
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.utils._pytree.tree_map(
            lambda t: (
                torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)
                if isinstance(t, torch.Tensor) and t.is_floating_point()
                else t
            ),
            x,
        )
        for x in inputs
    )


CROP_MIN_SIDE = 128  # the default verification crop keeps at least this many pixels a side (a stride-32 net sees 4x4)
CROP_FLOOR = 64  # no crop is smaller (a stride-32 net still sees 2x2)
CROP_PERIOD = 32  # a crop keeps its side's remainder modulo this: every stride up to 32 meets the same borders and
# parities as on the whole input (odd sides, "same" padding computed from the size)


def centre_crops(inputs: Sequence[Any], fraction: float = 0.5, least: int = CROP_MIN_SIDE) -> tuple | None:
    """before -> after: ``inputs`` (a sequence of arguments, each any pytree) -> the same with every floating tensor
    of rank 4 or more whose last two sides can shrink cut to its centre ``H' x W'``; None when no tensor shrinks.

    ``H'`` is the smallest side of at least ``fraction * H`` and ``least`` (and :data:`CROP_FLOOR`) pixels that
    leaves ``H`` modulo :data:`CROP_PERIOD`, when that is at most ``3/4 H`` (else that side stays).  By default a
    quarter to a third of the pixels.
    """
    shrunk = False

    def crop(t: Any) -> Any:
        nonlocal shrunk
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 4):
            return t
        sides = [_crop_side(n, fraction, least) for n in t.shape[-2:]]
        if sides == list(t.shape[-2:]):
            return t
        shrunk = True
        (h, w), (top, left) = sides, ((n - side) // 2 for n, side in zip(t.shape[-2:], sides, strict=True))
        return t[..., top : top + h, left : left + w].clone()

    cropped = tuple(torch.utils._pytree.tree_map(crop, x) for x in inputs)
    return cropped if shrunk else None


def _crop_side(n: int, fraction: float, least: int) -> int:
    low = max(CROP_FLOOR, least, math.ceil(fraction * n))
    side = low + (n - low) % CROP_PERIOD  # the first side >= low with side = n (mod CROP_PERIOD)
    return side if 4 * side <= 3 * n else n


def relative_error(y: torch.Tensor, ref: torch.Tensor, *, absolute_at_zero: bool = False) -> float:
    """``‖y − ref‖₂ / ‖ref‖₂`` of two tensors of one shape, computed in float64.

    ``0.0`` when they are equal, an all-zero reference included.  When they differ and the reference is all zero
    there is no scale to be relatively close to: ``inf`` (what a report of an exported file says), or, with
    ``absolute_at_zero`` (what the equivalence checks use, so that ``1e-18`` against an exactly-zero output is not a
    false alarm), ``‖y − ref‖₂`` itself.  A NaN in the difference gives NaN (an inf in ``y`` alone gives inf): neither
    is ``<=`` any tolerance, so a check ``err <= tolerance`` fails on a non-finite output.
    """
    diff = (y.double() - ref.double()).norm().item()
    if diff == 0.0:
        return 0.0
    scale = ref.double().norm().item()
    if scale > 0:
        return diff / scale
    return diff if absolute_at_zero else math.inf


NOISE_FACTOR = 100  # how far past the reference's own float64 noise a fused model may be
NOISE_EPSILON = 2.0**-50  # relative perturbation of every weight (4 float64 ulps) that measures that noise


def perturbed(module: torch.nn.Module, seed: int = 2) -> torch.nn.Module:
    """A private copy of ``module`` whose floating weights and buffers are each scaled by
    ``1 + NOISE_EPSILON * u`` (u uniform in [-1, 1]): a model as good as the original, rounded differently.

    The spread between it and the original is the original's own float64 noise on those inputs; an
    ill-conditioned random deep net amplifies rounding by 1e8 and more, a fused model rounds differently
    too, so that spread (not a constant) says what "equal" means for this model.
    """
    twin = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(twin.parameters()) + list(twin.buffers()):
            if t.is_floating_point():
                u = torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype) * 2 - 1
                t.mul_(1 + NOISE_EPSILON * u)
    return twin


def compare_outputs(
    got: Any,
    want: Any,
    where: str = "output",
    tolerance: float = TOLERANCE,
    noise: Optional[Callable[[], Any]] = None,
    notes: Optional[list] = None,
) -> float:
    """Worst relative error of ``got`` against ``want`` (pytrees of the same structure), or raise
    :class:`EquivalenceError` naming the leaf.  ``noise()``: the reference's output rounded differently
    (:func:`perturbed`), computed only when some leaf is over ``tolerance``."""
    got_leaves, got_spec = tree_flatten_with_path(got)
    want_leaves, want_spec = tree_flatten_with_path(want)
    if got_spec != want_spec:
        raise EquivalenceError(
            f"{where}: fused model returns a different output structure "
            f"({_spec_summary(got_spec)} vs {_spec_summary(want_spec)})"
        )
    errors = []
    for (path, a), (_, b) in zip(got_leaves, want_leaves, strict=True):  # one structure: checked above
        leaf = where + keystr(path)
        if isinstance(b, torch.Tensor):
            if not isinstance(a, torch.Tensor) or a.shape != b.shape:
                raise EquivalenceError(f"{leaf}: fused shape {getattr(a, 'shape', None)} != original {tuple(b.shape)}")
            if not b.is_floating_point():
                if not torch.equal(a, b):
                    raise EquivalenceError(f"{leaf}: integer outputs differ")
                errors.append((leaf, 0.0))
                continue
            errors.append((leaf, relative_error(a, b, absolute_at_zero=True)))
        elif a != b:
            raise EquivalenceError(f"{leaf}: non-tensor outputs differ ({a!r} vs {b!r})")
    over = [(i, leaf, err) for i, (leaf, err) in enumerate(errors) if not err <= tolerance]  # NaN is over
    if over:
        floors = _noise_floors(noise, want_leaves, notes) if noise is not None else {}
        for i, leaf, err in over:
            floor = floors.get(i, 0.0)
            if not err <= max(tolerance, NOISE_FACTOR * floor):
                own = f"; the original's own float64 noise there is {floor:.1e}" if floor else ""
                raise EquivalenceError(
                    f"{leaf}: fused model disagrees with the original, relative error {err:.3e} "
                    f"(tolerance {tolerance:.0e}{own}); this is a reparam bug, please report the model"
                )
            if notes is not None:
                notes.append(
                    f"{leaf}: fused {err:.1e} vs the model's own float64 noise {floor:.1e} "
                    f"(accepted: within {NOISE_FACTOR}x of it)"
                )
    return max((err for _, err in errors), default=0.0)


def worst_leaf(got: Any, want: Any, where: str = "output") -> tuple[str, float]:
    """(path, relative error) of the floating leaf where ``got`` is furthest from ``want`` (same structure)."""
    worst = (where, 0.0)
    for (path, a), (_, b) in zip(tree_flatten_with_path(got)[0], tree_flatten_with_path(want)[0], strict=False):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and b.is_floating_point():
            err = relative_error(a, b)
            if not err <= worst[1]:
                worst = (where + keystr(path), err)
    return worst


def _noise_floors(noise: Callable[[], Any], want_leaves: list, notes: Optional[list] = None) -> dict:
    """leaf index -> relative error of the differently rounded reference; {} if it cannot run (said in ``notes``).

    An infinite one (the twin moved off an all-zero reference, or overflowed) measures no noise and is left out:
    it would accept any error.
    """
    try:
        twin_leaves, _ = tree_flatten_with_path(noise())
    except Exception as exc:  # noqa: BLE001  the twin runs the user's own model: whatever it raises, there is no
        if notes is not None:  # noise floor, and the check falls back to the plain tolerance (the reason is noted)
            notes.append(
                f"the model's own float64 noise could not be measured ({type(exc).__name__}: "
                f"{one_line(exc)}); the plain tolerance applied"
            )
        return {}
    floors = {}
    for i, ((_, a), (_, b)) in enumerate(zip(twin_leaves, want_leaves, strict=False)):
        if isinstance(b, torch.Tensor) and isinstance(a, torch.Tensor) and a.shape == b.shape and b.is_floating_point():
            floor = relative_error(a, b, absolute_at_zero=True)
            if not math.isinf(floor):
                floors[i] = floor
    return floors


def _spec_summary(spec) -> str:
    text = str(spec).replace("\n", " ")
    return " ".join(text.split())[:160]
