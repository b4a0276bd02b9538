"""reparam.passes.collapse on small hand-built graphs: each classic rule (fold_bn, merge_parallel, merge_concat,
compose, skip, scale / pad / pool) rewrites exactly, and each refusal leaves its ops in the graph with the reason
in the report."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reparam
from reparam.modules import ChannelAffine
from reparam.passes.collapse import Collapse
from reparam.pipeline import MAX_ROUNDS

from .conftest import Lambda, bn, conv, shape, traced


def collapse(case) -> bool:
    """The collapse pass run to its fixed point, as the pipeline runs it; whether it changed the graph."""
    changed = False
    for _ in range(MAX_ROUNDS):
        if not bool(Collapse(case.gm, case.report).run()):
            break
        changed = True
    return changed


def conv_bn(nd, cin, cout, k, stride=1, padding=0, dilation=1, groups=1, **kw) -> nn.Sequential:
    return nn.Sequential(conv(nd, cin, cout, k, stride, padding, dilation, groups, bias=False, **kw), bn(cout, nd))


# ------------------------------------------------------------------------------------------------ fold_bn


@pytest.mark.parametrize(
    "nd,stride,dilation,groups", [(2, 1, 1, 1), (2, 2, 1, 2), (2, 1, 2, 4), (1, 2, 1, 1), (3, 1, 1, 2)]
)
def test_conv_then_bn_becomes_one_conv_of_the_same_geometry(nd, stride, dilation, groups):
    case = traced(conv_bn(nd, 4, 8, 3, stride, dilation, dilation, groups), torch.randn(shape(nd, 4, size=9)))
    assert collapse(case)
    (fused,) = case.modules()
    assert type(fused) is type(conv(nd, 1, 1, 1))
    assert fused.kernel_size == (3,) * nd and fused.stride == (stride,) * nd and fused.dilation == (dilation,) * nd
    assert fused.groups == groups and fused.bias is not None
    assert case.events == {"fold_bn": 1}
    case.assert_exact()


def test_linear_then_bn1d_becomes_one_linear():
    case = traced(nn.Sequential(nn.Linear(5, 6), bn(6, 0)), torch.randn(4, 5))
    assert collapse(case)
    assert case.module_types() == [nn.Linear]
    assert case.events == {"fold_bn": 1}
    case.assert_exact()


def test_bn_then_unpadded_conv_folds_into_the_conv():
    case = traced(nn.Sequential(bn(4), nn.Conv2d(4, 6, 3, 2)), torch.randn(2, 4, 9, 8))
    assert collapse(case)
    assert case.module_types() == [nn.Conv2d]
    assert case.events == {"fold_bn": 1}
    case.assert_exact()


def test_bn_then_zero_padded_conv_is_refused_with_the_reason():
    case = traced(nn.Sequential(bn(4), nn.Conv2d(4, 6, 3, 1, 1)), torch.randn(2, 4, 7, 8))
    assert not collapse(case)
    assert case.module_types() == [nn.BatchNorm2d, nn.Conv2d]
    assert case.refused("has a bias and the 3x3 conv 4->6 after it pads with zeros")
    case.assert_exact()


def test_bn_without_running_statistics_is_refused_with_the_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4, track_running_stats=False))
    case = traced(model, torch.randn(3, 3, 6, 5))
    assert not collapse(case)
    assert case.module_types() == [nn.Conv2d, nn.BatchNorm2d]
    assert case.refused("track_running_stats=False")
    case.assert_exact()


def test_a_conv_read_by_two_users_is_not_duplicated():
    def forward(s, x):
        y = s.conv(x)
        return s.bn(y) + torch.relu(y)

    case = traced(Lambda(forward, conv=nn.Conv2d(3, 4, 3, 1, 1), bn=bn(4)), torch.randn(2, 3, 7, 6))
    collapse(case)
    assert case.module_types().count(nn.Conv2d) == 1
    case.assert_exact()


# ------------------------------------------------------------------------------------------------ merge_parallel


class RepVGG(nn.Module):
    def __init__(self, nd=2, c=4, stride=1, groups=1, padding_mode="zeros"):
        super().__init__()
        self.dense = conv_bn(nd, c, c, 3, stride, 1, groups=groups, padding_mode=padding_mode)
        self.one = conv_bn(nd, c, c, 1, stride, groups=groups)
        self.identity = bn(c, nd) if stride == 1 else None

    def forward(self, x):
        y = self.dense(x) + self.one(x)
        return y + self.identity(x) if self.identity is not None else y


@pytest.mark.parametrize("nd,stride,groups", [(2, 1, 1), (2, 2, 1), (2, 1, 4), (1, 1, 2), (3, 2, 1)])
def test_parallel_branches_become_one_conv(nd, stride, groups):
    case = traced(RepVGG(nd, 4, stride, groups), torch.randn(shape(nd, 4, size=7)))
    assert collapse(case)
    (fused,) = case.modules()
    assert fused.kernel_size == (3,) * nd and fused.stride == (stride,) * nd and fused.groups == groups
    assert not case.functions()  # no add left
    assert case.events["merge_parallel"] == (2 if stride == 1 else 1)
    assert case.events["fold_bn"] == (3 if stride == 1 else 2)
    case.assert_exact()


def test_reflect_padded_branches_merge_into_one_reflect_padded_conv():
    case = traced(RepVGG(padding_mode="reflect"), torch.randn(2, 4, 6, 5))
    assert collapse(case)
    (fused,) = case.modules()
    assert fused.padding_mode == "reflect" and fused.kernel_size == (3, 3)
    case.assert_exact()


def test_dilated_and_pointwise_branches_share_the_dilated_grid():
    model = Lambda(lambda s, x: s.a(x) + s.b(x), a=nn.Conv2d(4, 4, 3, padding=2, dilation=2), b=nn.Conv2d(4, 4, 1))
    case = traced(model, torch.randn(2, 4, 9, 8))
    assert collapse(case)
    (fused,) = case.modules()
    assert fused.kernel_size == (3, 3) and fused.dilation == (2, 2)
    case.assert_exact()


def test_skip_branch_is_counted():
    case = traced(Lambda(lambda s, x: x + s.conv(x), conv=nn.Conv2d(4, 4, 3, 1, 1)), torch.randn(2, 4, 5, 6))
    assert collapse(case)
    assert case.module_types() == [nn.Conv2d]
    assert case.events == {"merge_parallel": 1, "skip": 1}
    case.assert_exact()


def test_lone_bn_branches_become_one_channel_affine():
    case = traced(Lambda(lambda s, x: x + s.a(x) - s.b(x), a=bn(4), b=bn(4)), torch.randn(2, 4, 5, 3))
    assert collapse(case)
    assert case.module_types() == [ChannelAffine]
    assert case.events["fold_bn"] == 2
    case.assert_exact()


def test_branches_with_different_strides_are_refused():
    """A 1x1 stride-2 and a 3x3 stride-1 conv both map 4x4 to 2x2, but read different positions."""
    model = Lambda(lambda s, x: s.a(x) + s.b(x), a=nn.Conv2d(4, 4, 1, 2), b=nn.Conv2d(4, 4, 3, 1))
    case = traced(model, torch.randn(2, 4, 4, 4))
    assert not collapse(case)
    assert case.module_types() == [nn.Conv2d, nn.Conv2d]
    assert case.refused("branches have different strides")
    case.assert_exact()


def test_branches_whose_outputs_do_not_align_are_refused():
    """2x2 and 1x1 convs of stride 2 on 8x8 both give 4x4, but centred half a pixel apart."""
    model = Lambda(lambda s, x: s.a(x) + s.b(x), a=nn.Conv2d(4, 4, 2, 2), b=nn.Conv2d(4, 4, 1, 2))
    case = traced(model, torch.randn(2, 4, 8, 8))
    assert not collapse(case)
    assert case.module_types() == [nn.Conv2d, nn.Conv2d]
    assert case.refused("output positions do not align")
    case.assert_exact()


def test_reflect_and_zero_padded_branches_are_refused():
    model = Lambda(
        lambda s, x: s.a(x) + s.b(x), a=nn.Conv2d(4, 4, 3, 1, 1, padding_mode="reflect"), b=nn.Conv2d(4, 4, 3, 1, 1)
    )
    case = traced(model, torch.randn(2, 4, 6, 5))
    assert not collapse(case)
    assert len(case.modules()) == 2
    assert case.refused("cannot share a reflect-padded kernel")
    case.assert_exact()


def test_avgpool_branch_merges_into_the_conv():
    model = Lambda(lambda s, x: s.conv(x) + s.pool(x), conv=nn.Conv2d(4, 4, 3, 1, 1), pool=nn.AvgPool2d(3, 1, 1))
    case = traced(model, torch.randn(2, 4, 6, 5))
    assert collapse(case)
    assert case.module_types() == [nn.Conv2d]
    assert case.events["pool"] == 1
    case.assert_exact()


def test_avgpool_without_count_include_pad_is_refused_with_the_reason():
    pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
    case = traced(
        Lambda(lambda s, x: s.conv(x) + s.pool(x), conv=nn.Conv2d(4, 4, 3, 1, 1), pool=pool), torch.randn(2, 4, 6, 5)
    )
    assert not collapse(case)
    assert nn.AvgPool2d in case.module_types()
    assert case.refused("count_include_pad=False")
    case.assert_exact()


# ------------------------------------------------------------------------------------------------ merge_concat


@pytest.mark.parametrize("stride", [1, 2])
def test_channel_concat_of_parallel_convs_becomes_one_conv(stride):
    model = Lambda(
        lambda s, x: torch.cat([s.a(x), s.b(x)], 1), a=conv_bn(2, 3, 4, 3, stride, 1), b=conv_bn(2, 3, 2, 3, stride, 1)
    )
    case = traced(model, torch.randn(2, 3, 7, 6))
    assert collapse(case)
    (fused,) = case.modules()
    assert fused.out_channels == 6 and fused.kernel_size == (3, 3) and fused.stride == (stride, stride)
    assert torch.cat not in case.functions()
    assert case.events["merge_concat"] == 1
    case.assert_exact()


def test_concat_along_a_spatial_axis_is_refused():
    model = Lambda(lambda s, x: torch.cat([s.a(x), s.b(x)], 2), a=nn.Conv2d(3, 4, 3, 1, 1), b=nn.Conv2d(3, 4, 1))
    case = traced(model, torch.randn(2, 3, 5, 6))
    assert not collapse(case)
    assert torch.cat in case.functions() and len(case.modules()) == 2
    assert case.refused("concatenation is not along the channel axis")
    case.assert_exact()


# ------------------------------------------------------------------------------------------------ compose


def test_pointwise_then_unpadded_kxk_composes():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 4, 3))
    case = traced(model, torch.randn(2, 4, 7, 6))
    assert collapse(case)
    (fused,) = case.modules()
    assert (fused.in_channels, fused.out_channels, fused.kernel_size) == (4, 4, (3, 3))
    assert case.events == {"compose": 1}
    case.assert_exact()


def test_linear_chain_composes_channels_last():
    case = traced(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3)), torch.randn(2, 7, 6))
    assert collapse(case)
    (fused,) = case.modules()
    assert isinstance(fused, nn.Linear) and fused.weight.shape == (3, 6)
    case.assert_exact()


def test_strided_chain_composes_to_the_product_stride():
    model = nn.Sequential(nn.Conv2d(3, 4, 2, 2), nn.Conv2d(4, 4, 2, 2))
    case = traced(model, torch.randn(2, 3, 8, 8))
    assert collapse(case)
    (fused,) = case.modules()
    assert fused.stride == (4, 4) and fused.kernel_size == (4, 4)
    case.assert_exact()


def expanding_chain():
    """4 -> 1 (1x1) -> 4 (3x3): 40 multiply-adds per position; composed, a 3x3 4 -> 4 would cost 144."""
    return traced(nn.Sequential(nn.Conv2d(4, 1, 1), nn.Conv2d(1, 4, 3)), torch.randn(2, 4, 7, 6))


def test_composing_that_costs_more_is_cut():
    case = expanding_chain()
    assert not collapse(case)
    assert [m.kernel_size for m in case.modules()] == [(1, 1), (3, 3)]
    case.assert_exact()


def test_composing_that_costs_more_is_reported():
    case = expanding_chain()
    collapse(case)
    assert case.refused("would cost more MACs than it saves")


# ------------------------------------------------------------------------------------------------ scale, pad


def test_layer_scale_and_shift_fold_into_the_conv():
    gamma = nn.Parameter(torch.randn(1, 4, 1, 1))
    model = Lambda(lambda s, x: (s.conv(x) * s.gamma - 0.5) / 3.0, conv=nn.Conv2d(3, 4, 3))
    model.gamma = gamma
    case = traced(model, torch.randn(2, 3, 6, 5))
    assert collapse(case)
    assert case.module_types() == [nn.Conv2d] and not case.functions()
    assert case.events["scale"] == 3
    case.assert_exact()


@pytest.mark.parametrize("pads,symmetric", [((1, 1, 1, 1), True), ((0, 1, 2, 0), False)])
def test_explicit_zero_pad_folds_into_the_conv(pads, symmetric):
    model = Lambda(lambda s, x: s.conv(F.pad(x, pads)), conv=nn.Conv2d(3, 4, 3))
    case = traced(model, torch.randn(2, 3, 6, 5))
    assert collapse(case)
    assert F.pad not in case.functions()
    (fused,) = case.modules()
    if symmetric:
        assert isinstance(fused, nn.Conv2d) and fused.padding == (1, 1)
    else:  # one module, an explicit asymmetric pad before an unpadded conv
        assert [type(m) for m in fused] == [nn.ConstantPad2d, nn.Conv2d] and fused[1].padding == (0, 0)
    assert case.events["pad"] == 1
    case.assert_exact()


def test_asymmetric_reflect_padding_has_no_single_module_and_is_refused():
    """An even kernel with ``padding='same'`` pads one pixel more at the high end; in reflect mode no
    ConvNd spells that, so the BN after it stays."""
    model = nn.Sequential(nn.Conv2d(3, 4, 2, padding="same", padding_mode="reflect"), bn(4))
    case = traced(model, torch.randn(2, 3, 6, 5))
    assert not collapse(case)
    assert case.module_types() == [nn.Conv2d, nn.BatchNorm2d]
    assert case.refused("no single module pads asymmetrically with reflect")
    case.assert_exact()


def test_a_join_of_terms_from_different_roots_merges_from_the_common_one():
    """x1 = A(x), a biased 1x1; then B(x1) + C(x1) with B a 1x1 (composes through A, so its value starts at x)
    and C a zero-padded 3x3 (refused: A's bias would leak into the border, so its value starts at x1).
    The sum is re-expressed from x1: A stays one kernel, B + C becomes one 3x3 conv on x1."""
    model = Lambda(
        lambda s, x: s.b(x1 := s.a(x)) + s.c(x1), a=nn.Conv2d(3, 4, 1), b=nn.Conv2d(4, 4, 1), c=nn.Conv2d(4, 4, 3, 1, 1)
    )
    case = traced(model, torch.randn(2, 3, 6, 5))
    assert collapse(case)
    assert [m.kernel_size for m in case.modules()] == [(1, 1), (3, 3)]
    assert not case.functions()
    case.assert_exact()


def test_a_block_after_a_cut_still_merges():
    """Re-planning after the expanding chain's cut keeps the regions it does not touch."""
    model = nn.Sequential(nn.Conv2d(4, 1, 1), nn.Conv2d(1, 4, 3), RepVGG())
    case = traced(model, torch.randn(2, 4, 8, 7))
    assert collapse(case)
    assert [m.kernel_size for m in case.modules()] == [(1, 1), (3, 3), (3, 3)]
    assert not case.functions()
    case.assert_exact()


def test_a_chain_of_no_ops_is_removed():
    case = traced(nn.Sequential(nn.Identity(), nn.Dropout(0.1), nn.ReLU()), torch.randn(2, 3, 4, 4))
    assert collapse(case)
    assert case.module_types() == [nn.ReLU]
    assert case.nodes("call_module")[0].args[0].op == "placeholder"
    case.assert_exact()


def test_dropout_and_identity_disappear():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.Identity(), bn(4))
    case = traced(model, torch.randn(2, 3, 6, 5))
    assert collapse(case)
    assert case.module_types() == [nn.Conv2d]
    case.assert_exact()


