"""Training-time re-parameterizable blocks.

Every block here is the *training* form only: several linear branches (convolutions, batch norms,
average pools, identities) whose outputs are summed (concatenated: :class:`InceptionConcat`), optionally followed by
a non-linearity.
There is deliberately no ``switch_to_deploy`` / ``reparameterize`` method: turning a block into a
single convolution is the job of :func:`reparam.fuse`, which works on any module built from these
(or any other) parts.

Conventions shared by all blocks:

* the first positional arguments are ``(in_channels, out_channels, kernel_size, stride, groups)``;
* padding is always "same-centred": ``dilation * (kernel_size - 1) // 2`` per axis, so every branch
  of a block reads the same receptive-field centre, for stride 1 and stride 2 alike;
* module names follow the official implementations wherever such an implementation exists, so
  their checkpoints load with ``strict=True`` (see each class).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ConvBN",
    "SqueezeExcite",
    "RepVGGSqueezeExcite",
    "RepVGGBlock",
    "MobileOneBlock",
    "ACBlock",
    "DiverseBranchBlock",
    "QARepVGGBlock",
    "RepLKBlock",
    "InceptionConcat",
    "make_conv",
    "same_padding",
]

KernelSize = Union[int, Tuple[int, int]]


def _pair(value: KernelSize) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def same_padding(kernel_size: KernelSize, dilation: int = 1) -> Tuple[int, int]:
    """Padding that keeps the kernel centre on the output position, per axis (kernel sizes must be odd)."""
    kh, kw = _pair(kernel_size)
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"re-parameterizable blocks need odd kernel sizes, got {(kh, kw)}")
    return (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)


def _sum_branches(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Left-to-right sum ``((o0 + o1) + o2) + ...`` (the official implementations' summation order)."""
    total = outputs[0]
    for out in outputs[1:]:
        total = total + out
    return total


def make_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: KernelSize,
    stride: int = 1,
    groups: int = 1,
    *,
    padding: Optional[Union[int, Tuple[int, int]]] = None,
    dilation: int = 1,
) -> nn.Conv2d:
    """A bias-free ``nn.Conv2d`` (a BatchNorm always follows it); ``padding=None`` means same-centred."""
    if padding is None:
        padding = same_padding(kernel_size, dilation)
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=False,
    )


