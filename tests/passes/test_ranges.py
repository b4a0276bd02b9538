"""reparam.passes.ranges: the clamp-like activations' bounds, and sound intervals through pass-through ops,
sums, products and concatenations (anything unknown is unbounded)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reparam.passes.ranges import ANY, activation_bounds, value_ranges

from .conftest import Lambda, traced

INF = math.inf


def last(case):
    """The node the graph outputs."""
    return next(n for n in case.gm.graph.nodes if n.op == "output").args[0]


@pytest.mark.parametrize(
    "forward,bounds",
    [
        (lambda s, x: s.relu(x), (0.0, INF)),
        (lambda s, x: s.relu6(x), (0.0, 6.0)),
        (lambda s, x: s.hardtanh(x), (-2.0, 3.0)),
        (lambda s, x: F.relu(x), (0.0, INF)),
        (lambda s, x: F.relu6(x), (0.0, 6.0)),
        (lambda s, x: F.hardtanh(x, -0.5, 0.5), (-0.5, 0.5)),
        (lambda s, x: torch.clamp(x, min=-1.0), (-1.0, INF)),
        (lambda s, x: x.clamp(0.0, 4.0), (0.0, 4.0)),
        (lambda s, x: x.relu(), (0.0, INF)),
        (lambda s, x: torch.sigmoid(x), None),  # bounded, but not a clamp: not carried unchanged
        (lambda s, x: F.gelu(x), None),
    ],
)
def test_activation_bounds(forward, bounds):
    model = Lambda(forward, relu=nn.ReLU(), relu6=nn.ReLU6(), hardtanh=nn.Hardtanh(-2.0, 3.0))
    case = traced(model, torch.randn(2, 3))
    assert activation_bounds(last(case), dict(case.gm.named_modules())) == bounds


@pytest.mark.parametrize(
    "forward,interval",
    [
        (lambda s, x: s.pool(torch.relu(x)), (0.0, INF)),
        (lambda s, x: F.relu6(x).flatten(1), (0.0, 6.0)),
        (lambda s, x: torch.relu(x) + 1.0, (1.0, INF)),
        (lambda s, x: torch.sigmoid(x) + F.relu6(x), (0.0, 7.0)),
        (lambda s, x: torch.sigmoid(x) * F.relu6(x), (0.0, 6.0)),
        (lambda s, x: torch.cat([torch.sigmoid(x), F.hardtanh(x)], 1), (-1.0, 1.0)),
        (lambda s, x: F.relu6(torch.relu(x) + 7.0), (6.0, 6.0)),  # [7, inf) clamped to [0, 6]: [6, 6], not empty
        (lambda s, x: torch.relu(x) * -1.0, None),  # a product with a negative factor: unknown
        (lambda s, x: s.conv(torch.relu(x)), None),  # a conv can make anything
    ],
)
def test_value_ranges(forward, interval):
    model = Lambda(forward, pool=nn.MaxPool2d(2), conv=nn.Conv2d(3, 3, 1))
    case = traced(model, torch.randn(2, 3, 4, 4))
    ranges = value_ranges(case.gm)
    if interval is None:
        assert ranges.get(last(case), ANY) == ANY
    else:
        assert ranges[last(case)] == interval
