"""Verification that never cries wolf and never misses: local proofs per region, tolerances from the
model's own float64 noise, every wrong kernel caught and named."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import rel_err

import reparam
import reparam.passes.collapse as collapse
from reparam.models import create
from reparam.proofs import ORIGIN, prove, pristine_copy, tag_origins

F64_TOL = 1e-9


class NearlyCancelling(nn.Module):
    """``conv_b(x) - conv_a(x)`` with ``conv_b`` a 1e-11 relative perturbation of ``conv_a``: the output is
    mostly rounding noise of the original itself, so any other summation order differs by ~1e-5."""

    def __init__(self, c: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a = nn.Conv2d(c, c, 3, padding=1).double()
        self.b = nn.Conv2d(c, c, 3, padding=1).double()
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(self.a.weight.shape, generator=g, dtype=torch.float64))
            noise = torch.randn(self.a.weight.shape, generator=g, dtype=torch.float64)
            self.b.weight.copy_(self.a.weight * (1 + 1e-11 * noise))
            self.b.bias.copy_(self.a.bias)

    def forward(self, x):
        return self.b(x) - self.a(x)


def test_ill_conditioned_model_is_not_refused_and_both_numbers_are_reported():
    model = NearlyCancelling().eval()
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fused = reparam.fuse(model, (x,))
    report = fused.reparam_report
    noted = [n for n in report.notes if "own float64 noise" in n]
    assert report.max_rel_error > reparam.verify.TOLERANCE  # the old fixed tolerance would have refused it
    assert noted and "fused" in noted[0]


def _corrupt_every_fused_kernel(monkeypatch, delta: float):
    real = collapse.to_module

    def corrupted(*args, **kwargs):
        module = real(*args, **kwargs)
        weight = getattr(module, "weight", None)
        if weight is not None:
            with torch.no_grad():
                weight.view(-1)[0] += delta
        return module

    monkeypatch.setattr(collapse, "to_module", corrupted)


@pytest.mark.parametrize("delta", [1e-2, 1e-6])
def test_a_corrupted_fused_weight_is_caught_and_its_region_named(monkeypatch, delta):
    _corrupt_every_fused_kernel(monkeypatch, delta)
    model = create("repvgg_a0").eval()
    with pytest.raises(reparam.EquivalenceError, match=r"region stage0\.\S+ \(.+ -> .+\): the fused kernel disagrees"):
        reparam.fuse(model, (torch.randn(1, 3, 32, 32),))


def test_a_corrupted_weight_in_an_ill_conditioned_model_is_still_caught(monkeypatch):
    _corrupt_every_fused_kernel(monkeypatch, 1e-3)
    model = NearlyCancelling().eval()
    with pytest.raises(reparam.EquivalenceError, match="region"):
        reparam.fuse(model, (torch.randn(2, 8, 12, 12, dtype=torch.float64),))


def test_prove_finds_nothing_on_a_correct_fusion_and_tags_every_node():
    model = create("repvgg_a0").eval().double()
    gm = torch.fx.symbolic_trace(model)
    tag_origins(gm)
    assert all(n.meta[ORIGIN] == n.name for n in gm.graph.nodes)
    pristine = pristine_copy(gm)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    worst, disproofs = prove(gm, pristine, (x,))  # unfused against itself: every region exact
    assert disproofs == [] and worst == 0.0
    fused = reparam.fuse(model, (x,))
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= F64_TOL


class SlicesAndKeywords(nn.Module):
    """A graph whose arguments hold lists, slices and keyword arguments, and a dict output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        parts = torch.split(y, [2, 4], dim=1)
        return {"head": torch.cat([parts[1][:, 1:3], parts[0]], dim=1).sum(dim=(2, 3), keepdim=True), "y": y}


def test_the_unfused_twin_is_the_graph_as_it_was_before_the_passes_rewrote_it():
    import copy

    gm = torch.fx.symbolic_trace(SlicesAndKeywords().eval())
    tag_origins(gm)
    before = copy.deepcopy(gm.graph)
    pristine = pristine_copy(gm)
    for node in gm.graph.nodes:  # what a pass does to the live graph: rewires arguments, edits meta in place
        node.meta["tensor_meta"] = "changed"
        if node.op == "call_function" and node.target is torch.cat:
            node.args = (node.args[0][::-1],) + node.args[1:]
    twin = pristine.module().graph
    assert twin.python_code("self").src == before.python_code("self").src
    assert [(n.name, n.meta) for n in twin.nodes] == [(n.name, n.meta) for n in before.nodes]
    x = torch.randn(1, 4, 5, 5)
    model = SlicesAndKeywords().eval()
    model.load_state_dict(gm.state_dict())
    got, want = pristine.module()(x), model(x)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