class ConvBN(nn.Sequential):
    """``conv`` (bias-free) -> ``bn`` [-> ``nonlinear``]: the unit branch of every block.

    State-dict keys are ``conv.weight`` and ``bn.{weight,bias,running_mean,running_var,num_batches_tracked}``,
    exactly the ``nn.Sequential`` built by the official RepVGG / MobileOne / DBB ``conv_bn`` helpers.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: KernelSize = 3,
        stride: int = 1,
        groups: int = 1,
        *,
        padding: Optional[Union[int, Tuple[int, int]]] = None,
        dilation: int = 1,
        activation: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.add_module(
            "conv",
            make_conv(in_channels, out_channels, kernel_size, stride, groups, padding=padding, dilation=dilation),
        )
        self.add_module("bn", nn.BatchNorm2d(out_channels))
        if activation is not None:
            self.add_module("nonlinear", activation)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(expand(relu(reduce(global_mean(x)))))``.

    Names follow official MobileOne (``reduce``/``expand``, both 1x1 convs with bias). The squeeze is a
    global spatial mean (the official code pools with a window equal to the whole feature map).
    """

    squeeze_name = "reduce"
    excite_name = "expand"

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        if hidden_channels < 1:
            raise ValueError(f"squeeze-excitation of {channels} channels leaves {hidden_channels} hidden channels")
        setattr(self, self.squeeze_name, nn.Conv2d(channels, hidden_channels, kernel_size=1, bias=True))
        setattr(self, self.excite_name, nn.Conv2d(hidden_channels, channels, kernel_size=1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = F.relu(getattr(self, self.squeeze_name)(scale))
        scale = torch.sigmoid(getattr(self, self.excite_name)(scale))
        return x * scale


class RepVGGSqueezeExcite(SqueezeExcite):
    """The same squeeze-and-excitation with official RepVGG's names ``down``/``up`` (used by RepVGG-D2se).

    Official RepVGG pools with ``avg_pool2d(kernel_size=W)``, which is the global mean for the square
    inputs RepVGG is used with; this class always takes the global mean.
    """

    squeeze_name = "down"
    excite_name = "up"


class RepVGGBlock(nn.Module):
    """RepVGG block: ``relu(se(dense(x) + conv1x1(x) + bn(x)))``.

    Branches (official names): ``rbr_dense`` k×k conv-BN, ``rbr_1x1`` 1×1 conv-BN, ``rbr_identity`` a
    BatchNorm2d present only when ``stride == 1`` and ``in_channels == out_channels`` (else ``None``).
    ``se`` is :class:`RepVGGSqueezeExcite` (hidden = out/16) when ``use_se`` else ``nn.Identity``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        *,
        use_se: bool = False,
        activation: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        # Registration order mirrors the official class so state_dict key order matches too.
        self.nonlinearity = activation if activation is not None else nn.ReLU()
        self.se = RepVGGSqueezeExcite(out_channels, out_channels // 16) if use_se else nn.Identity()
        has_identity = in_channels == out_channels and stride == 1
        self.rbr_identity = nn.BatchNorm2d(in_channels) if has_identity else None
        self.rbr_dense = ConvBN(in_channels, out_channels, kernel_size, stride, groups)
        self.rbr_1x1 = ConvBN(in_channels, out_channels, 1, stride, groups, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.rbr_dense(x), self.rbr_1x1(x)]
        if self.rbr_identity is not None:
            branches.append(self.rbr_identity(x))
        return self.nonlinearity(self.se(_sum_branches(branches)))


class MobileOneBlock(nn.Module):
    """MobileOne block: ``relu(se(scale(x) + skip_bn(x) + sum_i conv_i(x)))``.

    Branches (official names): ``rbr_scale`` 1×1 conv-BN (only when ``kernel_size > 1``), ``rbr_skip`` a
    BatchNorm2d (only when ``stride == 1`` and ``in_channels == out_channels``), ``rbr_conv`` a list of
    ``num_conv_branches`` k×k conv-BNs. ``se`` is :class:`SqueezeExcite` (hidden = out/16) or identity.
    The sum is taken in the official order (scale, skip, conv 0, conv 1, ...).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        *,
        num_conv_branches: int = 1,
        use_se: bool = False,
        activation: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        if num_conv_branches < 1:
            raise ValueError("MobileOneBlock needs at least one conv branch")
        self.se = SqueezeExcite(out_channels, int(out_channels * 0.0625)) if use_se else nn.Identity()
        self.activation = activation if activation is not None else nn.ReLU()
        has_skip = in_channels == out_channels and stride == 1
        self.rbr_skip = nn.BatchNorm2d(in_channels) if has_skip else None
        self.rbr_conv = nn.ModuleList(
            ConvBN(in_channels, out_channels, kernel_size, stride, groups) for _ in range(num_conv_branches)
        )
        has_scale = _pair(kernel_size) != (1, 1)
        self.rbr_scale = ConvBN(in_channels, out_channels, 1, stride, groups, padding=0) if has_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = []
        if self.rbr_scale is not None:
            branches.append(self.rbr_scale(x))
        if self.rbr_skip is not None:
            branches.append(self.rbr_skip(x))
        branches.extend(conv_bn(x) for conv_bn in self.rbr_conv)
        return self.activation(self.se(_sum_branches(branches)))


class ACBlock(nn.Module):
    """ACNet asymmetric convolution block: ``bn(k×k(x)) + bn(k×1(x)) + bn(1×k(x))`` [-> nonlinear].

    A drop-in replacement for a conv + BN pair. Names follow the official ACBlock (``square_conv``,
    ``square_bn``, ``ver_conv``, ``ver_bn``, ``hor_conv``, ``hor_bn``, ``nonlinear``); the k×1 and 1×k
    kernels are padded so that their centres sit on the k×k centre.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        *,
        activation: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"ACBlock needs an odd kernel_size >= 3, got {kernel_size}")
        self.nonlinear = activation if activation is not None else nn.Identity()
        self.square_conv = make_conv(in_channels, out_channels, kernel_size, stride, groups)
        self.square_bn = nn.BatchNorm2d(out_channels)
        self.ver_conv = make_conv(in_channels, out_channels, (kernel_size, 1), stride, groups)
        self.hor_conv = make_conv(in_channels, out_channels, (1, kernel_size), stride, groups)
        self.ver_bn = nn.BatchNorm2d(out_channels)
        self.hor_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        square = self.square_bn(self.square_conv(x))
        vertical = self.ver_bn(self.ver_conv(x))
        horizontal = self.hor_bn(self.hor_conv(x))
        return self.nonlinear(_sum_branches([square, vertical, horizontal]))


class DiverseBranchBlock(nn.Module):
    """Diverse Branch Block (DBB): four branches summed, a drop-in replacement for conv + BN.

    * ``dbb_origin``  k×k conv-BN;
    * ``dbb_1x1``     1×1 conv-BN (absent for depthwise blocks, ``groups == out_channels``);
    * ``dbb_avg``     1×1 conv -> BN -> k×k average pool -> BN (``conv``, ``bn``, ``avg``, ``avgbn``); for
                      depthwise blocks just average pool -> BN;
    * ``dbb_1x1_kxk`` 1×1 conv -> BN -> k×k conv -> BN (``conv1``, ``bn1``, ``conv2``, ``bn2``); the 1×1 conv
                      starts as the identity (as official ``IdentityBasedConv1x1`` does) when its
                      width equals ``in_channels``.

    Border handling is exact and purely affine: the 1×1 convs that feed a k×k conv / pool carry the
    block's zero padding themselves (``padding = k // 2``) and the k×k conv / pool after the BN uses
    ``padding = 0``. A 1×1 conv (no bias) of a zero-padded input is zero on the border, so the BN puts
    its own shift there: exactly what official DBB's ``BNAndPadLayer`` does in eval mode. (In train mode
    the BN's batch statistics also see that zero ring, a negligible difference from official.) The
    depthwise average pool uses ``count_include_pad=True``, a fixed k×k kernel of ``1/k²``.

    Key mapping from official DBB checkpoints: ``dbb_avg.bn.bn.*`` -> ``dbb_avg.bn.*``,
    ``dbb_1x1_kxk.bn1.bn.*`` -> ``dbb_1x1_kxk.bn1.*``, ``dbb_1x1_kxk.idconv1.weight`` (stored as a delta
    from the identity) -> ``dbb_1x1_kxk.conv1.weight`` (identity added).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        *,
        internal_channels: Optional[int] = None,
        activation: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"DiverseBranchBlock needs an odd kernel_size >= 3, got {kernel_size}")
        pad = kernel_size // 2
        depthwise = groups >= out_channels
        self.nonlinear = activation if activation is not None else nn.Identity()
        self.dbb_origin = ConvBN(in_channels, out_channels, kernel_size, stride, groups)

        self.dbb_avg = nn.Sequential()
        if depthwise:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride, padding=pad, count_include_pad=True))
        else:
            self.dbb_avg.add_module("conv", make_conv(in_channels, out_channels, 1, 1, groups, padding=pad))
            self.dbb_avg.add_module("bn", nn.BatchNorm2d(out_channels))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride, padding=0))
            self.dbb_1x1 = ConvBN(in_channels, out_channels, 1, stride, groups, padding=0)
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))

        if internal_channels is None:
            internal_channels = 2 * in_channels if depthwise else in_channels
        self.dbb_1x1_kxk = nn.Sequential()
        conv1 = make_conv(in_channels, internal_channels, 1, 1, groups, padding=pad)
        if internal_channels == in_channels:
            nn.init.dirac_(conv1.weight, groups=groups)
        self.dbb_1x1_kxk.add_module("conv1", conv1)
        self.dbb_1x1_kxk.add_module("bn1", nn.BatchNorm2d(internal_channels))
        self.dbb_1x1_kxk.add_module(
            "conv2", make_conv(internal_channels, out_channels, kernel_size, stride, groups, padding=0)
        )
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.dbb_origin(x)]
        if hasattr(self, "dbb_1x1"):
            branches.append(self.dbb_1x1(x))
        branches.append(self.dbb_avg(x))
        branches.append(self.dbb_1x1_kxk(x))
        return self.nonlinear(_sum_branches(branches))


