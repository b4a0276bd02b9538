"""Sibling merge: convs / linears reading the same tensor -> one kernel with concatenated outputs and a view each.

Exactness is checked in float64 (relative L2 error at most 1e-12) through ``reparam.fuse`` (verification on) and on
the pass alone on traced graphs; each merge asks the cost model, and a refused one is in the report with its reason.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import reparam
from conftest import count_ops, random_bn, rel_err
from reparam import trace as T
from reparam.cost import Decision, MacCost
from reparam.errors import EquivalenceError
from reparam.passes import siblings
from reparam.passes.siblings import merge_siblings
from reparam.proofs import ORIGIN, REWRITE, tag_origins
from reparam.report import Report

EXACT = 1e-12
torch.set_num_threads(1)


class Always:
    """A cost model that accepts every merge (as a latency model may, where one wide kernel is faster)."""

    name = "always"

    def __init__(self):
        self.asked = []

    def decide(self, candidate):
        self.asked.append(candidate)
        return Decision(True, "accepted")


class Heads(nn.Module):
    """Inception-style heads: convs on one input, each followed by its own nonlinear path."""

    def __init__(self, cin=6, kernels=((3, 1), (3, 1), (1, 0)), outs=(5, 7, 4), stride=1, bias=(True, False, True)):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, o, k, stride, p, bias=b) for (k, p), o, b in zip(kernels, outs, bias, strict=True)
        )
        self.bns = nn.ModuleList(random_bn(nn.BatchNorm2d(o)) for o in outs)

    def forward(self, x):
        pairs = enumerate(zip(self.convs, self.bns, strict=True))
        return tuple(torch.relu(bn(conv(x))) * (i + 1) for i, (conv, bn) in pairs)


def fuse(model, *xs, **kw):
    model = model.double().eval()
    xs = tuple(x.double() for x in xs)
    fused, report = reparam.fuse_with_report(model, xs, **kw)
    return model, fused, report, xs


def assert_exact(fused, model, *xs):
    with torch.no_grad():
        got, want = fused(*xs), model(*xs)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= EXACT


def merges(report):
    return [r for r in report.rewrites if "merge_siblings" in r.events]


def traced(model, *xs):
    model = model.double().eval()
    gm = T.symbolic_trace(copy.deepcopy(model))
    T.propagate_shapes(gm, [x.double() for x in xs])
    tag_origins(gm)
    return model, gm


# -- the MAC-neutral merge ------------------------------------------------------------------------------------------


def test_same_geometry_siblings_become_one_conv_with_views():
    model, fused, report, (x,) = fuse(Heads(kernels=((3, 1),) * 3), torch.randn(2, 6, 9, 9))
    assert_exact(fused, model, x)
    (rewrite,) = merges(report)
    assert rewrite.where  # the block's path; at the root, the first sibling's node (real models: below)
    assert rewrite.before.count("3x3 conv 6->") == 3 and "3x3 conv 6->16" in rewrite.after
    assert count_ops(fused, x)["conv"] == 1 and count_ops(model, x)["conv"] == 3
    narrows = [n for n in fused.graph.nodes if n.target is torch.narrow]
    assert len(narrows) == 3


def test_bias_concatenated_with_zeros_where_a_sibling_has_none():
    model, fused, report, (x,) = fuse(
        Heads(kernels=((3, 1),) * 3, bias=(False, True, False)).eval(), torch.randn(1, 6, 8, 8)
    )
    assert_exact(fused, model, x)
    kernel = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert kernel.out_channels == 16 and kernel.bias is not None  # BN shifts give every sibling a bias here

    class Plain(nn.Module):
        def __init__(self, bias):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 3, 1, bias=bias[0]), nn.Conv2d(4, 5, 1, bias=bias[1])

        def forward(self, x):
            return torch.relu(self.a(x)), torch.sigmoid(self.b(x))

    for bias in ((False, True), (False, False)):
        model, fused, report, (x,) = fuse(Plain(bias), torch.randn(2, 4, 5, 5))
        assert_exact(fused, model, x)
        (kernel,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
        assert (kernel.bias is None) == (bias == (False, False))
        if kernel.bias is not None:
            assert torch.equal(kernel.bias[:3], torch.zeros(3, dtype=torch.float64))


def test_outputs_are_views_no_copy_kernel():
    model, fused, _, (x,) = fuse(Heads(kernels=((3, 1),) * 3), torch.randn(1, 6, 9, 9))
    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.name())
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Ops():
        fused(x)
    assert not [op for op in seen if any(word in op for word in ("copy", "clone", "cat", "contiguous"))], seen
    assert any("narrow" in op or "slice" in op for op in seen), seen


def test_inception_heads_of_torchvision_googlenet_merge_under_macs():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False).eval()
    x = torch.randn(1, 3, 64, 64)
    fused, report = reparam.fuse_with_report(model, (x,))
    done = merges(report)
    assert len(done) == 9 and {r.where for r in done} >= {"inception3a", "inception5b"}
    assert all("1x1 conv" in r.before and r.before.count("+") == 2 for r in done)
    assert report.max_rel_error <= 1e-10
    assert count_ops(fused, x)["conv"] == count_ops(model, x)["conv"] - 18


def test_resnet_blocks_what_really_shares_an_input():
    timm = pytest.importorskip("timm")
    x = torch.randn(1, 3, 64, 64)
    # resnet18: a downsampling block's 3x3 s2 and its 1x1 s2 downsample share the input, but the 1x1 embedded in a
    # 3x3 costs MACs: refused under MacCost, with the reason
    report = reparam.fuse_with_report(timm.create_model("resnet18", pretrained=False).eval(), (x,))[1]
    assert not merges(report)
    refused = [r for r in report.refusals if r.reason.startswith("siblings")]
    assert [r.where for r in refused] == ["layer2.0", "layer3.0", "layer4.0"]
    assert all("more MACs" in r.reason for r in refused)
    # resnet50: the bottleneck's first 1x1 is stride 1, the downsample stride 2 (not siblings) except in layer1.0
    fused, report = reparam.fuse_with_report(timm.create_model("resnet50", pretrained=False).eval(), (x,))
    assert [(r.where, r.before) for r in merges(report)] == [("layer1.0", "1x1 conv 64->256 + 1x1 conv 64->64")]
    assert report.max_rel_error <= 1e-10


def test_separate_key_value_linears_of_timm_cait_merge():
    timm = pytest.importorskip("timm")
    model = timm.create_model("cait_xxs24_224", pretrained=False, img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    fused, report = reparam.fuse_with_report(model, (x,))
    done = merges(report)
    assert [r.where for r in done] == ["blocks_token_only.0.attn", "blocks_token_only.1.attn"]
    assert all(r.before == "linear 192->192 + linear 192->192" for r in done)
    assert report.max_rel_error <= 1e-10


# -- linears ----------------------------------------------------------------------------------------------------------


class QKV(nn.Module):
    def __init__(self, c=8, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c, bias=False), nn.Linear(c, c)

    def forward(self, x):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        k = self.k(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)  # .view reads strides
        v = self.v(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return (attn @ v).transpose(1, 2).reshape(b, n, c)


def test_separate_qkv_linears_become_one_linear():
    model, fused, report, (x,) = fuse(QKV(), torch.randn(2, 5, 8))
    assert_exact(fused, model, x)
    (rewrite,) = merges(report)
    assert rewrite.before == "linear 8->8 + linear 8->8 + linear 8->8" and rewrite.after.startswith("linear 8->24")
    assert count_ops(fused, x)["linear"] == count_ops(model, x)["linear"] - 2
    for other in (torch.randn(3, 7, 8, dtype=torch.float64), torch.randn(1, 1, 8, dtype=torch.float64)):
        assert_exact(fused, model, other)  # the .view of a narrowed tensor works at every batch size


# -- when not to merge ----------------------------------------------------------------------------------------------


def test_different_strides_are_not_siblings():
    model, fused, report, (x,) = fuse(
        Heads(kernels=((1, 0), (1, 0)), outs=(3, 4), bias=(True, True)), torch.randn(1, 6, 8, 8)
    )
    assert len(merges(report)) == 1  # control: same stride merges

    class Strides(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 3, 1, stride=2)

        def forward(self, x):
            return torch.relu(self.a(x)), torch.relu(self.b(x))

    model, fused, report, (x,) = fuse(Strides(), torch.randn(1, 4, 8, 8))
    assert not merges(report) and not [r for r in report.refusals if r.reason.startswith("siblings")]


def test_uncentred_kernels_are_not_siblings():
    """3x3 without padding and 1x1: their outputs have different sizes, nothing lines up."""
    model, fused, report, (x,) = fuse(
        Heads(kernels=((3, 0), (1, 0)), outs=(3, 4), bias=(True, True)), torch.randn(1, 6, 8, 8)
    )
    assert not merges(report)
    assert_exact(fused, model, x)


def test_embedding_a_smaller_kernel_is_a_cost_decision():
    """3x3 pad 1 and 1x1 pad 0: exact in one 3x3, but more MACs: MacCost refuses, a permissive model merges."""
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    model, gm = traced(Heads(kernels=((3, 1), (1, 0)), outs=(5, 4), bias=(True, True)), x)
    report = Report()
    assert not merge_siblings(gm, report, MacCost())
    (refusal,) = [r for r in report.refusals if r.reason.startswith("siblings")]
    assert "more MACs" in refusal.reason and "3x3 conv 6->5 + 1x1 conv 6->4" in refusal.reason

    forms = []

    class Weighs(Always):
        def decide(self, candidate):
            forms.append((candidate.before(), candidate.after()))  # built while the graph is as the candidate saw it
            return super().decide(candidate)

    always = Weighs()
    report = Report()
    result = merge_siblings(gm, report, always)
    assert result.changed == 1 and len(result.created) == 1 and not result.shapes_stale
    (candidate,) = always.asked
    assert candidate.kind == "merge_siblings" and candidate.before_kernels == 2 and candidate.after_kernels == 1
    assert candidate.input_shapes == (torch.Size([2, 6, 7, 7]),)
    outputs = 2 * 7 * 7  # FlopCounterMode's currency (reparam.cost.conv_macs): per output element, the batch included
    assert candidate.before_macs == pytest.approx(outputs * (5 * 6 * 9 + 4 * 6))
    assert candidate.after_macs == pytest.approx(outputs * 9 * 6 * 9)
    ((before, after),) = forms
    with torch.no_grad():
        want = before(x)
        got = after(x.to("meta"))  # the merged form without its weights (reparam.cost.stand_in): shapes only
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in want]
    assert any(r.events == ("merge_siblings",) for r in report.rewrites)
    with torch.no_grad():
        for g, w in zip(gm(x), model(x), strict=True):
            assert rel_err(g, w) <= EXACT


def test_siblings_joined_by_one_concat_are_left_to_collapse():
    """cat([3x3(x), 1x1(x)]) is collapse's merge_concat: refused there for its MACs, it is not weighed again."""

    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], 1)

    model, fused, report, (x,) = fuse(Cat(), torch.randn(1, 4, 6, 6))
    assert not [r for r in report.refusals if r.reason.startswith("siblings")], report
    assert [d.kind for d in report.decisions] == ["merge_concat"]
    assert_exact(fused, model, x)


