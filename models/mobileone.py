"""MobileOne (Vasu et al., CVPR 2023), training-time form.

Layout and module names follow the official ``apple/ml-mobileone`` training models, so the official
``mobileone_s*_unfused.pth.tar`` state dicts load with ``strict=True``:

* ``stage0`` is one :class:`MobileOneBlock` (3 -> ``min(64, 64·w1)``, 3×3, stride 2, one conv branch);
* ``stage1..stage4`` have ``[2, 8, 10, 1]`` units; each unit is a depthwise 3×3 block (even index, with
  ``rbr_scale``) followed by a pointwise 1×1 block (odd index); the first unit of a stage has stride 2;
  ``rbr_skip`` exists when stride is 1 and channels match; widths ``64·w1, 128·w2, 256·w3, 512·w4``;
* S0 trains 4 conv branches per block (``rbr_conv.0..3``), S1–S4 one; S4 adds squeeze-excitation
  (``se.reduce``, ``se.expand``) to the last half of stage3's units and all of stage4's;
* head: ``gap`` then ``linear``.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

from .blocks import MobileOneBlock, StagedClassifier, official_widths, stage_rows
from .registry import register_variant

__all__ = ["MobileOne", "official_mobileone"]

DEPTHS = (2, 8, 10, 1)


class MobileOne(StagedClassifier):
    """Stem block, then stages of (depthwise 3×3 block, pointwise 1×1 block) units, then gap + linear.

    Args:
        num_blocks: units per stage (stages are named ``stage1``, ``stage2``, ...).
        widths: output channels per stage.
        num_classes: classifier outputs.
        num_conv_branches: k×k conv-BN branches in every stage block (the stem always has one).
        se_units: per stage, how many of its *last* units use squeeze-excitation.
        stem_width: output channels of ``stage0`` (default ``min(64, widths[0])``, the official rule).
        in_channels: input image channels.
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 1000,
        *,
        num_conv_branches: int = 1,
        se_units: Optional[Sequence[int]] = None,
        stem_width: Optional[int] = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        rows = stage_rows(num_blocks, widths, [0] * len(widths) if se_units is None else se_units)
        stem_width = min(64, widths[0]) if stem_width is None else stem_width

        def stage(index: int, channels: int, row: tuple) -> tuple:
            depth, width, num_se = row
            if num_se > depth:
                raise ValueError(f"stage{index}: {num_se} SE units requested but it has only {depth}")
            blocks = []
            for unit in range(depth):
                options = dict(num_conv_branches=num_conv_branches, use_se=unit >= depth - num_se)
                stride = 2 if unit == 0 else 1
                blocks.append(MobileOneBlock(channels, channels, 3, stride, groups=channels, **options))
                blocks.append(MobileOneBlock(channels, width, 1, 1, **options))
                channels = width
            return blocks, channels

        self._add_stages(MobileOneBlock(in_channels, stem_width, 3, 2), stem_width, rows, stage, num_classes)


def official_mobileone(
    multipliers: Sequence[float],
    num_classes: int = 1000,
    *,
    num_conv_branches: int = 1,
    use_se: bool = False,
    **kwargs,
) -> MobileOne:
    """An official MobileOne configuration: depths ``[2, 8, 10, 1]``, widths ``64·w1, 128·w2, 256·w3, 512·w4``."""
    widths = official_widths(multipliers)
    se_units = [0, 0, DEPTHS[2] // 2, DEPTHS[3]] if use_se else None
    return MobileOne(DEPTHS, widths, num_classes, num_conv_branches=num_conv_branches, se_units=se_units, **kwargs)


# registry name -> (width multipliers, conv branches, squeeze-excitation)
OFFICIAL_CONFIGS = {
    "mobileone_s0": ((0.75, 1.0, 1.0, 2.0), 4, False),
    "mobileone_s1": ((1.5, 1.5, 2.0, 2.5), 1, False),
    "mobileone_s2": ((1.5, 2.0, 2.5, 4.0), 1, False),
    "mobileone_s3": ((2.0, 2.5, 3.0, 4.0), 1, False),
    "mobileone_s4": ((3.0, 3.5, 3.5, 4.0), 1, True),
}


PLAIN_CONVS = 1 + 2 * sum(DEPTHS)  # stem + (depthwise, pointwise) per unit
SE_CONVS = 2 * 2 * (DEPTHS[2] // 2 + DEPTHS[3])  # with squeeze-excitation: 2 blocks per unit, 2 convs per SE

for _name, (_multipliers, _branches, _use_se) in OFFICIAL_CONFIGS.items():
    _variant = _name.split("_")[1]
    register_variant(
        _name,
        f"MobileOne-{_variant.upper()}, training-time form (``mobileone_{_variant}_unfused.pth.tar`` keys).",
        partial(official_mobileone, _multipliers),
        num_conv_branches=_branches,
        use_se=_use_se,
        deploy_convs=PLAIN_CONVS + (SE_CONVS if _use_se else 0),
    )
