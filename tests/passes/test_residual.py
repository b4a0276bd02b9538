"""reparam.passes.residual on small graphs: ``act(conv2(act(conv1(x))) + S(x))`` becomes a plain chain that
carries ``x`` in extra channels (``[x]`` when ``x >= 0`` is proven, ``[x, -x]`` through ReLUs otherwise), and each
refusal keeps the add with its reason."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn

from reparam.passes.residual import remove_residuals

from .conftest import Lambda, conv, shape, traced


class Basic(nn.Module):
    """``relu(conv2(act(conv1(pre(x)))) + skip(pre(x)))``; ``pre`` decides what is proven about the block input."""

    def __init__(self, nd=2, c=4, mid=6, stride=1, pre=None, act=None, skip=None):
        super().__init__()
        self.pre = pre or nn.Identity()
        self.conv1 = conv(nd, c, mid, 3, stride, 1)
        self.act = act or nn.ReLU()
        self.conv2 = conv(nd, mid, skip.out_channels if skip is not None else c, 3, 1, 1)
        self.skip = skip
        self.out = nn.ReLU()

    def forward(self, x):
        x = self.pre(x)
        y = self.conv2(self.act(self.conv1(x)))
        return self.out(y + (self.skip(x) if self.skip is not None else x))


def carried(case) -> list:
    """(in, out) channels of the convs the rewrite left (``*_carry`` modules)."""
    return [(m.in_channels, m.out_channels) for m in case.modules() if isinstance(m, nn.modules.conv._ConvNd)]


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_a_non_negative_input_is_carried_once(nd):
    case = traced(Basic(nd, pre=nn.ReLU()), torch.randn(shape(nd, 4, size=5)))
    assert bool(case.run(remove_residuals))
    assert not case.functions()  # the add is gone
    assert carried(case) == [(4, 6 + 4), (6 + 4, 4)]
    assert case.events == {"remove_residual": 1}
    assert "carrying 4 extra channels" in case.report.rewrites[0].after
    case.assert_exact()


def test_an_input_of_any_sign_is_carried_as_its_two_halves():
    case = traced(Basic(), torch.randn(2, 4, 6, 5))
    assert bool(case.run(remove_residuals))
    assert not case.functions()
    assert carried(case) == [(4, 6 + 8), (6 + 8, 4)]
    assert "carrying 8 extra channels" in case.report.rewrites[0].after
    case.assert_exact()


def test_a_strided_block_with_a_pointwise_projection():
    skip = nn.Conv2d(4, 8, 1, 2)
    case = traced(Basic(stride=2, pre=nn.ReLU(), skip=skip), torch.randn(2, 4, 8, 7))
    assert bool(case.run(remove_residuals))
    assert not case.functions()
    assert carried(case) == [(4, 6 + 4), (6 + 4, 8)]
    case.assert_exact()


def test_relu6_on_a_bounded_input_is_carried():
    case = traced(Basic(pre=nn.Sigmoid(), act=nn.ReLU6()), torch.randn(2, 4, 6, 5))
    assert bool(case.run(remove_residuals))
    assert not case.functions()
    case.assert_exact()


def test_relu6_on_a_non_negative_unbounded_input_is_refused():
    case = traced(Basic(pre=nn.ReLU(), act=nn.ReLU6()), torch.randn(2, 4, 6, 5))
    assert not case.run(remove_residuals)
    assert len(case.functions()) == 1  # the add
    assert case.refused("residual kept: an activation would clip the carried input")
    case.assert_exact()


def test_relu6_on_an_input_of_any_sign_is_refused():
    case = traced(Basic(act=nn.ReLU6()), torch.randn(2, 4, 6, 5))
    assert not case.run(remove_residuals)
    assert len(case.functions()) == 1
    assert case.refused("the block input can be negative and an activation is not ReLU")
    case.assert_exact()


def test_a_skip_that_is_not_pointwise_is_refused():
    case = traced(Basic(pre=nn.ReLU(), skip=nn.Conv2d(4, 4, 3, 1, 1)), torch.randn(2, 4, 6, 5))
    assert not case.run(remove_residuals)
    assert len(case.functions()) == 1
    assert case.refused("the skip is not a pointwise projection on the body's output grid")
    case.assert_exact()


def test_without_shapes_the_block_is_refused():
    case = traced(Basic(pre=nn.ReLU()), torch.randn(2, 4, 6, 5), shapes=False)
    assert not case.run(remove_residuals)
    assert case.refused("block input shape unknown")
    case.assert_exact()


def test_a_single_conv_body_is_not_a_residual_block():
    """``x + conv(x)`` is a skip the collapse pass merges; this rule needs an activation to carry x through."""
    case = traced(
        Lambda(lambda s, x: torch.relu(s.conv(x) + x), conv=nn.Conv2d(4, 4, 3, 1, 1)), torch.randn(2, 4, 6, 5)
    )
    assert not case.run(remove_residuals)
    assert not case.report.rewrites and not case.report.refusals


def test_a_body_conv_with_another_reader_is_left_alone():
    class Tapped(Basic):
        def forward(self, x):
            x = self.pre(x)
            h = self.conv1(x)
            return self.out(self.conv2(self.act(h)) + x), h

    case = traced(Tapped(pre=nn.ReLU()), torch.randn(2, 4, 6, 5))
    assert not case.run(remove_residuals)
    assert case.functions() == [operator.add]
    case.assert_exact()