def test_siblings_whose_merge_would_pad_asymmetrically_are_refused():
    class Same(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 3, 2, padding="same"), nn.Conv2d(4, 5, 2, padding="same")

        def forward(self, x):
            return torch.relu(self.a(x)), torch.relu(self.b(x))

    model, fused, report, (x,) = fuse(Same(), torch.randn(1, 4, 5, 5))
    assert not merges(report)
    assert any("pads asymmetrically" in r.reason for r in report.refusals if r.reason.startswith("siblings"))
    assert_exact(fused, model, x)


def test_an_input_updated_in_place_between_siblings_is_left_alone():
    class Between(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 3, 1)

        def forward(self, x):
            x = torch.tanh(x)
            y = torch.relu(self.a(x))
            x.add_(1.0)  # b reads x after this update: moving b next to a would read it before
            return y, torch.relu(self.b(x))

    model, fused, report, (x,) = fuse(Between(), torch.randn(1, 4, 5, 5))
    assert not merges(report)
    assert_exact(fused, model, x)


def test_outputs_updated_in_place_still_merge():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.act(self.a(x)), self.b(x).sigmoid_() + 1

    model, fused, report, (x,) = fuse(InPlace(), torch.randn(2, 4, 6, 6))
    assert len(merges(report)) == 1
    assert_exact(fused, model, x)


