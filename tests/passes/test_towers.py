"""reparam.passes.towers on small graphs: parallel towers of one structure on one input become one tower
(concatenated first layer, block-diagonal grouped later layers, one conv or the concatenation as the join), and
towers that differ, or whose nodes have other readers, are left alone."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn

import reparam.affine as A
from reparam.passes.towers import merge_towers

from .conftest import conv, shape, traced


class Towers(nn.Module):
    """``join_i(conv_b_i(act(conv_a_i(x))))`` over ``paths`` towers, joined by a sum (plus ``extra``) or a cat."""

    def __init__(self, nd=2, paths=3, cin=4, width=2, cout=4, k=3, stride=1, join="sum", extra=False, act=None):
        super().__init__()
        self.a = nn.ModuleList([conv(nd, cin, width, k, stride, k // 2) for _ in range(paths)])
        self.act = nn.ModuleList([act or nn.ReLU() for _ in range(paths)])
        self.b = nn.ModuleList([conv(nd, width, cout, k, 1, k // 2) for _ in range(paths)])
        self.join, self.extra = join, extra

    def forward(self, x):
        heads = [b(act(a(x))) for a, act, b in zip(self.a, self.act, self.b, strict=True)]
        if self.join == "cat":
            return torch.cat(heads, 1)
        out = heads[0]
        for h in heads[1:]:
            out = out + h
        return out + x if self.extra else out


def convs(case) -> list:
    return [m for m in case.modules() if isinstance(m, nn.modules.conv._ConvNd)]


@pytest.mark.parametrize("nd,stride", [(2, 1), (2, 2), (1, 1), (3, 1)])
def test_summed_towers_become_one_tower(nd, stride):
    case = traced(Towers(nd, stride=stride), torch.randn(shape(nd, 4, size=6)))
    assert bool(case.run(merge_towers))
    first, last = convs(case)
    assert (first.in_channels, first.out_channels, first.groups, first.stride) == (4, 6, 1, (stride,) * nd)
    assert (last.in_channels, last.out_channels, last.groups) == (6, 4, 1)  # the sum: one conv over all paths
    assert case.module_types().count(nn.ReLU) == 1
    assert not case.functions()
    assert case.events == {"merge_towers": 1}
    case.assert_exact()


@pytest.mark.parametrize("act", [lambda s, x: torch.relu(x), lambda s, x: x.sigmoid()])
def test_functional_activations_run_once_on_the_merged_tower(act):
    case = traced(FunctionalTowers(act), torch.randn(2, 4, 6, 5))
    assert bool(case.run(merge_towers))
    assert len(convs(case)) == 2 and len(case.functions() + case.methods()) == 1  # the activation, once
    case.assert_exact()


class FunctionalTowers(Towers):
    """Two towers whose activation is a function or method call (``act(self, x)``), not a module."""

    def __init__(self, act):
        super().__init__(paths=2)
        self.fn = act

    def forward(self, x):
        return self.b[0](self.fn(self, self.a[0](x))) + self.b[1](self.fn(self, self.a[1](x)))


def test_a_sum_with_an_extra_addend_keeps_only_that_add():
    case = traced(Towers(extra=True), torch.randn(2, 4, 6, 5))
    assert bool(case.run(merge_towers))
    assert len(convs(case)) == 2
    assert case.functions() == [operator.add]
    case.assert_exact()


def test_concatenated_towers_become_one_tower_with_grouped_layers():
    case = traced(Towers(join="cat"), torch.randn(2, 4, 6, 5))
    assert bool(case.run(merge_towers))
    first, last = convs(case)
    assert (first.out_channels, first.groups) == (6, 1)
    assert (last.in_channels, last.out_channels, last.groups) == (6, 12, 3)  # block-diagonal: one group per path
    assert torch.cat not in case.functions()
    case.assert_exact()


def test_towers_of_different_structure_are_left_alone():
    model = Towers(paths=2)
    model.act[1] = nn.GELU()
    case = traced(model, torch.randn(2, 4, 6, 5))
    assert not case.run(merge_towers)
    assert len(convs(case)) == 4
    assert not case.report.rewrites


def test_a_tower_node_with_another_reader_is_left_alone():
    class Tapped(Towers):
        def forward(self, x):
            h = self.a[0](x)
            y = self.b[0](self.act[0](h)) + self.b[1](self.act[1](self.a[1](x)))
            return y, h

    case = traced(Tapped(paths=2), torch.randn(2, 4, 6, 5))
    assert not case.run(merge_towers)
    assert len(convs(case)) == 4
    case.assert_exact()


def test_a_single_layer_of_parallel_convs_is_left_to_collapse():
    class OneLayer(Towers):
        def forward(self, x):
            return self.a[0](x) + self.a[1](x)

    case = traced(OneLayer(paths=2), torch.randn(2, 4, 6, 5))
    assert not case.run(merge_towers)
    assert len(convs(case)) == 2


def test_a_refused_merge_keeps_the_towers_with_the_reason(monkeypatch):
    def refuse(_):
        raise A.Refusal("paths end in convolutions of different shapes")

    monkeypatch.setattr(A, "sum_over_inputs", refuse)
    case = traced(Towers(paths=2), torch.randn(2, 4, 6, 5))
    assert not case.run(merge_towers)
    assert len(convs(case)) == 4
    assert case.refused("parallel paths kept: paths end in convolutions of different shapes")
    case.assert_exact()
