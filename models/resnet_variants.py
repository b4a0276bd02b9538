"""ResNet-18 assemblies whose 3×3 conv-BNs are re-parameterizable blocks (ACNet, DBB).

The layout follows the ResNet of the official DiverseBranchBlock repository (which also hosts its
ACNet baselines): ``stage0`` = 7×7 conv-BN-ReLU (``stage0.conv1``, kept a plain :class:`ConvBN` as
upstream does for kernels ≥ 7) + 3×3 max pool; ``stage1..stage4`` of two basic blocks whose
``conv1`` (with ReLU) and ``conv2`` are the chosen block type and whose ``shortcut`` is a 1×1 conv-BN
(or identity); head ``gap`` + ``linear``.

Fully fused, a ResNet-18 runs 20 convolutions (stem, 16 block convs, 3 shortcuts) and keeps its 8
residual additions: the two operands read different tensors, so no branch merge applies.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import ACBlock, ConvBN, DiverseBranchBlock
from .registry import register

__all__ = ["BasicBlock", "ResNet18"]

ConvBlockFactory = Callable[..., nn.Module]


class BasicBlock(nn.Module):
    """``relu(conv2(conv1(x)) + shortcut(x))`` where conv1/conv2 are ``conv_block`` instances."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, conv_block: ConvBlockFactory) -> None:
        super().__init__()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ConvBN(in_channels, out_channels, 1, stride, padding=0)
        else:
            self.shortcut = nn.Identity()
        self.conv1 = conv_block(in_channels, out_channels, 3, stride, activation=nn.ReLU())
        self.conv2 = conv_block(out_channels, out_channels, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 whose 3×3 conv-BNs are built by ``conv_block(in, out, kernel_size, stride, activation=...)``."""

    def __init__(self, conv_block: ConvBlockFactory = ConvBN, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.stage0 = nn.Sequential()
        self.stage0.add_module("conv1", ConvBN(in_channels, 64, 7, 2, activation=nn.ReLU()))
        self.stage0.add_module("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        channels = 64
        for index, (width, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
            blocks = [BasicBlock(channels, width, stride, conv_block), BasicBlock(width, width, 1, conv_block)]
            self.add_module(f"stage{index}", nn.Sequential(*blocks))
            channels = width
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage0(x)
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.linear(torch.flatten(self.gap(x), 1))


RESNET18_DEPLOY_CONVS = 1 + 16 + 3
RESNET18_RESIDUAL_ADDS = 8


@register("acnet_resnet18", deploy_convs=RESNET18_DEPLOY_CONVS, deploy_adds=RESNET18_RESIDUAL_ADDS)
def acnet_resnet18(num_classes: int = 1000, **kwargs) -> ResNet18:
    """ResNet-18 with ACNet asymmetric blocks (3×3 + 3×1 + 1×3, each with BN) for its 3×3 convs."""
    return ResNet18(ACBlock, num_classes, **kwargs)


@register("dbb_resnet18", deploy_convs=RESNET18_DEPLOY_CONVS, deploy_adds=RESNET18_RESIDUAL_ADDS)
def dbb_resnet18(num_classes: int = 1000, **kwargs) -> ResNet18:
    """ResNet-18 with Diverse Branch Blocks for its 3×3 convs."""
    return ResNet18(DiverseBranchBlock, num_classes, **kwargs)
