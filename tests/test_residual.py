"""Residual removal: random residual blocks (property test) and torchvision ResNets, exact in float64."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import reparam
from reparam.stats import count_kernels

torch.set_num_threads(1)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


class Residual(nn.Module):
    """relu(body(x) + skip(x)) with x = act_in(stem(x)); body = conv-bn-act ... conv-bn."""

    def __init__(self, cin, cout, mid, stride, groups, depth, act, downsample, positive_input):
        super().__init__()
        self.stem = nn.Conv2d(3, cin, 3, 1, 1)
        self.positive_input = positive_input
        layers, c = [], cin
        for i in range(depth):
            last = i == depth - 1
            k = 3 if i == depth // 2 else 1
            out = cout if last else mid
            g = groups if (k == 3 and c % groups == 0 and out % groups == 0) else 1
            layers += [
                nn.Conv2d(c, out, k, stride if i == depth // 2 else 1, k // 2, groups=g, bias=False),
                nn.BatchNorm2d(out),
            ]
            if not last:
                layers.append(act())
            c = out
        self.body = nn.Sequential(*layers)
        needs_projection = downsample or stride != 1 or cin != cout
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if needs_projection
            else nn.Identity()
        )
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.stem(x)
        if self.positive_input:
            x = torch.relu(x)
        return self.act(self.body(x) + self.skip(x))


@settings(max_examples=25, deadline=None)
@given(
    cin=st.sampled_from([4, 8]),
    cout=st.sampled_from([4, 8]),
    mid=st.sampled_from([4, 8]),
    stride=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2, 4]),
    depth=st.sampled_from([2, 3]),
    downsample=st.booleans(),
    positive=st.booleans(),
    size=st.sampled_from([(7, 7), (8, 9), (11, 6)]),
)
def test_random_residual_blocks_are_exact(cin, cout, mid, stride, groups, depth, downsample, positive, size):
    model = randomize_bn(Residual(cin, cout, mid, stride, groups, depth, nn.ReLU, downsample, positive)).double().eval()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, (x,), remove_residuals=True)
    assert rel(fused(x), model(x)) <= 1e-10
    assert report.counts()["remove_residual"] == 1
    assert count_kernels(fused, (x,))["add"] == 0


def test_relu6_on_unbounded_input_is_refused_and_exact():
    model = randomize_bn(Residual(8, 8, 8, 1, 1, 2, nn.ReLU6, False, True)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, (x,), remove_residuals=True)
    assert rel(fused(x), model(x)) <= 1e-10
    assert count_kernels(fused, (x,))["add"] == 1
    assert any("residual kept" in r.reason for r in report.refusals)


def test_relu6_on_bounded_input_is_carried():
    model = randomize_bn(Residual(8, 8, 8, 1, 1, 2, nn.ReLU6, False, True)).double().eval()

    class Clipped(nn.Module):  # input proven in [0, 6]
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            inner = self.inner
            x = nn.functional.relu6(inner.stem(x))
            return inner.act(inner.body(x) + inner.skip(x))

    clipped = Clipped(model).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fused = reparam.fuse(clipped, (x,), remove_residuals=True)
    assert rel(fused(x), clipped(x)) <= 1e-10
    assert count_kernels(fused, (x,))["add"] == 0


def test_off_by_default():
    model = randomize_bn(Residual(8, 8, 8, 1, 1, 2, nn.ReLU, False, True)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert count_kernels(reparam.fuse(model, (x,)), (x,))["add"] == 1


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnext50_32x4d"])
def test_torchvision_resnets_become_plain(name):
    torchvision = pytest.importorskip("torchvision")
    model = randomize_bn(getattr(torchvision.models, name)()).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    fused = reparam.fuse(model, (x,), remove_residuals=True)
    counts = count_kernels(fused, (x,))
    assert counts["add"] == 0 and counts["batch_norm"] == 0
    assert rel(fused(x), model(x)) <= 1e-9


def test_mobilenet_v2_keeps_linear_bottleneck_residuals_exactly():
    torchvision = pytest.importorskip("torchvision")
    model = randomize_bn(torchvision.models.mobilenet_v2()).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, (x,), remove_residuals=True)
    assert rel(fused(x), model(x)) <= 1e-9
    assert any("residual kept" in r.reason for r in report.refusals)