class QARepVGGBlock(nn.Module):
    """Quantization-aware RepVGG block (QARepVGG, arXiv:2212.01593): ``relu(bn(dense(x) + conv1x1(x) + x))``.

    ``rbr_dense`` is a k×k conv-BN, ``rbr_1x1`` a bare 1×1 conv (no BN), the identity branch has no BN
    and exists only when ``stride == 1`` and ``in_channels == out_channels``; ``bn`` normalizes the sum.
    Names follow YOLOv6's ``QARepVGGBlock``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        *,
        activation: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.nonlinearity = activation if activation is not None else nn.ReLU()
        self.has_identity = in_channels == out_channels and stride == 1
        self.rbr_dense = ConvBN(in_channels, out_channels, kernel_size, stride, groups)
        self.rbr_1x1 = make_conv(in_channels, out_channels, 1, stride, groups, padding=0)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.rbr_dense(x), self.rbr_1x1(x)]
        if self.has_identity:
            branches.append(x)
        return self.nonlinearity(self.bn(_sum_branches(branches)))


class RepLKBlock(nn.Module):
    """RepLKNet large-kernel conv: ``bn(k×k(x)) + bn(small×small(x))`` [-> nonlinear], depthwise by default.

    Names follow official ``ReparamLargeKernelConv`` (``lkb_origin``, ``small_conv``). ``groups=None``
    means depthwise (``groups = in_channels``); ``small_kernel=None`` drops the small branch.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: Optional[int] = None,
        kernel_size: int = 13,
        stride: int = 1,
        groups: Optional[int] = None,
        *,
        small_kernel: Optional[int] = 5,
        activation: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        groups = in_channels if groups is None else groups
        if small_kernel is not None and small_kernel > kernel_size:
            raise ValueError(f"small_kernel ({small_kernel}) must not exceed kernel_size ({kernel_size})")
        self.lkb_origin = ConvBN(in_channels, out_channels, kernel_size, stride, groups)
        if small_kernel is not None:
            self.small_conv = ConvBN(in_channels, out_channels, small_kernel, stride, groups)
        self.nonlinear = activation if activation is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.lkb_origin(x)]
        if hasattr(self, "small_conv"):
            branches.append(self.small_conv(x))
        return self.nonlinear(_sum_branches(branches))


