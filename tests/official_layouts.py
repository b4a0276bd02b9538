"""Our own re-implementations of official training-time layouts that compute with in-place writes.

Written from reading DingXiaoH/DiverseBranchBlock (``diversebranchblock.py``, ``convnet_utils.py``,
``resnet.py``) and DingXiaoH/RepMLP (``repmlpnet.py``): the same computation, the same module and
parameter names (so their checkpoints' keys match), and the same Python spellings where the spelling
is what the compiler has to see through (``BNAndPadLayer`` writes its border in place, the block sums
its branches with ``+=``, the identity of ``IdentityBasedConv1x1`` is a plain tensor attribute).
The deploy forms are re-derived here with :mod:`reparam.affine`, independently of the graph passes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from reparam import affine as A
from reparam.emit import to_module

# --------------------------------------------------------------------------------------------
# DiverseBranchBlock (official layout)


def conv_bn(cin: int, cout: int, k, stride=1, padding=0, dilation=1, groups=1) -> nn.Sequential:
    """``Sequential(conv=bias-free Conv2d, bn=BatchNorm2d)``: keys ``conv.weight``, ``bn.*``."""
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


class IdentityBasedConv1x1(nn.Conv2d):
    """A 1x1 conv whose stored ``weight`` is a delta from the (grouped) identity: runs ``weight + I``.

    ``I[i, i mod (C/g)] = 1`` is a plain attribute (not a parameter or buffer), as upstream."""

    def __init__(self, channels: int, groups: int = 1):
        super().__init__(channels, channels, 1, 1, 0, groups=groups, bias=False)
        per_group = channels // groups
        ident = torch.zeros(channels, per_group, 1, 1)
        ident[torch.arange(channels), torch.arange(channels) % per_group] = 1.0
        self.id_tensor = ident
        nn.init.zeros_(self.weight)

    def get_actual_kernel(self) -> torch.Tensor:
        return self.weight + self.id_tensor.to(self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.get_actual_kernel(), None, 1, 0, self.dilation, self.groups)


def bn_at_zero(bn: nn.BatchNorm2d) -> torch.Tensor:
    """What an inference BN outputs for a zero input, spelled as upstream spells it."""
    if bn.affine:
        return bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return -bn.running_mean / torch.sqrt(bn.running_var + bn.eps)


class BNAndPadLayer(nn.Module):
    """BN, then zero-pad by ``pad_pixels`` on every side and overwrite that border in place with BN(0).

    ``border`` (not upstream) picks what is written, for the negative tests: "bn0" (upstream),
    "zeros", "bias" (the BN's bias alone, not BN(0)); ``sides`` which of top, bottom, left, right."""

    def __init__(
        self,
        pad_pixels: int,
        num_features: int,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        *,
        border: str = "bn0",
        sides: str = "tblr",
    ):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        self.pad_pixels = pad_pixels
        self.border, self.sides = border, sides

    def _border_value(self) -> torch.Tensor:
        if self.border == "zeros":
            return torch.zeros_like(self.bn.running_mean)
        if self.border == "bias":
            return self.bn.bias.detach()
        return bn_at_zero(self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(x)
        p = self.pad_pixels
        if p > 0:
            value = self._border_value()
            out = F.pad(out, [p] * 4)
            value = value.view(1, -1, 1, 1)
            if "t" in self.sides:
                out[:, :, 0:p, :] = value
            if "b" in self.sides:
                out[:, :, -p:, :] = value
            if "l" in self.sides:
                out[:, :, :, 0:p] = value
            if "r" in self.sides:
                out[:, :, :, -p:] = value
        return out


class DiverseBranchBlock(nn.Module):
    """Official-layout DBB: ``dbb_origin`` + ``dbb_1x1`` + ``dbb_avg`` + ``dbb_1x1_kxk``, summed with ``+=``.

    Non-depthwise (``groups < out``): ``dbb_avg`` = 1x1 conv -> BNAndPad -> k×k avg pool (no padding)
    -> ``avgbn``; ``dbb_1x1_kxk`` = ``idconv1`` (or ``conv1`` when the internal width differs from
    ``in``) -> BNAndPad -> k×k conv (no padding) -> ``bn2``.  Depthwise: ``dbb_avg`` = padded avg
    pool -> ``avgbn``, no ``dbb_1x1``, internal width ``2 * in``.  ``border``/``sides`` go to every
    BNAndPadLayer (tests only)."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        internal_channels_1x1_3x3=None,
        nonlinear=None,
        *,
        border: str = "bn0",
        sides: str = "tblr",
    ):
        super().__init__()
        assert padding == kernel_size // 2
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.kernel_size, self.out_channels, self.groups = kernel_size, out_channels, groups
        bn_pad = dict(border=border, sides=sides)
        self.dbb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.dbb_avg = nn.Sequential()
        if groups < out_channels:
            self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(padding, out_channels, **bn_pad))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride, 0))
            self.dbb_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups=groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride, padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))
        internal = internal_channels_1x1_3x3
        if internal is None:
            internal = in_channels if groups < out_channels else 2 * in_channels
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(in_channels, groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(in_channels, internal, 1, 1, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(padding, internal, affine=True, **bn_pad))
        self.dbb_1x1_kxk.add_module(
            "conv2", nn.Conv2d(internal, out_channels, kernel_size, stride, 0, groups=groups, bias=False)
        )
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


class ConvBN(nn.Module):
    """``convnet_utils.ConvBN``: ``nonlinear(bn(conv(x)))`` with keys ``conv.weight``, ``bn.*``."""

    def __init__(
        self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, nonlinear=None
    ):
        super().__init__()
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.bn(self.conv(x)))


def _conv_block(cin, cout, k, stride=1, padding=0, nonlinear=None) -> nn.Module:
    """``convnet_utils.conv_bn(_relu)`` with the DBB implementation selected: 1x1 and >= 7 stay ConvBN."""
    if k == 1 or k >= 7:
        return ConvBN(cin, cout, k, stride, padding, nonlinear=nonlinear)
    return DiverseBranchBlock(cin, cout, k, stride, padding, nonlinear=nonlinear)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        if stride != 1 or in_planes != planes:
            self.shortcut = _conv_block(in_planes, planes, 1, stride)
        else:
            self.shortcut = nn.Identity()
        self.conv1 = _conv_block(in_planes, planes, 3, stride, 1, nonlinear=nn.ReLU())
        self.conv2 = _conv_block(planes, planes, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """``resnet.ResNet`` (BasicBlock): ``stage0`` = 7x7 ConvBN-ReLU + max pool, ``stage1..4``, ``gap``, ``linear``."""

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes=1000, width_multiplier=1.0):
        super().__init__()
        self.in_planes = int(64 * width_multiplier)
        self.stage0 = nn.Sequential()
        self.stage0.add_module("conv1", _conv_block(3, self.in_planes, 7, 2, 3, nonlinear=nn.ReLU()))
        self.stage0.add_module("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        for index, (planes, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2), strict=False), start=1):
            self.add_module(
                f"stage{index}", self._make_stage(int(planes * width_multiplier), num_blocks[index - 1], stride)
            )
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(int(512 * width_multiplier), num_classes)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stage0(x)
        out = self.stage4(self.stage3(self.stage2(self.stage1(out))))
        out = self.gap(out)
        return self.linear(out.view(out.size(0), -1))


# --------------------------------------------------------------------------------------------
# deploy forms, re-derived with the algebra (what upstream's switch_to_deploy computes)

_2D = A.Layout(2)


def _conv(m: nn.Conv2d, weight: Optional[torch.Tensor] = None, padding=None) -> A.Affine:
    w = (m.weight if weight is None else weight).detach().double()
    return A.from_conv(w, None, m.stride, m.padding if padding is None else padding, m.dilation, m.groups)


def _bn(m: nn.BatchNorm2d) -> A.Affine:
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return A.batchnorm(d(m.running_mean), d(m.running_var), d(m.weight), d(m.bias), m.eps, _2D)


def _chain(*ops: A.Affine) -> A.Affine:
    out = ops[0]
    for op in ops[1:]:
        out = A.compose(out, op)
    return out


def dbb_equivalent(block: DiverseBranchBlock) -> A.Affine:
    """The block's single conv.  A BNAndPadLayer is ``BN(zero_pad(.))`` (its border is BN(0)), and a
    bias-free 1x1 conv commutes with the zero pad: the pad becomes that 1x1 conv's padding."""
    k, p = block.kernel_size, block.kernel_size // 2
    branches = [_chain(_conv(block.dbb_origin.conv), _bn(block.dbb_origin.bn))]
    if hasattr(block, "dbb_1x1"):
        branches.append(_chain(_conv(block.dbb_1x1.conv), _bn(block.dbb_1x1.bn)))
    avg, avgbn = block.dbb_avg.avg, _bn(block.dbb_avg.avgbn)
    channels = block.out_channels
    if hasattr(block.dbb_avg, "conv"):
        branches.append(
            _chain(
                _conv(block.dbb_avg.conv, padding=p),
                _bn(block.dbb_avg.bn.bn),
                A.avgpool(channels, k, avg.stride, 0, _2D),
                avgbn,
            )
        )
    else:
        branches.append(_chain(A.avgpool(channels, k, avg.stride, avg.padding, _2D), avgbn))
    seq = block.dbb_1x1_kxk
    first = (
        _conv(seq.idconv1, seq.idconv1.get_actual_kernel(), padding=p)
        if hasattr(seq, "idconv1")
        else _conv(seq.conv1, padding=p)
    )
    branches.append(_chain(first, _bn(seq.bn1.bn), _conv(seq.conv2), _bn(seq.bn2)))
    return A.add(branches)


class Deployed(nn.Module):
    """``nonlinear(conv(x))``: what ``switch_to_deploy`` leaves of a DBB or ConvBN."""

    def __init__(self, conv: nn.Module, nonlinear: nn.Module):
        super().__init__()
        self.conv, self.nonlinear = conv, nonlinear

    def forward(self, x):
        return self.nonlinear(self.conv(x))


def deployed(block: nn.Module, dtype=torch.float32) -> Deployed:
    if isinstance(block, DiverseBranchBlock):
        aff = dbb_equivalent(block)
    else:
        aff = _chain(_conv(block.conv), _bn(block.bn))
    return Deployed(to_module(aff, dtype, "cpu"), block.nonlinear)


def switch_to_deploy(model: nn.Module, dtype=torch.float32) -> nn.Module:
    """Every DBB / ConvBN of ``model`` (in place) replaced by its deploy form; returns ``model``."""
    for name, child in list(model.named_children()):
        if isinstance(child, (DiverseBranchBlock, ConvBN)):
            setattr(model, name, deployed(child, dtype))
        else:
            switch_to_deploy(child, dtype)
    return model


# --------------------------------------------------------------------------------------------
# RepMLPNet (official layout)


def conv_bn_relu(cin: int, cout: int, k, stride, padding, groups=1) -> nn.Sequential:
    seq = conv_bn(cin, cout, k, stride, padding, groups=groups)
    seq.add_module("relu", nn.ReLU())
    return seq


class GlobalPerceptron(nn.Module):
    """``sigmoid(fc2(relu(fc1(mean_hw(x)))))`` as a ``(N, C, 1, 1)`` gate (fc1/fc2: biased 1x1 convs)."""

    def __init__(self, input_channels: int, internal_neurons: int):
        super().__init__()
        self.fc1 = nn.Conv2d(input_channels, internal_neurons, 1, 1, bias=True)
        self.fc2 = nn.Conv2d(internal_neurons, input_channels, 1, 1, bias=True)
        self.input_channels = input_channels

    def forward(self, inputs):
        x = F.adaptive_avg_pool2d(inputs, output_size=(1, 1))
        x = F.relu(self.fc1(x), inplace=True)
        x = torch.sigmoid(self.fc2(x))
        return x.view(-1, self.input_channels, 1, 1)


class RepMLPBlock(nn.Module):
    """Official-layout RepMLP block: the map is cut into ``h x w`` partitions; ``fc3`` (a grouped 1x1
    conv over the ``S * h * w`` values of a partition, ``S`` share-sets) -> ``fc3_bn`` (BN over S)
    plus the local branches ``repconv{k}`` (conv-BN over each ``(S, h, w)`` partition, groups S),
    summed in place, re-assembled and gated by the global perceptron ``gp``."""

    def __init__(
        self, in_channels, out_channels, h, w, reparam_conv_k=None, globalperceptron_reduce=4, num_sharesets=1
    ):
        super().__init__()
        assert in_channels == out_channels
        self.C, self.O, self.S, self.h, self.w = in_channels, out_channels, num_sharesets, h, w
        self.gp = GlobalPerceptron(in_channels, in_channels // globalperceptron_reduce)
        self.fc3 = nn.Conv2d(h * w * num_sharesets, h * w * num_sharesets, 1, 1, 0, bias=False, groups=num_sharesets)
        self.fc3_bn = nn.BatchNorm2d(num_sharesets)
        self.reparam_conv_k = reparam_conv_k
        for k in reparam_conv_k or ():
            setattr(self, f"repconv{k}", conv_bn(num_sharesets, num_sharesets, k, 1, k // 2, groups=num_sharesets))

    def partition(self, x, h_parts, w_parts):
        x = x.reshape(-1, self.C, h_parts, self.h, w_parts, self.w)
        return x.permute(0, 2, 4, 1, 3, 5)

    def partition_affine(self, x, h_parts, w_parts):
        out = self.fc3(x.reshape(-1, self.S * self.h * self.w, 1, 1))
        out = self.fc3_bn(out.reshape(-1, self.S, self.h, self.w))
        return out.reshape(-1, h_parts, w_parts, self.S, self.h, self.w)

    def forward(self, inputs):
        global_vec = self.gp(inputs)
        origin_shape = inputs.size()
        h_parts, w_parts = origin_shape[2] // self.h, origin_shape[3] // self.w
        partitions = self.partition(inputs, h_parts, w_parts)
        fc3_out = self.partition_affine(partitions, h_parts, w_parts)
        if self.reparam_conv_k is not None:
            conv_inputs = partitions.reshape(-1, self.S, self.h, self.w)
            conv_out = 0
            for k in self.reparam_conv_k:
                conv_out += getattr(self, f"repconv{k}")(conv_inputs)
            fc3_out += conv_out.reshape(-1, h_parts, w_parts, self.S, self.h, self.w)
        fc3_out = fc3_out.permute(0, 3, 1, 4, 2, 5)
        return fc3_out.reshape(*origin_shape) * global_vec


class FFNBlock(nn.Module):
    def __init__(self, in_channels, hidden_channels=None, out_channels=None, act_layer=nn.GELU):
        super().__init__()
        hidden, out = hidden_channels or in_channels, out_channels or in_channels
        self.ffn_fc1 = conv_bn(in_channels, hidden, 1, 1, 0)
        self.ffn_fc2 = conv_bn(hidden, out, 1, 1, 0)
        self.act = act_layer()

    def forward(self, x):
        return self.ffn_fc2(self.act(self.ffn_fc1(x)))


class RepMLPNetUnit(nn.Module):
    def __init__(self, channels, h, w, reparam_conv_k, globalperceptron_reduce, ffn_expand=4, num_sharesets=1):
        super().__init__()
        self.repmlp_block = RepMLPBlock(
            channels, channels, h, w, reparam_conv_k, globalperceptron_reduce, num_sharesets
        )
        self.ffn_block = FFNBlock(channels, channels * ffn_expand)
        self.prebn1 = nn.BatchNorm2d(channels)
        self.prebn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = x + self.repmlp_block(self.prebn1(x))
        return y + self.ffn_block(self.prebn2(y))


class RepMLPNet(nn.Module):
    """``conv_embedding`` -> stages of RepMLPNetUnits with ``embeds`` (2x2 stride-2 conv-BN-ReLU)
    between them -> ``head_norm`` -> global mean -> ``head``."""

    def __init__(
        self,
        in_channels=3,
        num_class=1000,
        patch_size=(4, 4),
        num_blocks=(2, 2, 6, 2),
        channels=(192, 384, 768, 1536),
        hs=(64, 32, 16, 8),
        ws=(64, 32, 16, 8),
        sharesets_nums=(4, 8, 16, 32),
        reparam_conv_k=(3,),
        globalperceptron_reduce=4,
    ):
        super().__init__()
        self.conv_embedding = conv_bn_relu(in_channels, channels[0], patch_size, patch_size, 0)
        self.stages = nn.ModuleList(
            nn.ModuleList(RepMLPNetUnit(c, h, w, reparam_conv_k, globalperceptron_reduce, 4, s) for _ in range(n))
            for n, c, h, w, s in zip(num_blocks, channels, hs, ws, sharesets_nums, strict=False)
        )
        self.embeds = nn.ModuleList(
            conv_bn_relu(a, b, 2, 2, 0) for a, b in zip(channels[:-1], channels[1:], strict=False)
        )
        self.head_norm = nn.BatchNorm2d(channels[-1])
        self.head = nn.Linear(channels[-1], num_class)

    def forward(self, x):
        x = self.conv_embedding(x)
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = block(x)
            if i < len(self.stages) - 1:
                x = self.embeds[i](x)
        x = F.adaptive_avg_pool2d(self.head_norm(x), 1)
        return self.head(x.view(x.size(0), -1))


def local_injected_fc3(block: RepMLPBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """``locality_injection`` re-derived: the weight and bias of the one grouped 1x1 conv (``fc3``
    with bias, ``fc3_bn`` gone) that computes fc3 -> fc3_bn plus every ``repconv{k}`` branch.

    A conv over an ``h x w`` partition is a linear map of its ``h * w`` values: its matrix is the conv
    applied to the unit basis (one partition per basis vector)."""
    S, hw = block.S, block.h * block.w
    bn = _bn(block.fc3_bn)
    per_set = lambda t: t.reshape(-1).repeat_interleave(hw)  # noqa: E731  (BN over S -> over S*h*w)
    scale, shift = per_set(bn.weight), per_set(bn.bias)
    weight = block.fc3.weight.detach().double() * scale.reshape(-1, 1, 1, 1)
    bias = shift
    if block.reparam_conv_k:
        local = A.add(
            [
                _chain(_conv(getattr(block, f"repconv{k}").conv), _bn(getattr(block, f"repconv{k}").bn))
                for k in block.reparam_conv_k
            ]
        )
        basis = torch.eye(hw, dtype=torch.float64).repeat(1, S).reshape(hw, S, block.h, block.w)
        zero = A.apply(local, torch.zeros_like(basis[:1]))  # the bias, per output value
        matrix = (A.apply(local, basis) - zero).reshape(hw, S * hw).t()  # (S*h*w out, h*w in per set)
        weight = weight + matrix.reshape(weight.shape)
        bias = bias + zero.reshape(-1)
    return weight, bias


def locality_injection(model: nn.Module) -> nn.Module:
    """Every RepMLPBlock of ``model`` (in place) with its fc3 / fc3_bn / repconv branches replaced by
    one biased ``fc3`` (what upstream's ``locality_injection`` leaves); returns ``model``."""
    for block in [m for m in model.modules() if isinstance(m, RepMLPBlock)]:
        weight, bias = local_injected_fc3(block)
        dtype = block.fc3.weight.dtype
        fc3 = nn.Conv2d(block.fc3.in_channels, block.fc3.out_channels, 1, groups=block.S, bias=True, dtype=dtype)
        fc3.weight.data, fc3.bias.data = weight.to(dtype), bias.to(dtype)
        for k in block.reparam_conv_k or ():
            delattr(block, f"repconv{k}")
        block.reparam_conv_k = None
        block.fc3, block.fc3_bn = fc3, nn.Identity()
    return model
