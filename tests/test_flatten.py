"""Flat call targets: every fused GraphModule calls its kernels as attributes of itself, named after their paths."""

from __future__ import annotations

import io
import re

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import reparam
from conftest import random_bn, rel_err
from reparam.flatten import flatten_targets

torch.set_num_threads(1)


def conv_bn(cin, cout, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), random_bn(nn.BatchNorm2d(cout)))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = conv_bn(c, c)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


class Nested(nn.Module):
    """stages.<i>.blocks.<j>: the layout of timm's models; a parameter read through two paths."""

    def __init__(self, c=4):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.stages = nn.ModuleList(nn.Module() for _ in range(2))
        for stage in self.stages:
            stage.blocks = nn.Sequential(Block(c), Block(c))
        self.stages[0].gamma = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)
        self.stages[1].gamma = self.stages[0].gamma  # one parameter, two paths
        self.register_buffer("offset", torch.randn(1, c, 1, 1), persistent=False)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for stage in self.stages:
            x = torch.maximum(torch.sigmoid(stage.blocks(x)), stage.gamma)  # not affine: gamma stays a tensor
        return torch.minimum(x, self.offset)


def dotted_reads(code: str) -> list:
    """Nested attribute walks in generated code: ``self.a.b``, ``getattr(self.a, "0")``, ``getattr(self, "0").b``,
    ``getattr(getattr(...``; one ``getattr(self, "0_conv")`` (a name that is no identifier) is a single lookup."""
    return re.findall(r'self\.\w+\.\w|getattr\((?:getattr|self\.)|getattr\(self, "[^"]+"\)\.', code)


def test_fused_code_calls_flat_names_that_say_where_each_kernel_came_from():
    model = Nested().eval()
    x = torch.randn(2, 3, 8, 8)
    fused, report = reparam.fuse_with_report(model, (x,))
    assert isinstance(fused, fx.GraphModule)
    assert not dotted_reads(fused.code), fused.code
    targets = [n.target for n in fused.graph.nodes if n.op in ("call_module", "get_attr")]
    assert all("." not in t for t in targets), targets
    assert "stages_0_blocks_1_conv_reparam" in targets or any(t.startswith("stages_0_blocks_1") for t in targets)
    assert rel_err(fused(x), model(x)) <= 1e-6
    # the report names the original module paths: it is written before flattening
    assert any(r.where.startswith("stages.0.blocks") for r in report.rewrites), report


def test_shared_parameters_and_buffer_kinds_are_kept():
    model = Nested().eval()
    x = torch.randn(1, 3, 8, 8)
    fused = reparam.fuse(model, (x,))
    gammas = [n.target for n in fused.graph.nodes if n.op == "get_attr" and "gamma" in n.target]
    assert len(set(gammas)) == 1, gammas  # one parameter, read by both stages under one name
    assert isinstance(getattr(fused, gammas[0]), nn.Parameter)
    assert "offset" not in fused.state_dict() and "offset" in dict(fused.named_buffers())  # still non-persistent
    state = fused.state_dict()
    assert all("." not in key.rsplit(".", 1)[0] for key in state), list(state)  # <flat module>.<tensor>
    fused.load_state_dict(state)
    half = reparam.fuse(model, (x,)).half()
    assert {t.dtype for t in half.state_dict().values()} == {torch.float16}


def test_a_shared_module_stays_one_object_under_one_name():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Module()
            self.inner.proj = nn.Conv2d(3, 3, 1)
            self.alias = self.inner.proj
            self.body = conv_bn(3, 3)

        def forward(self, x):
            return self.inner.proj(torch.relu(self.body(x))) + self.alias(x).tanh()

    gm = fx.symbolic_trace(Shared().eval())
    proj = gm.inner.proj
    moved = flatten_targets(gm)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert moved["inner.proj"] == "inner_proj" and calls.count("inner_proj") == 2, calls
    assert gm.inner_proj is proj and sum(m is proj for m in gm.modules()) == 1
    assert set(dict(gm.named_children())) == {"inner_proj", "body_0", "body_1"}
    assert not dotted_reads(gm.code)


def test_nested_getattr_chains_of_sequential_indices_are_gone():
    model = nn.Sequential(nn.Sequential(conv_bn(3, 4), nn.ReLU()), nn.Sequential(conv_bn(4, 4), nn.ReLU())).eval()
    x = torch.randn(1, 3, 6, 6)
    fused = reparam.fuse(model, (x,))
    assert not dotted_reads(fused.code), fused.code
    names = [n.target for n in fused.graph.nodes if n.op == "call_module"]
    assert names == ["0_0_reparam", "0_1", "1_0_reparam", "1_1"], names
    assert [name for name, _ in fused.named_children()] == names  # listed in the order the forward calls them
    assert rel_err(fused(x), model(x)) <= 1e-6


def test_fused_parts_are_flat_inside_and_stay_at_their_paths():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Sequential(conv_bn(3, 4), nn.ReLU()), conv_bn(4, 4))

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent: the whole model does not trace
                return x
            return self.features(x)

    model = Untraceable().eval()
    x = torch.randn(1, 3, 6, 6)
    fused = reparam.fuse(model, (x,))
    part = fused.features
    assert isinstance(part, fx.GraphModule) and not dotted_reads(part.code), part.code
    assert all(key.startswith("features.") for key in fused.state_dict())
    assert rel_err(fused(x), model(x)) <= 1e-6


def test_a_flat_model_round_trips_through_save_and_load():
    model = Nested().eval()
    x = torch.randn(1, 3, 8, 8)
    fused = reparam.fuse(model, (x,))
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), fused(x))
    exported = torch.export.export(fused, (x,))
    assert rel_err(exported.module()(x), fused(x)) <= 1e-6


class StandardizedConv(nn.Conv2d):
    """A weight-standardized convolution (as timm's StdConv2d): its weight-only arithmetic folds into a constant, so
    the raw weight is read by no node of the fused graph, while its bias still is."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, padding=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_only_the_tensors_the_result_keeps_are_cast_back(monkeypatch, dtype):
    """The fused model is flattened before it is cast back: the weights the passes replaced (the raw weight of a
    standardized convolution) are dropped, not converted first; what is kept comes back in the model's dtype."""
    from reparam import pipeline

    cast = []
    original = pipeline._cast_back

    def counting(fused, *args):
        cast.append(sum(t.numel() for t in list(fused.parameters()) + list(fused.buffers())))
        return original(fused, *args)

    monkeypatch.setattr(pipeline, "_cast_back", counting)
    model = nn.Sequential(StandardizedConv(3, 8, 3), nn.ReLU(), StandardizedConv(8, 8, 3)).eval().to(dtype)
    x = torch.randn(1, 3, 12, 12, dtype=dtype)
    fused = reparam.fuse(model, x)
    kept = list(fused.parameters()) + list(fused.buffers())
    assert cast == [sum(t.numel() for t in kept)]  # the raw weights went first
    assert {t.dtype for t in kept} == {dtype} and fused(x).dtype == dtype
