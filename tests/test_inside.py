"""A module with children whose own forward does not trace is one opaque call in the whole-model graph; its children
are fused inside a private copy of it (reparam.inside), and the whole model is verified as one graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import randomised

import reparam
from reparam import inside
from reparam import trace as T
from reparam.errors import EquivalenceError


def conv_bn(c_in: int, c_out: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out))


class SizeBranch(nn.Module):
    """Python control flow on a traced size (as timm's LiteMLA / MobileVitV2Block): its own forward does not trace."""

    def __init__(self, c: int):
        super().__init__()
        self.inner = conv_bn(c, c)
        self.point = conv_bn(c, c, 1)

    def forward(self, x):
        y = self.point(torch.relu(self.inner(x)))
        if x.shape[-1] % 2 == 0:
            return y + x
        return y - x


class Cached(nn.Module):
    """Caches a tensor of its input's size on first use (as a detector head's anchor grid); its forward does not
    trace either.  A cache left from a run at another size would break the next call."""

    def __init__(self, c: int):
        super().__init__()
        self.body = conv_bn(c, c)
        self.grid = None

    def forward(self, x):
        y = self.body(x)
        if self.grid is None:
            self.grid = torch.arange(y.shape[-1], dtype=y.dtype).expand_as(y[0, 0])
        if y.shape[-2] > 0:
            return y + self.grid
        return y


class Net(nn.Module):
    def __init__(self, middle: nn.Module):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.middle = middle
        self.head = conv_bn(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.middle(torch.relu(self.stem(x)))))


def counts(model: nn.Module) -> tuple[int, int]:
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    return convs, sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_the_whole_model_traces_with_the_module_opaque_and_its_path_named():
    model = randomised(Net(SizeBranch(8)))
    gm, parents = T.trace_whole(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"].count("middle") == 1
    assert list(parents) == ["middle"] and "control flow" in str(parents["middle"])
    assert not any(str(n.target).startswith("middle.") for n in gm.graph.nodes)  # its failed attempt undone
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_children_of_an_opaque_module_are_fused_and_the_model_is_checked_whole_on_crops():
    model = randomised(Net(SizeBranch(8))).double()
    x = torch.randn(1, 3, 160, 160, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused, report = reparam.fuse_with_report(model, x)
    assert counts(fused) == (4, 0)  # every BatchNorm folded, the opaque module's too
    assert not any("does not trace as a whole" in n for n in report.notes)
    assert any(n.startswith("middle: not traceable") for n in report.notes), report.notes
    assert report.verified_on.startswith("centre crops")
    assert {r.where.split(".")[0] for r in report.rewrites} >= {"stem", "middle", "head"}
    assert counts(model) == (4, 4) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        for size in (160, 33):  # another parity takes the other branch of the opaque forward
            y = torch.randn(2, 3, size, size, dtype=torch.float64)
            torch.testing.assert_close(fused(y), model(y), rtol=1e-11, atol=1e-11)


def test_a_wrong_fusion_inside_the_copy_is_caught_against_the_original(monkeypatch):
    """The part proofs pass (the error is made after them): the whole-model check, against the eager original, must
    refuse it and name the opaque module; the model is then fused part by part, each part proven on what it sees
    (an opaque module may post-process data-dependently: a whole-model disagreement is not taken as final)."""
    real = inside.PartFuser

    class Corrupting(real):
        def fuse(self, root, trace_error, path=""):
            fused = real.fuse(self, root, trace_error, path)
            for m in fused.modules():
                if isinstance(m, nn.Conv2d):
                    with torch.no_grad():
                        m.weight.mul_(1 + 1e-3)
                    break
            return fused

    monkeypatch.setattr(inside, "PartFuser", Corrupting)
    model = randomised(Net(SizeBranch(8))).double()
    x = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, x)
    assert report.notes[0].startswith("the whole-model check disagreed (region middle")
    assert any("does not trace as a whole" in n for n in report.notes)
    assert counts(fused) == (4, 0)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-11, atol=1e-11)  # not the corrupted copy


