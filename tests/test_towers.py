"""Horizontal fusion of parallel towers: multi-path blocks -> grouped convs, concatenated towers -> one conv."""

import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import reparam
from reparam.stats import count_kernels

torch.set_num_threads(1)


def randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def conv_bn(cin, cout, k, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class Path(nn.Module):
    """1x1 -> k x k (stride) -> 1x1, BN after each, ReLU between."""

    def __init__(self, cin, width, cout, k, stride):
        super().__init__()
        self.reduce, self.spatial = conv_bn(cin, width, 1), conv_bn(width, width, k, stride)
        self.expand = conv_bn(width, cout, 1)

    def forward(self, x):
        return self.expand(torch.relu(self.spatial(torch.relu(self.reduce(x)))))


class MultiPath(nn.Module):
    """ResNeXt block in its explicit split-transform-merge form."""

    def __init__(self, cin, width, paths, k, stride, residual):
        super().__init__()
        cout = cin * stride
        self.paths = nn.ModuleList(Path(cin, width, cout, k, stride) for _ in range(paths))
        self.residual = residual
        self.down = conv_bn(cin, cout, 1, stride) if stride != 1 else nn.Identity()

    def forward(self, x):
        out = sum(p(x) for p in self.paths)
        return torch.relu(out + self.down(x)) if self.residual else out


class Towers(nn.Module):
    """Parallel nonlinear towers concatenated (Inception-style, equal shapes)."""

    def __init__(self, cin, width, paths, k, depth):
        super().__init__()
        layers = lambda: [m for i in range(depth) for m in (conv_bn(cin if i == 0 else width, width, k), nn.ReLU())]  # noqa: E731
        self.towers = nn.ModuleList(nn.Sequential(*layers()) for _ in range(paths))

    def forward(self, x):
        return torch.cat([t(x) for t in self.towers], 1)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@settings(max_examples=20, deadline=None)
@given(
    paths=st.integers(2, 6),
    width=st.sampled_from([2, 4]),
    cin=st.sampled_from([4, 8]),
    k=st.sampled_from([3, 5]),
    stride=st.sampled_from([1, 2]),
    residual=st.booleans(),
)
def test_multipath_block_becomes_three_convs(paths, width, cin, k, stride, residual):
    model = randomize_bn(MultiPath(cin, width, paths, k, stride, residual)).double().eval()
    x = torch.randn(2, cin, 9, 7, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, (x,))
    assert rel(fused(x), model(x)) <= 1e-10
    assert report.counts()["merge_towers"] == 1
    counts = count_kernels(fused, (x,))
    assert counts["batch_norm"] == 0
    assert counts["conv"] == 3 + (1 if residual and stride != 1 else 0)
    if residual:
        plain = reparam.fuse(model, (x,), remove_residuals=True)
        assert count_kernels(plain, (x,))["conv"] == 3
        assert count_kernels(plain, (x,))["add"] == 0
        assert rel(plain(x), model(x)) <= 1e-10


@settings(max_examples=15, deadline=None)
@given(paths=st.integers(2, 5), width=st.sampled_from([3, 4]), depth=st.integers(1, 3), k=st.sampled_from([1, 3]))
def test_concatenated_towers_become_one_conv_per_stage(paths, width, depth, k):
    model = randomize_bn(Towers(6, width, paths, k, depth)).double().eval()
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    fused = reparam.fuse(model, (x,))
    assert rel(fused(x), model(x)) <= 1e-10
    assert count_kernels(fused, (x,))["conv"] == depth


def test_paths_of_different_shapes_are_left_alone():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 1, 1))
            self.b = nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, 4, 5, 1, 2))

        def forward(self, x):
            return self.a(x) + self.b(x)

    model = Mixed().double().eval()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, (x,))
    assert rel(fused(x), model(x)) <= 1e-10
    assert report.counts()["merge_towers"] == 0