class InceptionConcat(nn.Module):
    """Inception-style ``cat([k×k(x), 1×1(x), 1×k(x)])``, C -> 3C channels: one k×k conv with all outputs computes it
    too, with more multiply-accumulates than the three (whether it is faster depends on the shapes and the device)."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.a = nn.Conv2d(channels, channels, kernel_size, padding=pad)
        self.b = nn.Conv2d(channels, channels, 1)
        self.c = nn.Conv2d(channels, channels, (1, kernel_size), padding=(0, pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x), self.c(x)], dim=1)


#: Stage widths of the official RepVGG and MobileOne nets before their width multipliers.
OFFICIAL_BASE_WIDTHS = (64, 128, 256, 512)


def official_widths(multipliers: Sequence[float]) -> List[int]:
    """``[int(64·m1), int(128·m2), int(256·m3), int(512·m4)]``: the four stage widths of an official RepVGG /
    MobileOne configuration from its width multipliers."""
    return [int(base * m) for base, m in zip(OFFICIAL_BASE_WIDTHS, multipliers, strict=True)]


def stage_rows(num_blocks: Sequence[int], widths: Sequence[int], per_stage: Sequence) -> list:
    """``(depth, width, per_stage[i])`` for each stage ``i``; ``ValueError`` unless the three have one entry per
    stage."""
    if len(num_blocks) != len(widths):
        raise ValueError("num_blocks and widths must have one entry per stage")
    return list(zip(num_blocks, widths, per_stage, strict=True))


#: ``make_stage(index, in_channels, row) -> (blocks, out_channels)``: the blocks of stage ``index`` (1, 2, ...).
StageMaker = Callable[[int, int, tuple], Tuple[List[nn.Module], int]]


class StagedClassifier(nn.Module):
    """Forward of the official RepVGG / MobileOne nets: ``stage0 .. stageN -> gap -> flatten -> linear``.

    Subclasses build themselves with :meth:`_add_stages`, which registers ``stage0`` .. ``stage{num_stages}``,
    ``gap`` and ``linear`` (official key names, in the official order).
    """

    num_stages: int

    def _add_stages(
        self, stem: nn.Module, stem_width: int, rows: Sequence[tuple], make_stage: StageMaker, num_classes: int
    ) -> None:
        """``stem`` as ``stage0``; ``nn.Sequential(*make_stage(i, channels, row)[0])`` as ``stage{i}`` for each row
        of ``rows`` (``channels``: the previous stage's output, ``stem_width`` for the first); then ``gap`` and a
        ``linear`` classifier on the last stage's output channels."""
        self.stage0 = stem
        channels = stem_width
        for index, row in enumerate(rows, start=1):
            blocks, channels = make_stage(index, channels, row)
            self.add_module(f"stage{index}", nn.Sequential(*blocks))
        self.num_stages = len(rows)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage0(x)
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{index}")(x)
        x = self.gap(x)
        return self.linear(torch.flatten(x, 1))
