"""RepVGG (Ding et al., CVPR 2021), training-time form, plus the tiny ``repvgg_digits`` example net.

Layout and module names follow the official ``DingXiaoH/RepVGG`` training models, so the official
``RepVGG-*-train.pth`` state dicts load with ``strict=True``:

* ``stage0`` is one :class:`RepVGGBlock` (3 -> ``min(64, 64·a)``, stride 2, no identity branch);
* ``stage1..stage4`` are ``nn.Sequential`` of blocks, the first of each with stride 2 (so no identity);
  widths ``64·a, 128·b, 256·c, 512·d``; A-series depths ``[2, 4, 14, 1]``, B-series ``[4, 6, 16, 1]``,
  D2se ``[8, 14, 24, 1]`` with squeeze-excitation in every block (``se.down``, ``se.up``);
* ``g2`` / ``g4`` variants use 2 / 4 groups in layers 2, 4, ..., 26, counting from the first block of
  stage1 as layer 1;
* head: ``gap`` (global average pool) then ``linear``.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Dict, Optional, Sequence

from .blocks import RepVGGBlock, StagedClassifier, official_widths, stage_rows
from .registry import register, register_variant

__all__ = ["RepVGG", "official_repvgg"]

A_SERIES_DEPTHS = (2, 4, 14, 1)
B_SERIES_DEPTHS = (4, 6, 16, 1)
D_SERIES_DEPTHS = (8, 14, 24, 1)
GROUPWISE_LAYERS = tuple(range(2, 27, 2))


class RepVGG(StagedClassifier):
    """A plain stack of :class:`RepVGGBlock` stages with a global-pool + linear head.

    Args:
        num_blocks: blocks per stage (stages are named ``stage1``, ``stage2``, ...).
        widths: output channels per stage.
        num_classes: classifier outputs.
        stem_width: output channels of ``stage0`` (default ``min(64, widths[0])``, the official rule).
        in_channels: input image channels.
        stem_stride / stage_strides: stride of ``stage0`` and of the first block of each stage.
        groups_per_layer: ``{layer index: groups}``; layer 1 is the first block of ``stage1``.
        use_se: squeeze-excitation in every block (RepVGG-D2se), including ``stage0``.
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 1000,
        *,
        stem_width: Optional[int] = None,
        in_channels: int = 3,
        stem_stride: int = 2,
        stage_strides: Optional[Sequence[int]] = None,
        groups_per_layer: Optional[Dict[int, int]] = None,
        use_se: bool = False,
    ) -> None:
        super().__init__()
        rows = stage_rows(num_blocks, widths, [2] * len(widths) if stage_strides is None else stage_strides)
        groups_per_layer = dict(groups_per_layer or {})
        stem_width = min(64, widths[0]) if stem_width is None else stem_width
        layers = itertools.count(1)  # layer 1 is the first block of stage1

        def stage(index: int, channels: int, row: tuple) -> tuple:
            depth, width, stride = row
            blocks = []
            for block_stride in [stride] + [1] * (depth - 1):
                groups = groups_per_layer.get(next(layers), 1)
                blocks.append(RepVGGBlock(channels, width, 3, block_stride, groups, use_se=use_se))
                channels = width
            return blocks, channels

        stem = RepVGGBlock(in_channels, stem_width, 3, stem_stride, use_se=use_se)
        self._add_stages(stem, stem_width, rows, stage, num_classes)


def official_repvgg(
    depths: Sequence[int],
    multipliers: Sequence[float],
    num_classes: int = 1000,
    *,
    groups: int = 1,
    use_se: bool = False,
    **kwargs,
) -> RepVGG:
    """An official RepVGG configuration: widths ``64·a, 128·b, 256·c, 512·d``; ``groups`` on layers 2, 4, ..., 26."""
    widths = official_widths(multipliers)
    groups_per_layer = {layer: groups for layer in GROUPWISE_LAYERS} if groups > 1 else None
    return RepVGG(depths, widths, num_classes, groups_per_layer=groups_per_layer, use_se=use_se, **kwargs)


# registry name -> (official name, depths, width multipliers a..d, groups on layers 2..26, squeeze-excitation)
OFFICIAL_CONFIGS = {
    "repvgg_a0": ("RepVGG-A0", A_SERIES_DEPTHS, (0.75, 0.75, 0.75, 2.5), 1, False),
    "repvgg_a1": ("RepVGG-A1", A_SERIES_DEPTHS, (1, 1, 1, 2.5), 1, False),
    "repvgg_a2": ("RepVGG-A2", A_SERIES_DEPTHS, (1.5, 1.5, 1.5, 2.75), 1, False),
    "repvgg_b0": ("RepVGG-B0", B_SERIES_DEPTHS, (1, 1, 1, 2.5), 1, False),
    "repvgg_b1": ("RepVGG-B1", B_SERIES_DEPTHS, (2, 2, 2, 4), 1, False),
    "repvgg_b1g2": ("RepVGG-B1g2", B_SERIES_DEPTHS, (2, 2, 2, 4), 2, False),
    "repvgg_b1g4": ("RepVGG-B1g4", B_SERIES_DEPTHS, (2, 2, 2, 4), 4, False),
    "repvgg_b2": ("RepVGG-B2", B_SERIES_DEPTHS, (2.5, 2.5, 2.5, 5), 1, False),
    "repvgg_b2g2": ("RepVGG-B2g2", B_SERIES_DEPTHS, (2.5, 2.5, 2.5, 5), 2, False),
    "repvgg_b2g4": ("RepVGG-B2g4", B_SERIES_DEPTHS, (2.5, 2.5, 2.5, 5), 4, False),
    "repvgg_b3": ("RepVGG-B3", B_SERIES_DEPTHS, (3, 3, 3, 5), 1, False),
    "repvgg_b3g2": ("RepVGG-B3g2", B_SERIES_DEPTHS, (3, 3, 3, 5), 2, False),
    "repvgg_b3g4": ("RepVGG-B3g4", B_SERIES_DEPTHS, (3, 3, 3, 5), 4, False),
    "repvgg_d2se": ("RepVGG-D2se", D_SERIES_DEPTHS, (2.5, 2.5, 2.5, 5), 1, True),
}


for _name, (_official, _depths, _multipliers, _groups, _use_se) in OFFICIAL_CONFIGS.items():
    register_variant(
        _name,
        f"{_official}, training-time form (official layout, ``{_official}-train.pth`` keys).",
        partial(official_repvgg, _depths, _multipliers),
        groups=_groups,
        use_se=_use_se,
        # squeeze-excitation adds two 1x1 convs to every block
        deploy_convs=(3 if _use_se else 1) * (1 + sum(_depths)),
    )


DIGITS_DEPTHS = (2, 2)
DIGITS_WIDTHS = (32, 64)


@register("repvgg_digits", deploy_convs=1 + sum(DIGITS_DEPTHS), input_size=(1, 8, 8), num_classes=10)
def repvgg_digits(num_classes: int = 10, **kwargs) -> RepVGG:
    """Tiny RepVGG for scikit-learn's 8×8 digits: stem 16 ch (stride 1), stages 32 and 64 ch (stride 2)."""
    return RepVGG(
        DIGITS_DEPTHS,
        DIGITS_WIDTHS,
        num_classes,
        stem_width=16,
        in_channels=1,
        stem_stride=1,
        stage_strides=(2, 2),
        **kwargs,
    )
