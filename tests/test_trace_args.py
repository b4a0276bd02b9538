"""The tracer's fast path for node arguments (:meth:`reparam.trace.Tracer.create_arg`) records the same graph as
fx's own checks: proxies, plain values, nested tuples / lists / dicts, slices, named tuples, dtypes, devices,
parameters, buffers and tensor constants."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reparam import trace as T

Pair = collections.namedtuple("Pair", "a b")


class ManyArguments(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(4))
        self.register_buffer("shift", torch.randn(4))
        self.constant = torch.arange(4.0)  # a plain tensor attribute: a traced constant

    def forward(self, x, y=None):
        x = self.conv(x)
        x = x * self.scale.reshape(1, -1, 1, 1) + self.shift.view(1, 4, 1, 1)
        x = F.pad(x, [1, 1, 0, 0], mode="constant", value=0.5)
        parts = torch.split(x, [2, 2], dim=1)
        x = torch.cat((parts[1], parts[0]), dim=1)
        x = x[:, 1:3, ..., ::2]
        x = x.to(dtype=torch.float32, device=torch.device("cpu"))
        x = x.permute(*(0, 1, 3, 2)).contiguous(memory_format=torch.contiguous_format)
        stats = {"mean": x.mean(dim=(2, 3), keepdim=True), "pair": Pair(x.amax(), None)}
        x = x - stats["mean"] + stats["pair"].a * self.constant[:2].reshape(1, 2, 1, 1)
        return [x, (x.sum(), {"k": x.flatten(1)})]


class FxChecksOnly(T.Tracer):
    """The tracer without its fast path: parameters and buffers by name, everything else through fx's checks."""

    def create_arg(self, a):
        if isinstance(a, torch.Tensor) and id(a) in self._names:
            return self.create_node("get_attr", self._names[id(a)], (), {})
        return torch.fx.Tracer.create_arg(self, a)


@pytest.mark.parametrize("model", [ManyArguments(), nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.Flatten())])
def test_fast_argument_path_records_what_fx_records(model):
    fast = T.symbolic_trace(model)
    slow = T._trace(FxChecksOnly(model), model)
    assert fast.code == slow.code
    assert [(n.op, n.target, repr(n.args), repr(n.kwargs)) for n in fast.graph.nodes] == [
        (n.op, n.target, repr(n.args), repr(n.kwargs)) for n in slow.graph.nodes
    ]
    x = torch.randn(2, 3, 6, 8)
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