# ------------------------------------------------------------------------------------------------ mutation


def test_a_reader_after_an_in_place_update_is_not_moved_before_it():
    """``z = bn(y)`` runs after ``y.mul_(2)``: folding bn into the conv would read y before the update."""

    def forward(s, x):
        y = s.conv(x)
        y.mul_(2.0)
        return s.bn(y) + y

    case = traced(Lambda(forward, conv=nn.Conv2d(3, 4, 3), bn=bn(4)), torch.randn(2, 3, 6, 5))
    collapse(case)
    assert nn.BatchNorm2d in case.module_types() and "mul_" in case.methods()
    case.assert_exact()


def test_a_graph_with_nothing_affine_is_left_as_it_is():
    case = traced(nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)), torch.randn(2, 3, 6, 6))
    assert not collapse(case)
    assert case.module_types() == [nn.ReLU, nn.MaxPool2d]
    assert not case.report.rewrites


class _UpdatedCopy(nn.Module):
    """``x1 = x * 1.0`` is a copy the forward then updates in place: aliasing it to ``x`` would write the caller's
    input."""

    def __init__(self, read_before: bool):
        super().__init__()
        self.conv, self.read_before = nn.Conv2d(3, 3, 1), read_before

    def forward(self, x):
        x1 = x * 1.0
        y = self.conv(x1) if self.read_before else None
        x1.add_(1)
        return (y, x1) if self.read_before else x1


@pytest.mark.parametrize("read_before", [True, False])
def test_an_identity_region_updated_in_place_is_not_aliased_to_its_input(read_before):
    model = _UpdatedCopy(read_before).eval()
    x = torch.randn(1, 3, 4, 4)
    kept = x.clone()
    fused = reparam.fuse(model, x)
    got = fused(x)
    assert torch.equal(x, kept), "the fused model wrote into its input"
    torch.testing.assert_close(got, model(kept.clone()))
