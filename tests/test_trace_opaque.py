"""The tracer keeps a childless module whose forward does not trace as one opaque call (timm's ``Conv2dSame``), and
the passes never fold such a conv subclass as a plain convolution."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from conftest import randomised

import reparam
from reparam import trace as T
from reparam.match import computes_as_conv, is_conv


class SamePadConv(nn.Conv2d):
    """TensorFlow-style "same" padding computed from the input's size: Python control flow on a traced value."""

    def forward(self, x):
        h, w = x.shape[-2:]
        pad_h = max((math.ceil(h / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - h, 0)
        pad_w = max((math.ceil(w / self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - w, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Shared(nn.Module):
    """A parameter the opaque module's failed attempt reads, read again after it."""

    def __init__(self):
        super().__init__()
        self.conv = SamePadConv(3, 3, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.head(y) + self.conv.weight.sum()  # the weight's get_attr after the opaque call


class Branchy(nn.Module):
    """A module with children whose own forward does not trace: not made opaque (its children are fused as parts)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        if x.shape[-1] > 4:
            return self.b(self.a(x))
        return x


def test_a_childless_module_that_does_not_trace_is_one_opaque_call_and_the_rest_traces():
    model = randomised(Shared())
    gm = T.symbolic_trace(model)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["conv", "bn", "head"]
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] == ["conv.weight"]  # recorded once, live
    gm.graph.lint()
    x = torch.randn(1, 3, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_a_module_with_children_that_does_not_trace_still_fails_the_trace():
    with pytest.raises(fx.proxy.TraceError):
        T.symbolic_trace(nn.Sequential(Branchy(), nn.ReLU()))


def test_a_conv_subclass_with_its_own_forward_is_not_a_plain_conv():
    assert is_conv(SamePadConv(3, 3, 3)) and not computes_as_conv(SamePadConv(3, 3, 3))
    assert computes_as_conv(nn.Conv2d(3, 3, 3)) and computes_as_conv(nn.LazyConv2d(3, 3))


def test_an_opaque_conv_is_kept_and_the_model_fuses_exactly_around_it():
    model = randomised(Shared()).double()
    x = torch.randn(2, 3, 11, 8, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, x)
    assert report.max_rel_error < 1e-12
    assert not any("part" in n for n in report.notes)  # traced as a whole
    assert any(isinstance(m, SamePadConv) for m in fused.modules())  # its padding is not a conv's own
    with torch.no_grad():
        y = torch.randn(1, 3, 10, 13, dtype=torch.float64)  # another size: the padding follows it
        torch.testing.assert_close(fused(y), model(y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["tf_mobilenetv3_small_075", "maxvit_tiny_tf_224"])
def test_timm_models_with_same_padding_convs_trace_whole(name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False).eval()
    _, report = reparam.fuse_with_report(model, torch.randn(1, 3, 224, 224))
    assert not any("part" in n for n in report.notes), report.notes[:2]
    assert report.max_rel_error < 1e-10 and report.counts()["fold_bn"] > 0


class OptionalMask(nn.Module):
    """``forward(x, mask=None, flag=False)`` with a branch for a given mask or flag (as timm's Hiera and ViT): traced
    with ``mask`` a proxy, ``mask is not None`` holds and the graph needs a mask; ``flag`` a proxy cannot be a
    condition.  Called without them, they are traced as their defaults."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x, mask=None, flag=False, *, scale=None):
        if mask is not None or flag:
            x = x * mask.view(x.shape[0], 1, *x.shape[2:])
        y = self.bn(self.conv(x))
        return y if scale is None else y * scale


def test_parameters_left_at_their_constant_defaults_are_traced_as_those():
    model = randomised(OptionalMask())
    assert T.defaults_not_given(model, 1) == {"mask": None, "flag": False, "scale": None}
    assert T.defaults_not_given(model, 2) == {"flag": False, "scale": None}
    x = torch.randn(1, 3, 16, 16)
    fused, report = reparam.fuse_with_report(model, x)
    assert not any("trace" in note for note in report.notes), report.notes  # whole, not part by part
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)
        with pytest.raises(AssertionError, match="specialized to have value None"):
            fused(x, torch.ones(1, 16, 16))  # a call it was not traced for fails loudly, never silently wrong
        with pytest.raises(AssertionError, match="specialized to have value False"):
            fused(x, None, True)


class ChecksItsBuffer(nn.Module):
    """Reads the size of a buffer into Python (as timm's DINOv3 rotary embedding: ``assert self.periods.numel() ==
    dim``) in a method the root's forward calls: a parameter's or buffer's size is a number, never a proxy."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.register_buffer("periods", torch.linspace(1.0, 2.0, 8))

    def scales(self):
        assert self.periods.numel() == self.conv.out_channels and self.periods.dim() == 1
        return self.periods.view(1, -1, 1, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * self.scales()


def test_sizes_of_parameters_and_buffers_are_numbers_while_tracing():
    model = randomised(ChecksItsBuffer())
    gm, _ = T.trace_whole(model)  # before: TraceError, a proxy's numel() used as a condition
    x = torch.randn(1, 3, 16, 16)
    fused, report = reparam.fuse_with_report(model, x)
    assert not any("trace" in note for note in report.notes), report.notes
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)
