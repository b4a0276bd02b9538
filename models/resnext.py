"""ResNeXt in its explicit split-transform-merge form (the paper's Fig. 3a).

Each block sums ``cardinality`` independent paths of ``1x1 -> 3x3 -> 1x1`` (BN after each conv, ReLU
between) plus the shortcut.  This is the readable training form; :func:`reparam.fuse` turns every block
into the torchvision-style grouped form (1x1 -> grouped 3x3 -> 1x1), exactly — and with
``remove_residuals=True`` into a plain chain of three convolutions.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import ConvBN
from .registry import register


class ResNeXtPath(nn.Module):
    """One path: ``1x1 (in -> width) -> 3x3 (width, stride) -> 1x1 (width -> out)``."""

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.reduce = ConvBN(in_channels, width, 1, activation=nn.ReLU())
        self.transform = ConvBN(width, width, 3, stride, activation=nn.ReLU())
        self.expand = ConvBN(width, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.transform(self.reduce(x)))


class MultiPathBottleneck(nn.Module):
    """``relu(sum_i path_i(x) + shortcut(x))`` with ``cardinality`` paths of ``width`` channels."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, cardinality: int = 8, width: int = 4
    ) -> None:
        super().__init__()
        self.paths = nn.ModuleList(ResNeXtPath(in_channels, width, out_channels, stride) for _ in range(cardinality))
        self.shortcut = (
            ConvBN(in_channels, out_channels, 1, stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.paths[0](x)
        for path in self.paths[1:]:
            out = out + path(x)
        return self.act(out + self.shortcut(x))


class MultiPathResNeXt(nn.Module):
    """A small ResNeXt: stem, three stages of multi-path bottlenecks, global pool, linear head."""

    def __init__(
        self, num_classes: int = 1000, widths=(64, 128, 256), depths=(1, 1, 1), cardinality: int = 8, width: int = 4
    ) -> None:
        super().__init__()
        self.stem = ConvBN(3, 32, 3, 2, activation=nn.ReLU())
        blocks, channels = [], 32
        for i, (out, depth) in enumerate(zip(widths, depths, strict=True)):  # one width and one depth per stage
            for j in range(depth):
                stride = 2 if j == 0 and i > 0 else 1
                blocks.append(MultiPathBottleneck(channels, out, stride, cardinality, width * 2**i))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


# the first block's shortcut 1x1 and its paths' merged 1x1 read the block input at stride 1: one conv (merge_siblings)
@register("resnext_multipath_tiny", deploy_convs=1 + 3 * 3 + 3 - 1, deploy_adds=3, input_size=(3, 64, 64))
def resnext_multipath_tiny(num_classes: int = 1000, **kwargs) -> MultiPathResNeXt:
    """Small ResNeXt (8 paths) in explicit multi-path form; fuses to grouped convs."""
    return MultiPathResNeXt(num_classes, **kwargs)
