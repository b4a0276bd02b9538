"""reparam.passes.rows on small graphs: affine ops on fixed partitions, across the reshapes between them, become
one 1x1 conv over each partition's values (RepMLP's fc3 + local convs), and the refusals (too costly, too large)
keep the ops with their reasons."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import reparam.passes.rows as rows
from reparam.passes.rows import merge_rows

from .conftest import bn, traced


class FcPlusLocal(nn.Module):
    """RepMLP's form on ``(N, 2, n, n)`` partitions: ``bn(fc(x as rows)) + conv3x3(x)``, both per partition;
    ``groups=2``: both keep the two channels apart."""

    def __init__(self, n=3, groups=1):
        super().__init__()
        self.n = n
        self.fc = nn.Conv2d(2 * n * n, 2 * n * n, 1, groups=groups)
        self.bn = bn(2)
        self.local = nn.Conv2d(2, 2, 3, 1, 1, groups=groups, bias=False)

    def forward(self, x):
        n = self.n
        global_ = self.bn(self.fc(x.reshape(-1, 2 * n * n, 1, 1)).reshape(-1, 2, n, n))
        return global_ + self.local(x.reshape(-1, 2, n, n))


class Partitions(nn.Module):
    """``bn1d(conv(x.reshape(-1, 2, n, n)).reshape(-1, 2 n n))``: one chain across a reshape; ``literal``:
    partition sizes written in the model (else read from the input, so not fixed)."""

    def __init__(self, n=3, literal=True):
        super().__init__()
        self.n, self.literal = n, literal
        self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn = bn(2 * n * n, 0)

    def forward(self, x):
        n = self.n
        parts = x.reshape(-1, 2, n, n) if self.literal else x.reshape(-1, 2, x.size(2), x.size(3))
        return self.bn(self.conv(parts).reshape(-1, 2 * n * n))


def merged_conv(case) -> nn.Conv2d:
    (conv,) = case.modules()
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
    return conv


@pytest.mark.parametrize("groups", [1, 2])
def test_sum_of_chains_on_the_same_rows_becomes_one_pointwise_conv(groups):
    case = traced(FcPlusLocal(groups=groups), torch.randn(2, 2, 3, 3))
    assert bool(case.run(merge_rows))
    conv = merged_conv(case)
    assert (conv.in_channels, conv.out_channels) == (18, 18)
    assert conv.groups == groups  # as grouped as every op of the chains
    assert not case.functions()
    assert case.events == {"merge_rows": 1}
    case.assert_exact()


def test_one_chain_across_a_reshape_becomes_one_pointwise_conv():
    case = traced(Partitions(), torch.randn(4, 2, 3, 3))
    assert bool(case.run(merge_rows))
    conv = merged_conv(case)
    assert (conv.in_channels, conv.out_channels) == (18, 18)
    case.assert_exact()


def test_partitions_read_from_the_input_are_not_fixed():
    case = traced(Partitions(literal=False), torch.randn(4, 2, 3, 3))
    assert not case.run(merge_rows)
    assert case.module_types() == [nn.Conv2d, nn.BatchNorm1d]
    assert not case.report.rewrites


def test_a_merge_that_costs_more_than_its_ops_is_refused():
    """Partitions of 12x12: one dense 288x288 matrix costs far more than a 3x3 conv on them."""
    case = traced(Partitions(n=12), torch.randn(2, 2, 12, 12))
    assert not case.run(merge_rows)
    assert case.module_types() == [nn.Conv2d, nn.BatchNorm1d]
    assert case.refused("per-row merge kept: one 1x1 conv 288->288 would cost more multiply-adds than the 2 ops")
    case.assert_exact()


def test_a_matrix_over_the_size_limit_is_refused(monkeypatch):
    monkeypatch.setattr(rows, "MAX_VALUES", 18 * 18 - 1)
    case = traced(FcPlusLocal(), torch.randn(2, 2, 3, 3))
    assert not case.run(merge_rows)
    assert len(case.modules()) == 3
    assert case.refused("per-row merge kept: a 18x18 matrix is too large")
    case.assert_exact()


def test_a_chain_node_with_another_reader_ends_the_chain():
    class Tapped(FcPlusLocal):
        def forward(self, x):
            h = self.fc(x.reshape(-1, 18, 1, 1))
            return self.bn(h.reshape(-1, 2, 3, 3)) + self.local(x.reshape(-1, 2, 3, 3)), h

    case = traced(Tapped(), torch.randn(2, 2, 3, 3))
    assert not case.run(merge_rows)  # the chains now start at different tensors (fc's output, x)
    assert case.module_types() == [nn.Conv2d, nn.BatchNorm2d, nn.Conv2d]
    case.assert_exact()
