"""reparam.passes.transposed: ``bn(deconv(x)) -> deconv'(x)`` on small graphs (1-d to 3-d, groups, strides,
dilation, with and without bias), and the BatchNorm kept when the transposed conv has another reader."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from reparam.passes.transposed import fold_bn_into_transposed_convs

from .conftest import Lambda, bn, deconv, shape, traced


@pytest.mark.parametrize(
    "nd,stride,groups,dilation,bias",
    [(2, 2, 1, 1, True), (2, 1, 2, 1, False), (2, 2, 4, 2, True), (1, 3, 1, 1, False), (3, 2, 2, 1, True)],
)
def test_bn_after_a_transposed_conv_folds_into_it(nd, stride, groups, dilation, bias):
    layer = deconv(nd, 4, 8, 3, stride, 1, 0, groups, bias, dilation)
    case = traced(nn.Sequential(layer, bn(8, nd)), torch.randn(shape(nd, 4, size=5)))
    assert bool(case.run(fold_bn_into_transposed_convs))
    (folded,) = case.modules()
    assert type(folded) is type(layer) and folded.weight.shape == layer.weight.shape
    assert (folded.stride, folded.groups, folded.dilation) == (layer.stride, layer.groups, layer.dilation)
    assert folded.bias is not None
    assert case.events == {"fold_bn": 1}
    case.assert_exact()


def test_each_of_two_transposed_convs_gets_its_own_bn():
    model = nn.Sequential(deconv(2, 4, 4, 2, 2), bn(4), nn.ReLU(), deconv(2, 4, 2, 3, 1, 1), bn(2))
    case = traced(model, torch.randn(2, 4, 3, 4))
    assert bool(case.run(fold_bn_into_transposed_convs))
    assert case.module_types() == [nn.ConvTranspose2d, nn.ReLU, nn.ConvTranspose2d]
    assert case.events == {"fold_bn": 2}
    case.assert_exact()


def test_a_transposed_conv_with_another_reader_keeps_its_bn():
    def forward(s, x):
        y = s.up(x)
        return s.bn(y) + y

    case = traced(Lambda(forward, up=deconv(2, 4, 4, 2, 2), bn=bn(4)), torch.randn(2, 4, 3, 4))
    assert not case.run(fold_bn_into_transposed_convs)
    assert case.module_types() == [nn.ConvTranspose2d, nn.BatchNorm2d]
    assert case.refused("the conv output has other readers")
    case.assert_exact()


def test_an_in_place_update_of_the_output_keeps_the_bn():
    def forward(s, x):
        y = s.up(x)
        z = s.bn(y)
        y.mul_(2.0)
        return z

    case = traced(Lambda(forward, up=deconv(2, 4, 4, 2, 2), bn=bn(4)), torch.randn(2, 4, 3, 4))
    assert not case.run(fold_bn_into_transposed_convs)
    assert nn.BatchNorm2d in case.module_types()
    case.assert_exact()


def test_a_bn_after_an_ordinary_conv_is_not_this_rule():
    case = traced(nn.Sequential(nn.Conv2d(3, 4, 3), bn(4)), torch.randn(2, 3, 6, 5))
    assert not case.run(fold_bn_into_transposed_convs)
    assert case.module_types() == [nn.Conv2d, nn.BatchNorm2d]
    assert not case.report.rewrites and not case.report.refusals


def test_a_bn_without_running_statistics_is_not_folded():
    model = nn.Sequential(deconv(2, 4, 4, 2, 2), nn.BatchNorm2d(4, track_running_stats=False))
    case = traced(model, torch.randn(2, 4, 3, 4))
    assert not case.run(fold_bn_into_transposed_convs)
    assert case.module_types() == [nn.ConvTranspose2d, nn.BatchNorm2d]
    case.assert_exact()