def test_dtypes_differ_not_merged_and_merged_module_gets_the_siblings_dtype():
    x = torch.randn(1, 6, 6, 6, dtype=torch.float64)
    model, gm = traced(Heads(kernels=((1, 0), (1, 0)), outs=(3, 4), bias=(True, True)), x)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_module" and "convs" in str(n.target)]
    dtypes = {f"{targets[0]}.weight": torch.float16, f"{targets[1]}.weight": torch.float32}
    assert not merge_siblings(gm, Report(), Always(), dtypes)
    dtypes = {f"{targets[0]}.weight": torch.bfloat16}  # the other: a module a pass made, of the default dtype
    assert not merge_siblings(gm, Report(), Always(), dict(dtypes), default_dtype=torch.float32)
    result = merge_siblings(gm, Report(), Always(), dtypes, default_dtype=torch.bfloat16)
    (name,) = result.created
    assert result.replaces == {name: tuple(targets)}  # the pipeline gives it the first sibling's dtype
    assert dtypes == {f"{targets[0]}.weight": torch.bfloat16}  # the pass never writes the pipeline's map

    model = Heads(kernels=((1, 0), (1, 0)), outs=(3, 4), bias=(True, True)).eval()
    fused = reparam.fuse(model, (torch.randn(1, 6, 6, 6),), dtype=torch.float16)
    assert {p.dtype for p in fused.parameters()} == {torch.float16}


