"""reparam.passes.cleanup: assertions on a tensor's rank / dtype / device are dropped (they cannot fail on inputs
the original accepts), assertions on values or sizes are kept, and tensors nothing reads are deleted."""

from __future__ import annotations

import torch
import torch.nn as nn

from reparam.passes.cleanup import drop_static_asserts, drop_unused_tensors, finish

from .conftest import Lambda, traced


def asserts(case) -> int:
    return case.functions().count(torch._assert)


def test_rank_and_dtype_assertions_are_dropped():
    def forward(s, x):
        torch._assert(x.ndim == 4, "expected a 4-d input")
        torch._assert((x.dim() == 4) & (x.dtype == torch.float64), "expected a float64 4-d input")
        return s.bn(x)

    case = traced(Lambda(forward, bn=nn.BatchNorm2d(3)), torch.randn(2, 3, 4, 4))
    assert asserts(case) == 2
    assert bool(drop_static_asserts(case.gm))
    assert asserts(case) == 0
    assert [n.op for n in case.gm.graph.nodes] == ["placeholder", "call_module", "output"]  # the checks' reads too
    case.assert_exact()


def test_assertions_on_values_or_sizes_are_kept():
    def forward(s, x):
        torch._assert(x.shape[1] == 3, "three channels")  # a size: other inputs may differ
        torch._assert(x.abs().sum() >= 0, "finite")  # a value
        return x * 2.0

    case = traced(Lambda(forward), torch.randn(2, 3, 4, 4))
    assert not drop_static_asserts(case.gm)
    assert asserts(case) == 2
    case.assert_exact()


def test_tensors_no_node_reads_are_deleted():
    model = Lambda(lambda s, x: x * s.scale)
    model.scale = nn.Parameter(torch.randn(3))
    case = traced(model, torch.randn(2, 3))
    case.gm.register_buffer("folded", torch.randn(3, dtype=torch.float64))
    case.gm.register_parameter("stale", nn.Parameter(torch.randn(3, dtype=torch.float64)))
    drop_unused_tensors(case.gm)
    assert set(dict(case.gm.named_parameters())) | set(dict(case.gm.named_buffers())) == {"scale"}


def test_finish_drops_dead_nodes_and_their_modules():
    case = traced(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), torch.randn(2, 3, 4, 4))
    output = next(n for n in case.gm.graph.nodes if n.op == "output")
    conv = next(n for n in case.gm.graph.nodes if n.op == "call_module" and n.target == "0")
    output.args = (conv,)  # the ReLU is dead now
    finish(case.gm)
    assert case.module_types() == [nn.Conv2d]
    assert not hasattr(case.gm, "1")
