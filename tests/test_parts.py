"""Models that do not trace as a whole: every part that can be fused is, each proven on its own inputs.

The shapes here are the ones deployment models have: parents that loop over an ``nn.Sequential`` /
``nn.ModuleList`` / ``nn.ModuleDict`` instead of calling it (ultralytics YOLO), heads called once per
feature level, children whose properties the parent reads (segmentation_models_pytorch), outputs in an
``OrderedDict`` (torchvision), tensors cached during a forward (ultralytics' anchors), and outputs that go
through top-k over near-tied scores (detection post-processing).
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import bn2d, count_ops, rel_err

import reparam
import reparam.parts as parts

F32_TOL, F64_TOL = 1e-5, 1e-9


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), bn2d(cout), nn.SiLU())


class Branchy(nn.Module):
    """A RepVGG-style block (3x3 + 1x1 + BN identity) that traces: fuses to one conv."""

    def __init__(self, c: int):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), bn2d(c))
        self.pointwise = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), bn2d(c))
        self.identity = bn2d(c)

    def forward(self, x):
        return F.relu(self.dense(x) + self.pointwise(x) + self.identity(x))


class RoutedBackbone(nn.Module):
    """Loops over ``self.layers`` (never calls it) and routes by a Python list, like ultralytics' model."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(ConvBNAct(3, 8, stride=2), Branchy(8), ConvBNAct(8, 16, stride=2), Branchy(16))
        self.save = [1]

    def forward(self, x):
        kept = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.save:
                kept.append(x)
        if x.shape[-1] > 1000:  # shape-dependent control flow: torch.fx cannot trace this model as a whole
            raise ValueError
        return x, kept


class Head(nn.Module):
    """One branch per level in ModuleLists, anchors cached in a plain attribute when the shape changes."""

    def __init__(self, channels=(8, 16)):
        super().__init__()
        self.box = nn.ModuleList(nn.Sequential(ConvBNAct(c, c), nn.Conv2d(c, 4, 1)) for c in channels)
        self.cls = nn.ModuleDict(
            {str(i): nn.Sequential(ConvBNAct(c, c), nn.Conv2d(c, 3, 1)) for i, c in enumerate(channels)}
        )
        self.shape = None
        self.anchors = torch.empty(0)

    def forward(self, feats):
        outs = [torch.cat([self.box[i](f), self.cls[str(i)](f)], 1).flatten(2) for i, f in enumerate(feats)]
        out = torch.cat(outs, 2)
        if self.shape != out.shape:  # cached like ultralytics' Detect: in whatever dtype the run had
            self.anchors = torch.arange(out.shape[-1], dtype=out.dtype)
            self.shape = out.shape
        return out + self.anchors


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = RoutedBackbone()
        self.head = Head()

    def forward(self, x):
        x, kept = self.backbone(x)
        return self.head([kept[0], x])


def _assert_same_outputs(fused, model, x, tol):
    with torch.no_grad():
        got, want = fused(x), model(x)
    assert type(got) is type(want)
    got_leaves, want_leaves = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert torch.utils._pytree.tree_structure(got) == torch.utils._pytree.tree_structure(want)
    for a, b in zip(got_leaves, want_leaves, strict=True):
        assert a.dtype == b.dtype
        assert rel_err(a, b) <= tol


class RootRoutedDetector(Detector):
    """The root's own forward does not trace either: nothing traces as a whole, the model is fused part by part."""

    def forward(self, x):
        if x.shape[-1] > 1000:
            raise ValueError
        return super().forward(x)


@pytest.mark.parametrize(
    "detector, note",
    [
        (RootRoutedDetector, "does not trace as a whole"),
        (Detector, "head: not traceable"),  # traced whole, the backbone and the head called as they are
    ],
)
def test_iterated_containers_and_heads_are_fused_part_by_part(detector, note):
    model = detector().eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    fused = reparam.fuse(model, (x,))
    assert model.head.anchors.numel() == 0 and model.head.shape is None  # the user's model never ran
    counts = count_ops(fused, x)
    # 2 ConvBNAct + 2 Branchy in the backbone (one conv each), 2 levels x (box 2 + cls 2) in the head
    assert counts["bn"] == 0 and counts["conv"] == 4 + 8
    assert count_ops(model, x)["bn"] == 2 + 2 * 3 + 4
    _assert_same_outputs(fused, model, x, F32_TOL)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = fused.reparam_report
    assert any(note in n for n in report.notes), report.notes
    assert report.max_rel_error is not None and report.max_rel_error <= 1e-12


def test_cached_tensors_follow_the_model_dtype_after_fusion():
    model = Detector().eval()
    x = torch.randn(1, 3, 32, 32)
    fused = reparam.fuse(model, (x,))
    assert "anchors" not in vars(fused.head) or fused.head.anchors.dtype == torch.float32
    with torch.no_grad():
        assert fused(x).dtype == torch.float32
    double = reparam.fuse(model.double(), (x.double(),))
    with torch.no_grad():
        assert double(x.double()).dtype == torch.float64


def test_float64_model_fuses_exactly_part_by_part():
    model = Detector().double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _assert_same_outputs(reparam.fuse(model, (x,)), model, x, F64_TOL)