def test_a_wrong_fold_is_still_refused_after_the_part_by_part_retry(monkeypatch):
    """A wrong rewrite (every graph's first fused conv off by 1e-3): the whole-model check disagrees, and so does the
    part-by-part retry's proof of the part that holds it."""
    from reparam import pipeline

    real = pipeline._fuse_graph

    def corrupting(gm, *args, **kwargs):
        pristine = real(gm, *args, **kwargs)
        conv = next((m for m in gm.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is not None:
            with torch.no_grad():
                conv.weight.mul_(1 + 1e-3)
        return pristine

    monkeypatch.setattr(pipeline, "_fuse_graph", corrupting)
    model = randomised(Net(SizeBranch(8))).double()
    with pytest.raises(EquivalenceError, match="region"):
        reparam.fuse(model, torch.randn(1, 3, 96, 96, dtype=torch.float64))


def test_a_cache_the_copy_fills_on_crops_or_random_inputs_does_not_survive():
    model = randomised(Net(Cached(8))).double()
    x = torch.randn(1, 3, 160, 160, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, x)
    assert report.verified_on.startswith("centre crops")  # the copy ran at the crop's size
    assert counts(fused)[1] == 0
    copy = fused.get_submodule("middle")
    assert copy is not model.middle and copy.grid is None
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-11, atol=1e-11)
    assert model.middle.grid is not None  # (the user's own run filled the user's own cache)


def test_a_cache_the_copy_fills_on_a_rejected_crop_does_not_reach_the_full_size_check(monkeypatch):
    from reparam import pipeline

    from reparam.proofs import Closeness

    real = pipeline.closeness

    def rejecting(gm, reference, crop, shared):  # runs both models at the crop's size, then does not vouch for it
        real(gm, reference, crop, shared)
        return Closeness(None)

    monkeypatch.setattr(pipeline, "closeness", rejecting)
    model = randomised(Net(Cached(8))).double()
    x = torch.randn(1, 3, 160, 160, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, x)
    assert report.verified_on == "the inputs" and report.max_rel_error < 1e-12


class TakesIndices(nn.Module):
    """An integer input: no random stand-in can run it, so the model is fused part by part instead."""

    def __init__(self, c: int):
        super().__init__()
        self.body = conv_bn(c, c)

    def forward(self, x, idx):
        y = self.body(x)
        if idx.shape[0] > 0:
            return y[:, idx]
        return y


class WithIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.middle = TakesIndices(8)
        self.register_buffer("idx", torch.tensor([3, 1, 0, 2, 4, 5, 6, 7]))

    def forward(self, x):
        return self.middle(torch.relu(self.stem(x)), self.idx)


def test_a_module_whose_inputs_cannot_be_stood_in_for_sends_the_model_part_by_part():
    model = randomised(WithIndices()).double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, x)
    assert any("does not trace as a whole" in n for n in report.notes), report.notes
    assert any("not fused inside (middle: takes a torch.int64 tensor" in n for n in report.notes), report.notes
    assert counts(fused) == (2, 0)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-11, atol=1e-11)


class TakesSize(nn.Module):
    """Called with a size the graph computes (as the attention of timm's Twins): ``forward(x, size)``, control
    flow on it, so its forward does not trace."""

    def __init__(self, c: int):
        super().__init__()
        self.inner = conv_bn(c, c)

    def forward(self, x, size):
        h, w = size
        y = self.inner(x)
        return y + x if h * w % 2 == 0 else y - x


class WithSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.middle = TakesSize(8)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        return self.middle(y, (y.shape[-2] // 1, y.shape[-1]))


def test_a_module_called_with_a_size_the_graph_computes_is_fused_inside_on_the_whole_path():
    """The shape run records the plain values nodes compute (``H // 1``, a tuple of sizes), so the opaque module
    gets them as its inputs for its stand-in run: the model stays on the whole-model path, checked on crops."""
    model = randomised(WithSize()).double()
    x = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, x)
    assert not any("does not trace as a whole" in n for n in report.notes), report.notes
    assert report.verified_on.startswith("centre crops"), report.verified_on
    assert counts(fused) == (2, 0)
    with torch.no_grad():
        for size in (96, 33):  # an odd area takes the other branch
            y = torch.randn(1, 3, size, size, dtype=torch.float64)
            torch.testing.assert_close(fused(y), model(y), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("name", ["efficientvit_b0", "efficientvit_m0", "mobilevitv2_050", "twins_svt_small"])
def test_timm_models_with_opaque_blocks_fuse_whole_and_exactly(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomised(timm.create_model(name, pretrained=False))
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(1, 3, size, size)
    fused, report = reparam.fuse_with_report(model, x)
    assert not any("does not trace as a whole" in n for n in report.notes), report.notes[:2]
    assert counts(fused)[1] == 0 and report.max_rel_error < 1e-10
    with torch.no_grad():  # in float32: the fused weights are float32 roundings of exact float64 folds
        want, got = model(x), fused(x)
    assert float((got - want).norm() / want.norm()) < 1e-5