def test_views_reaching_the_output_or_a_stride_read_are_made_contiguous():
    class Escapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 5, 1)

        def forward(self, x):
            return self.a(x), self.b(x).view(x.shape[0], -1)

    model, fused, report, (x,) = fuse(Escapes(), torch.randn(2, 4, 3, 3))
    assert len(merges(report)) == 1
    for batch in (1, 2, 3):
        other = torch.randn(batch, 4, 3, 3, dtype=torch.float64)
        out = fused(other)
        assert out[0].is_contiguous()
        assert_exact(fused, model, other)


# -- proofs ---------------------------------------------------------------------------------------------------------


def test_views_carry_the_siblings_origins():
    x = torch.randn(1, 6, 6, 6, dtype=torch.float64)
    _, gm = traced(Heads(kernels=((1, 0), (1, 0)), outs=(3, 4), bias=(True, True)), x)
    origins = {n.meta[ORIGIN] for n in gm.graph.nodes if n.op == "call_module" and "convs" in str(n.target)}
    merge_siblings(gm, Report(), MacCost())
    views = [n for n in gm.graph.nodes if n.target is torch.narrow]
    assert {v.meta[ORIGIN] for v in views} == origins
    assert all("->" in v.meta[REWRITE] for v in views)


def test_a_wrong_sibling_merge_is_named_by_the_proofs(monkeypatch):
    real = siblings._kernel

    def wrong(affines, device):
        module = real(affines, device)
        with torch.no_grad():
            module.weight[-1].mul_(1 + 1e-6)  # the last sibling's channels, slightly off
        return module

    monkeypatch.setattr(siblings, "_kernel", wrong)
    model = Heads(kernels=((3, 1),) * 3).double().eval()
    with pytest.raises(EquivalenceError, match=r"region siblings_view\d \(3x3 conv 6->\d \+ .*split into 3 views\)"):
        reparam.fuse(model, (torch.randn(1, 6, 8, 8, dtype=torch.float64),))


def test_hand_built_graph_with_three_heads_and_a_shared_tail():
    """A graph written by hand (no module tree): siblings of different widths, one read twice."""
    graph = fx.Graph()
    root = nn.Module()
    root.a, root.b, root.c = nn.Conv1d(3, 2, 3, padding=1), nn.Conv1d(3, 4, 3, padding=1), nn.Conv1d(3, 1, 3, padding=1)
    x = graph.placeholder("x")
    a, b, c = (graph.call_module(name, (x,)) for name in "abc")
    graph.output(
        (
            graph.call_function(torch.relu, (a,)),
            graph.call_function(torch.add, (b, b)),
            graph.call_function(torch.tanh, (c,)),
        )
    )
    gm = fx.GraphModule(root, graph).double()
    xs = torch.randn(2, 3, 11, dtype=torch.float64)
    want = gm(xs)
    T.propagate_shapes(gm, [xs])
    tag_origins(gm)
    report = Report()
    assert merge_siblings(gm, report).changed == 1
    for g, w in zip(gm(xs), want, strict=True):
        assert rel_err(g, w) <= EXACT
    assert [n.op for n in gm.graph.nodes].count("call_module") == 1