def test_module_called_several_times_is_proven_on_every_call():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Branchy(4)

        def forward(self, x):
            small = F.avg_pool2d(x, 2)
            if x.shape[-1] < 2:
                raise ValueError
            return self.block(x).mean((2, 3)) + self.block(small).mean((2, 3))

    model = Shared().eval()
    x = torch.randn(2, 4, 12, 12)
    calls, _, _ = parts.record_calls(model, (x,))
    assert [c.args[0].shape[-1] for c in calls[model.block]] == [12, 6]
    fused = reparam.fuse(model, (x,))
    assert count_ops(fused, x)["conv"] == 2 and count_ops(fused, x)["bn"] == 0
    _assert_same_outputs(fused, model, torch.randn(3, 4, 10, 10), F32_TOL)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct(3, 8, stride=2)
        self._output_stride = 2

    @property
    def output_stride(self) -> int:
        return self._output_stride

    def forward(self, x):
        return collections.OrderedDict(out=self.stem(x), aux=x.mean((2, 3)))


class ReadsProperty(nn.Module):
    """Reads ``encoder.output_stride`` (a property of its class) and returns the encoder's OrderedDict."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()

    def forward(self, x):
        if x.shape[-1] % self.encoder.output_stride:
            raise ValueError("input not divisible by the output stride")
        features = self.encoder(x)
        assert isinstance(features, collections.OrderedDict)
        return features


def test_traced_part_keeps_properties_and_container_types():
    model = ReadsProperty().eval()
    x = torch.randn(2, 3, 16, 16)
    fused = reparam.fuse(model, (x,))
    assert fused.encoder.output_stride == 2
    assert count_ops(fused, x)["bn"] == 0
    _assert_same_outputs(fused, model, x, F32_TOL)


def test_whole_model_returning_an_ordered_dict_keeps_it():
    model = Encoder().eval()
    x = torch.randn(2, 3, 16, 16)
    fused = reparam.fuse(model, (x,))
    assert isinstance(fused, torch.fx.GraphModule)
    _assert_same_outputs(fused, model, x, F32_TOL)


class TopK(nn.Module):
    """Post-processing that sorts near-tied scores: a 1e-16 change reorders the output."""

    def __init__(self):
        super().__init__()
        self.score = Branchy(4)

    def forward(self, x):
        s = self.score(x).flatten(1)
        s = s - s + s.detach().round(decimals=1)  # many exact ties
        values, index = s.topk(5, dim=1)
        if index.numel() == 0:
            raise ValueError
        return values, index


def test_post_processing_of_ties_is_never_refused():
    model = TopK().double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, (x,))  # must not raise, whatever order the ties come out in
    assert count_ops(fused, x)["conv"] == 1


def test_a_wrong_part_is_named(monkeypatch):
    import reparam.passes.collapse as collapse

    real = collapse.to_module

    def corrupted(*args, **kwargs):
        module = real(*args, **kwargs)
        if hasattr(module, "weight"):
            with torch.no_grad():
                module.weight.view(-1)[0] += 0.01
        return module

    monkeypatch.setattr(collapse, "to_module", corrupted)
    region = r"region (backbone\.layers|head\.box|head\.cls)\.\S+ .*: the fused"
    with pytest.raises(reparam.EquivalenceError, match=region):
        reparam.fuse(Detector().eval(), (torch.randn(1, 3, 32, 32),))


class KeywordCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ConvBNAct(3, 4)

    def forward(self, x):
        if x.shape[0] < 1:
            raise ValueError
        return self.block(input=x)


def test_parts_called_with_keywords_are_fused():
    model = KeywordCalls().eval()
    x = torch.randn(1, 3, 8, 8)
    fused = reparam.fuse(model, (x,))
    assert count_ops(fused, x)["bn"] == 0
    _assert_same_outputs(fused, model, x, F32_TOL)


class Deep(nn.Module):
    """Four levels of wrappers around one block whose forward does not trace (shape control flow)."""

    def __init__(self, depth: int = 4):
        super().__init__()
        self.inner = Deep(depth - 1) if depth > 1 else RoutedBackbone()
        self.side = ConvBNAct(16, 16)

    def forward(self, x):
        out = self.inner(x)
        y = out[0] if isinstance(out, tuple) else out
        return self.side(y)


class RootDeep(Deep):
    """The root's own forward does not trace either: the model is fused part by part."""

    def forward(self, x):
        if x.shape[-1] > 1000:
            raise ValueError
        return super().forward(x)


def test_ancestors_of_a_module_known_not_to_trace_are_not_traced_again(monkeypatch):
    traced = []
    real = parts.T.symbolic_trace

    def counting(module):
        traced.append(module)
        return real(module)

    monkeypatch.setattr(parts.T, "symbolic_trace", counting)
    model = RootDeep().eval()
    x = torch.randn(1, 3, 16, 16)
    fused = reparam.fuse(model, (x,))
    # the first wrapper's trace fails in RoutedBackbone's forward; the two wrappers inside contain it: not retraced
    assert sum(isinstance(m, Deep) for m in traced) == 1
    assert sum(isinstance(m, ConvBNAct) for m in traced) == 4 + 2  # the sides, and RoutedBackbone's own parts
    assert count_ops(fused, x)["bn"] == 0
    _assert_same_outputs(fused, model, x, F32_TOL)
