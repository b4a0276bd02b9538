"""In-place writes into private tensors (passes/inplace.py) on official training-time layouts.

The official DBB writes its BNAndPadLayer border in place; before the pass (and the tracer's item
assignment) such a block did not trace and stayed at 5 convs + 4 BNs.  Counts are executed ops
(:class:`conftest.OpCounter`), errors relative L2 against the float64 original.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import count_ops, random_bn, rel_err
from official_layouts import (
    BNAndPadLayer,
    DiverseBranchBlock,
    RepMLPBlock,
    RepMLPNet,
    RepMLPNetUnit,
    ResNet,
    bn_at_zero,
    deployed,
    locality_injection,
    switch_to_deploy,
)

import reparam
from reparam.pipeline import fuse_with_report


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random conv weights and non-trivial BN statistics (random mean/var/weight/bias); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                random_bn(m, g)
            elif isinstance(m, nn.modules.conv._ConvNd):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
    return model.eval()


def _snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _refusals(report, text: str) -> list:
    return [r for r in report.refusals if text in r.reason]


# --------------------------------------------------------------------------------------------
# the official DBB block

# (in, out, groups): groups 1 / 2 with in == out and not, and depthwise
_WIDTHS = [(4, 4, 1), (4, 8, 1), (4, 4, 2), (4, 8, 2), (4, 4, 4)]
_CASES = [(k, s, *w) for k, s, w in itertools.product((3, 5, 7), (1, 2), _WIDTHS)]


@pytest.mark.parametrize("k,stride,cin,cout,groups", _CASES)
def test_official_dbb_block_fuses_to_one_conv(k, stride, cin, cout, groups):
    block = randomize(DiverseBranchBlock(cin, cout, k, stride, k // 2, groups=groups), seed=k * 10 + stride)
    before = _snapshot(block)
    x = torch.randn(2, cin, 9, 11, dtype=torch.float64)  # odd, non-square
    want = copy.deepcopy(block).double()(x)

    fused64, report = fuse_with_report(copy.deepcopy(block).double(), (x,))
    assert rel_err(fused64(x), want) <= 1e-9
    assert count_ops(fused64, x) == {"conv": 1}, report  # one conv, no BN, no pad, no add
    assert len([r for r in report.rewrites if "inplace_pad" in r.events]) == (1 if groups >= cout else 2)

    fused32 = reparam.fuse(block, (x.float(),))
    assert rel_err(fused32(x.float()), want) <= 1e-5
    assert count_ops(fused32, x.float())["conv"] == 1 and count_ops(fused32, x.float())["bn"] == 0

    # the official switch_to_deploy (re-derived) runs one conv and agrees with the fused model
    deploy = deployed(copy.deepcopy(block).double(), torch.float64)
    assert count_ops(deploy, x) == {"conv": 1}
    assert rel_err(deploy(x), want) <= 1e-9

    assert not block.training and all(torch.equal(v, before[name]) for name, v in block.state_dict().items())


def test_official_dbb_state_dict_keys():
    stats = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    bn = lambda prefix: [f"{prefix}.{s}" for s in stats]  # noqa: E731
    want = [
        "dbb_origin.conv.weight",
        *bn("dbb_origin.bn"),
        "dbb_avg.conv.weight",
        *bn("dbb_avg.bn.bn"),
        *bn("dbb_avg.avgbn"),
        "dbb_1x1.conv.weight",
        *bn("dbb_1x1.bn"),
        "dbb_1x1_kxk.idconv1.weight",
        *bn("dbb_1x1_kxk.bn1.bn"),
        "dbb_1x1_kxk.conv2.weight",
        *bn("dbb_1x1_kxk.bn2"),
    ]
    assert list(DiverseBranchBlock(4, 4, 3, 1, 1).state_dict()) == want
    wide = DiverseBranchBlock(4, 8, 3, 1, 1, internal_channels_1x1_3x3=6).state_dict()
    assert "dbb_1x1_kxk.conv1.weight" in wide and "dbb_1x1_kxk.idconv1.weight" not in wide
    depthwise = list(DiverseBranchBlock(4, 4, 3, 1, 1, groups=4).state_dict())
    assert "dbb_1x1.conv.weight" not in depthwise and "dbb_avg.conv.weight" not in depthwise
    assert "dbb_1x1_kxk.conv1.weight" in depthwise  # 2x internal width


def test_official_dbb_resnet18_fuses_like_its_deploy_form():
    model = randomize(ResNet(width_multiplier=0.25, num_classes=10), seed=1)
    assert "stage1.0.conv1.dbb_avg.bn.bn.running_mean" in model.state_dict()
    x = torch.randn(1, 3, 32, 32)
    fused, report = fuse_with_report(model, (x,))
    assert report.max_rel_error <= 1e-9
    assert rel_err(fused(x), model(x)) <= 1e-5
    deploy = switch_to_deploy(copy.deepcopy(model))
    ours, theirs, train = count_ops(fused, x), count_ops(deploy, x), count_ops(model, x)
    assert ours["conv"] == theirs["conv"] == 1 + 16 + 3  # stem, 16 block convs, 3 shortcuts
    assert ours["bn"] == theirs["bn"] == 0 and train["conv"] == 1 + 16 * 5 + 3
    assert rel_err(deploy(x), model(x)) <= 1e-5


# --------------------------------------------------------------------------------------------
# borders not written with BN(0), or written where someone sees it: exact, refused with a reason


def _block_with(border="bn0", sides="tblr"):
    return randomize(DiverseBranchBlock(4, 8, 3, 1, 1, border=border, sides=sides), seed=3).double()


@pytest.mark.parametrize(
    "border,sides,reason",
    [
        ("bias", "tblr", "border value differs"),  # c != BN(0)
        ("bn0", "tbl", "cover only part of the border"),
        ("bn0", "lr", "cover only part of the border"),
    ],
)
def test_border_that_is_not_bn_at_zero_is_refused(border, sides, reason):
    block = _block_with(border, sides)
    x = torch.randn(2, 4, 7, 10, dtype=torch.float64)
    fused, report = fuse_with_report(block, (x,))
    assert rel_err(fused(x), block(x)) <= 1e-9
    assert len(_refusals(report, reason)) == 2, report
    assert count_ops(fused, x)["conv"] > 1  # no single conv computes a border of c != BN(0)


def test_zero_border_is_a_plain_zero_pad():
    block = _block_with("zeros")
    x = torch.randn(2, 4, 7, 10, dtype=torch.float64)
    fused, report = fuse_with_report(block, (x,))
    assert rel_err(fused(x), block(x)) <= 1e-9
    assert [r.after for r in report.rewrites if "inplace_pad" in r.events] == ["redundant writes of the pad value"] * 2
    assert count_ops(fused, x)["conv"] > 1  # BN's shift then a zero border: not one conv


class _BNPadThenConv(nn.Module):
    """``conv(pad_c(bn(x)))`` on 1-d, 2-d or 3-d data: pad widths ``lo``/``hi`` per spatial axis, the
    border written per side as ``spell`` ("setitem" or "copy_") with BN(0) unless ``value`` says."""

    def __init__(self, nd, channels, lo, hi, kernel, spell="setitem", value="bn0", interior=False):
        super().__init__()
        self.bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[nd - 1](channels)
        self.conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1](channels, channels, kernel, bias=False)
        self.nd, self.lo, self.hi, self.spell, self.value, self.interior = nd, lo, hi, spell, value, interior

    def forward(self, x):
        pads = [p for lo, hi in zip(reversed(self.lo), reversed(self.hi), strict=True) for p in (lo, hi)]
        out = F.pad(self.bn(x), pads)
        c = bn_at_zero(self.bn) if self.value == "bn0" else self.bn.bias.detach()
        c = c.view(1, -1, *([1] * self.nd))
        for axis, (lo, hi) in enumerate(zip(self.lo, self.hi, strict=True)):
            sides = [slice(0, lo + self.interior)] if lo else []
            sides += [slice(-hi, None)] if hi else []
            for side in sides:
                index = (slice(None), slice(None)) + (slice(None),) * axis + (side,)
                if self.spell == "setitem":
                    out[index] = c
                else:
                    out[index].copy_(c)  # broadcasts
        return self.conv(out)


@pytest.mark.parametrize(
    "nd,lo,hi,kernel,spell",
    [
        (1, (2,), (2,), 5, "setitem"),
        (1, (1,), (3,), 3, "copy_"),
        (2, (1, 2), (1, 2), (3, 5), "setitem"),  # non-square
        (2, (0, 2), (2, 1), (3, 3), "copy_"),  # asymmetric, a side without padding
        (2, (3, 3), (3, 3), (3, 3), "setitem"),  # wider than the kernel's reach
        (3, (1, 0, 2), (1, 1, 0), (3, 2, 3), "setitem"),
    ],
)
def test_any_width_and_rank_fuses_to_one_conv(nd, lo, hi, kernel, spell):
    model = randomize(_BNPadThenConv(nd, 3, lo, hi, kernel, spell)).double()
    x = torch.randn(2, 3, *((6, 7, 5)[:nd]), dtype=torch.float64)
    fused, report = fuse_with_report(model, (x,))
    assert rel_err(fused(x), model(x)) <= 1e-9
    assert [r for r in report.rewrites if "inplace_pad" in r.events], report
    counts = count_ops(fused, x)
    assert counts["conv"] == 1 and counts["bn"] == 0, report


def test_write_into_the_data_is_refused():
    model = randomize(_BNPadThenConv(2, 3, (1, 1), (1, 1), 3, interior=True)).double()
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    fused, report = fuse_with_report(model, (x,))
    assert rel_err(fused(x), model(x)) <= 1e-9
    assert _refusals(report, "reaches into the padded data")


class _ReadBeforeWrite(nn.Module):
    """The padded tensor is read (``early``) before its border is overwritten."""

    def __init__(self, alias: bool):
        super().__init__()
        self.pad = BNAndPadLayer(1, 3)
        self.conv = nn.Conv2d(3, 3, 3, bias=False)
        self.alias = alias

    def forward(self, x):
        out = F.pad(self.pad.bn(x), [1] * 4)
        early = out[:, :, :2] if self.alias else out * 2.0  # a view, or a read
        c = bn_at_zero(self.pad.bn).view(1, -1, 1, 1)
        out[:, :, 0:1, :] = c
        out[:, :, -1:, :] = c
        out[:, :, :, 0:1] = c
        out[:, :, :, -1:] = c
        return self.conv(out), early.sum()


@pytest.mark.parametrize("alias", [False, True])
def test_tensor_read_before_the_write_is_left_in_place(alias):
    model = randomize(_ReadBeforeWrite(alias)).double()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    fused, report = fuse_with_report(model, (x,))
    for got, want in zip(fused(x), model(x), strict=True):
        assert rel_err(got, want) <= 1e-9
    assert _refusals(report, "before it is written in place"), report
    assert not [r for r in report.rewrites if "inplace_pad" in r.events]


class _CloneThenWrite(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        t = self.bn(x).clone()
        t[:, 0:1] = 0.5
        return self.conv(t)


def test_write_without_a_rule_is_reported_and_exact():
    model = randomize(_CloneThenWrite()).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    fused, report = fuse_with_report(model, (x,))
    assert rel_err(fused(x), model(x)) <= 1e-9
    assert _refusals(report, "no rule reads such writes"), report


class _MutatedAroundThePad(nn.Module):
    """``h = conv(x); y = bn(h)``, then ``y`` (case "source") or ``h`` (case "input") is updated in
    place before ``y`` is padded and its border written with BN(0)."""

    def __init__(self, case: str):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, bias=False)
        self.case = case

    def forward(self, x):
        h = self.conv1(x)
        y = self.bn(h)
        (y if self.case == "source" else h).mul_(2.0)
        out = F.pad(y, [1] * 4)
        c = bn_at_zero(self.bn).view(1, -1, 1, 1)
        out[:, :, :1] = c
        out[:, :, -1:] = c
        out[..., :1] = c
        out[..., -1:] = c
        return self.conv2(out) + h


@pytest.mark.parametrize("case", ["source", "input"])
def test_updates_around_the_pad_keep_it_exact(case):
    model = randomize(_MutatedAroundThePad(case)).double()
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    fused, report = fuse_with_report(model, (x,))
    assert rel_err(fused(x), model(x)) <= 1e-9
    rewritten = [r for r in report.rewrites if "inplace_pad" in r.events]
    if case == "source":  # the interior is 2 * bn(h), not bn(h): the rule must not fire
        assert not rewritten and _refusals(report, "is updated in place"), report
    else:  # bn(F.pad(h)) is inserted where bn(h) ran, before h is doubled
        assert rewritten, report


class _WriteThroughAViewOfAView(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 3, bias=False)

    def forward(self, x):
        out = F.pad(self.bn(x), [1] * 4)
        c = bn_at_zero(self.bn).view(1, -1, 1, 1)
        out[:, :, :1][:, :, :, 1:] = c  # a setitem into a view: not read functionally
        return self.conv(out)


def test_write_through_a_view_of_a_view_is_exact():
    model = randomize(_WriteThroughAViewOfAView()).double()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    fused, report = fuse_with_report(model, (x,))
    assert rel_err(fused(x), model(x)) <= 1e-9
    assert not [r for r in report.rewrites if "inplace_pad" in r.events]


# --------------------------------------------------------------------------------------------
# tracing what the official layouts spell: item assignment, sizes spread into reshape


class _Spread(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.bn, self.how = nn.BatchNorm2d(3), how

    def forward(self, x):
        size = x.size()
        y = self.bn(x).flatten(1)
        if self.how == "size":
            return y.reshape(*size)
        if self.how == "shape":
            return y.view(*x.shape)
        return y.reshape(*size[1:])  # not a whole size: fx's TraceError, the model does not trace


@pytest.mark.parametrize("how", ["size", "shape", "slice"])
def test_a_size_spread_into_reshape_traces(how):
    from reparam import trace as T

    model = randomize(_Spread(how)).double()
    if how == "slice":
        with pytest.raises(torch.fx.proxy.TraceError):
            T.symbolic_trace(model)
        return
    gm = T.symbolic_trace(model)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    assert torch.equal(gm(x), model(x))


# --------------------------------------------------------------------------------------------
# RepMLPNet (official layout): fc3 + fc3_bn + repconv{k} branches over h x w partitions


def _repmlp_net():
    return RepMLPNet(
        num_class=10,
        num_blocks=(1, 1, 1, 1),
        channels=(8, 16, 32, 64),
        hs=(4, 2, 2, 1),
        ws=(4, 2, 2, 1),
        sharesets_nums=(1, 2, 4, 8),
        reparam_conv_k=(1, 3),
    )


def test_official_repmlpnet_state_dict_keys():
    keys = set(_repmlp_net().state_dict())
    for key in (
        "conv_embedding.conv.weight",
        "conv_embedding.bn.running_var",
        "stages.0.0.prebn1.weight",
        "stages.0.0.repmlp_block.gp.fc1.bias",
        "stages.0.0.repmlp_block.fc3.weight",
        "stages.0.0.repmlp_block.fc3_bn.running_mean",
        "stages.0.0.repmlp_block.repconv1.conv.weight",
        "stages.3.0.repmlp_block.repconv3.bn.bias",
        "stages.1.0.ffn_block.ffn_fc2.bn.weight",
        "embeds.2.conv.weight",
        "head_norm.running_var",
        "head.weight",
    ):
        assert key in keys, key


_REPMLP_CASES = {
    "block": (lambda: RepMLPBlock(8, 8, 4, 3, (1, 3), 4, 2), (2, 8, 8, 9)),  # non-square partitions
    "block_no_local": (lambda: RepMLPBlock(8, 8, 4, 4, None, 4, 4), (2, 8, 8, 8)),  # fc3 + fc3_bn only
    "unit": (lambda: RepMLPNetUnit(8, 4, 4, (1, 3), 4, 4, 2), (2, 8, 8, 8)),
    "net": (_repmlp_net, (1, 3, 32, 32)),
}


@pytest.mark.parametrize("name", list(_REPMLP_CASES))
def test_official_repmlp_fuses_exactly_and_traces_whole(name):
    build, shape = _REPMLP_CASES[name]
    model = randomize(build(), seed=5).double()
    before = _snapshot(model)
    x = torch.randn(shape, dtype=torch.float64)
    fused, report = fuse_with_report(model, (x,))
    assert rel_err(fused(x), model(x)) <= 1e-9
    assert not [n for n in report.notes if "trace" in n], report.notes  # reshape(*origin_shape) traces
    deploy = locality_injection(copy.deepcopy(model))
    assert rel_err(deploy(x), model(x)) <= 1e-9  # the re-derived locality_injection is exact
    ours, theirs = count_ops(fused, x), count_ops(deploy, x)
    assert all(ours[k] <= theirs[k] for k in ("conv", "bn", "linear")), (ours, theirs)
    blocks = len([m for m in model.modules() if isinstance(m, RepMLPBlock)])
    assert report.counts()["merge_rows"] == blocks
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fused_repmlp_block_runs_on_other_input_sizes():
    """The merged fc3 reads partitions of a fixed size; the number of partitions follows the input."""
    model = randomize(RepMLPBlock(8, 8, 4, 3, (1, 3), 4, 2), seed=6).double()
    fused = reparam.fuse(model, (torch.randn(1, 8, 4, 3, dtype=torch.float64),))
    for shape in [(1, 8, 4, 3), (3, 8, 12, 6), (2, 8, 8, 9)]:
        x = torch.randn(shape, dtype=torch.float64)
        assert rel_err(fused(x), model(x)) <= 1e-9


class _Partitions(nn.Module):
    """``bn(conv(x.reshape(-1, 2, n, n)).reshape(-1, 2 * n * n))`` then back to ``x``'s shape:
    partitions as samples, with ``literal`` sizes or sizes read from the input; a large ``size``
    makes unrolling the conv into a dense matrix cost more than the conv; ``end`` "flatten" ends
    with ``flatten(1)``, which cannot be replayed on another shape (the merge stops before it)."""

    def __init__(self, literal: bool, size: int, end: str = "reshape"):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.BatchNorm1d(2 * size * size)
        self.literal, self.size, self.end = literal, size, end

    def forward(self, x):
        n = self.size
        parts = x.reshape(-1, 2, n, n) if self.literal else x.reshape(-1, 2, x.size(2), x.size(3))
        y = self.bn(self.conv(parts).reshape(-1, 2 * n * n))  # flattened partitions
        return y.flatten(1) if self.end == "flatten" else y.reshape(x.shape)


@pytest.mark.parametrize(
    "literal,size,end,merged",
    [
        (True, 3, "reshape", True),
        (True, 3, "flatten", True),
        (False, 3, "reshape", False),
        (True, 12, "reshape", False),
    ],
)
def test_per_row_merge_needs_fixed_partitions_and_must_pay(literal, size, end, merged):
    model = randomize(_Partitions(literal, size, end)).double()
    x = torch.randn(2, 4, size, size, dtype=torch.float64)
    fused, report = fuse_with_report(model, (x,))
    assert rel_err(fused(x), model(x)) <= 1e-9
    assert (report.counts()["merge_rows"] == 1) == merged, report
    if size == 12:
        assert _refusals(report, "would cost more multiply-adds"), report
    counts = count_ops(fused, x)
    assert counts["conv"] == 1 and counts["bn"] == (0 if merged else 1)
    other = torch.randn(3, 6, size, size, dtype=torch.float64)  # another batch and channel count
    assert rel_err(fused(other), model(other)) <= 1e-9


def test_row_maps_match_the_ops_on_fixed_samples():
    """affine.unroll / compose_rows / add_rows / from_rows against running the ops themselves."""
    from reparam import affine as A

    g = torch.Generator().manual_seed(7)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    conv = A.from_conv(r(4, 2, 3, 1), r(4), 1, (1, 0), 1, 2)  # groups 2, non-square, biased
    bn = A.channelwise(r(4), r(4), A.Layout(2))
    depthwise = A.from_conv(r(4, 1, 3, 3), None, 1, 1, 1, 4)
    dense = A.from_conv(r(4, 4, 1, 1), None)
    sample = (4, 3, 2)
    x = r(5, *sample)
    rows = {name: A.unroll(a, sample) for name, a in [("conv", conv), ("bn", bn), ("dw", depthwise), ("dense", dense)]}
    assert rows["bn"].diag is not None and rows["dw"].groups == 4 and rows["conv"].groups == 2

    def check(merged: A.RowMap, want: torch.Tensor, groups: int) -> None:
        conv1x1 = A.from_rows(merged)
        assert conv1x1.groups == groups
        assert rel_err(A.apply(conv1x1, x.reshape(5, -1, 1, 1)).reshape(want.shape), want) <= 1e-12

    conv_bn = A.compose_rows(rows["conv"], rows["bn"])
    check(A.add_rows([conv_bn, rows["dw"]]), A.apply(bn, A.apply(conv, x)) + A.apply(depthwise, x), 2)  # gcd(2, 4)
    check(
        A.add_rows([conv_bn, A.compose_rows(rows["dw"], rows["dense"])]),
        A.apply(bn, A.apply(conv, x)) + A.apply(dense, A.apply(depthwise, x)),
        1,
    )


class _BNAndPadWithoutAffine(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1, bias=False)
        self.bn = BNAndPadLayer(2, 4, affine=False)  # border: -mean / sqrt(var + eps)
        self.conv2 = nn.Conv2d(4, 4, 5, bias=False)

    def forward(self, x):
        return self.conv2(self.bn(self.conv1(x)))


def test_bn_and_pad_without_affine_fuses_to_one_conv():
    model = randomize(_BNAndPadWithoutAffine()).double()
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    fused, report = fuse_with_report(model, (x,))
    assert rel_err(fused(x), model(x)) <= 1e-9
    assert count_ops(fused, x) == {"conv": 1}, report
    for r in report.refusals:
        assert "\n" not in r.reason and len(r.reason) < 300


def test_torch_functions_with_a_trailing_underscore_are_in_place_updates():
    from reparam.passes.mutation import updates_in_place

    class Calls(nn.Module):
        def forward(self, x):
            a = torch.relu(x)  # out of place
            b = torch.relu_(a)
            c = F.relu_(b)
            return torch.sigmoid_(c)

    gm = torch.fx.symbolic_trace(Calls())
    modules = dict(gm.named_modules())
    found = {n.name: updates_in_place(n, modules) for n in gm.graph.nodes if n.op == "call_function"}
    assert found == {"relu": False, "relu_": True, "relu__1": True, "sigmoid_": True}
