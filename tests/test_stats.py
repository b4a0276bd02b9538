"""reparam.stats: executed-kernel counts, parameters, MACs, latency and error measures."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reparam import stats


class Branchy(nn.Module):
    """conv+BN and a 1x1 branch summed (one residual add), plus a bias add, a scalar add and a linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pw = nn.Conv2d(3, 4, 1)
        self.bias = nn.Parameter(torch.randn(4, 1, 1))
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = self.bn(self.conv(x)) + self.pw(x)  # counted: same numel
        y = y + self.bias  # broadcast bias add: not counted
        y = y + 1.0  # scalar add: not counted
        y = F.conv2d(y, torch.ones(4, 4, 1, 1))  # functional conv: counted
        y = y.mean((2, 3))
        y.add_(torch.zeros_like(y))  # in-place tensor add: counted
        return self.fc(y)


def test_count_kernels_counts_each_kind():
    counts = stats.count_kernels(Branchy().eval(), torch.randn(2, 3, 8, 8))
    assert set(counts) == set(stats.KERNEL_KINDS)
    assert counts["conv"] == 3
    assert counts["batch_norm"] == 1
    assert counts["add"] == 2
    assert counts["linear"] == 1
    assert counts["total"] > sum(counts[k] for k in ("conv", "batch_norm", "add", "linear"))


def test_count_kernels_accepts_a_tuple_and_leaves_the_model_alone():
    model = Branchy().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert stats.count_kernels(model, (torch.randn(1, 3, 8, 8),))["conv"] == 3
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    training = Branchy().train()
    stats.count_kernels(training, torch.randn(2, 3, 8, 8))
    assert training.training  # the mode is never flipped


def test_count_kernels_sees_fusion():
    import reparam
    import reparam.models as zoo

    model = zoo.create("repvgg_digits").eval()
    x = torch.randn(1, 1, 8, 8)
    before, after = stats.count_kernels(model, x), stats.count_kernels(reparam.fuse(model, (x,)), x)
    assert before["conv"] > after["conv"] > 0
    assert before["batch_norm"] > 0 and after["batch_norm"] == 0
    assert before["add"] > 0 and after["add"] == 0


def test_count_params_counts_shared_tensors_once():
    lin = nn.Linear(3, 4)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(4, 3))
    model[2].weight = nn.Parameter(lin.weight.t().detach().clone())
    assert stats.count_params(model) == 12 + 4 + 12 + 3
    tied = nn.Sequential(lin, lin)
    assert stats.count_params(tied) == 12 + 4
    assert stats.count_params(nn.BatchNorm2d(8)) == 16  # running statistics are buffers, not parameters


def test_count_macs():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert stats.count_macs(conv, torch.randn(1, 3, 8, 8)) == 3 * 8 * 9 * 64
    assert stats.count_macs(nn.Linear(10, 5), torch.randn(2, 10)) == 2 * 10 * 5


def test_latency_ms_is_a_positive_median():
    calls = []
    model = lambda x: calls.append(1) or x  # noqa: E731
    ms = stats.latency_ms(model, torch.zeros(1), warmup=2, repeats=5)
    assert ms >= 0 and math.isfinite(ms)
    assert len(calls) == 7
    with pytest.raises(ValueError):
        stats.latency_ms(model, torch.zeros(1), repeats=0)
    calls.clear()
    stats.latency_ms(model, torch.zeros(1), warmup=0, repeats=100, budget_s=0.0)
    assert len(calls) == 1  # the budget stops timing after the first pass


def test_relative_error():
    ref = torch.tensor([3.0, 4.0])
    assert stats.relative_error(ref, ref) == 0.0
    assert stats.relative_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    # the worst output of a structure, numpy against torch
    assert stats.relative_error((ref, np.array([1.0, 0.0])), (ref, torch.tensor([2.0, 0.0]))) == pytest.approx(0.5)
    assert stats.relative_error(torch.tensor([1.0]), torch.tensor([0.0])) == math.inf


def test_relative_error_is_inf_for_nan_so_tolerances_fail():
    err = stats.relative_error(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 1.0]))
    assert err == math.inf and not err <= 1e-4
    assert stats.max_abs_error(torch.tensor([float("nan")]), torch.tensor([1.0])) == math.inf


def test_errors_reject_different_structures():
    with pytest.raises(ValueError, match="structure"):
        stats.relative_error((torch.zeros(2),), (torch.zeros(2), torch.zeros(2)))
    with pytest.raises(ValueError, match="shape"):
        stats.max_abs_error(torch.zeros(2), torch.zeros(3))


def test_max_abs_error():
    assert stats.max_abs_error(torch.tensor([1.0, -2.0]), torch.tensor([1.5, -2.25])) == pytest.approx(0.5)


def test_as_args():
    x = torch.zeros(1)
    assert stats.as_args(x) == (x,)
    assert stats.as_args([x, x]) == (x, x)
    assert stats.as_args(None) == ()


class Norms(nn.Module):
    """conv -> BN (foldable); conv -> FrozenBatchNorm2d (foldable); a conv read by a BN and a skip (not
    foldable); a BN after a sum (not foldable); a squeeze-and-excitation scale (not a channel affine)."""

    def __init__(self):
        super().__init__()
        from torchvision.ops import FrozenBatchNorm2d

        self.a, self.b, self.c = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
        self.bn_a, self.bn_c, self.bn_sum = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.frozen = FrozenBatchNorm2d(4)

    def forward(self, x):
        y = self.bn_a(self.a(x)) + self.frozen(self.b(x))
        c = self.c(y)
        y = self.bn_c(c) + c
        y = self.bn_sum(y + x)
        return y * torch.sigmoid(y.mean((2, 3), keepdim=True))


def test_count_norms_tells_foldable_norms_apart():
    pytest.importorskip("torchvision")
    counts = stats.count_norms(Norms().eval(), torch.randn(2, 4, 6, 6))
    assert counts == {"batch_norm": 3, "channel_affine": 1, "foldable": 2}


def test_count_norms_sees_a_channel_affine_left_by_fusion():
    from reparam.modules import ChannelAffine

    model = ChannelAffine(torch.rand(4) + 0.5, torch.randn(4), 2)
    assert stats.count_norms(model, torch.randn(1, 4, 3, 3)) == {"batch_norm": 0, "channel_affine": 1, "foldable": 0}
    conv_then_affine = nn.Sequential(nn.Conv2d(3, 4, 1), model)
    assert stats.count_norms(conv_then_affine, torch.randn(1, 3, 3, 3))["foldable"] == 1


def test_relative_error_is_the_one_of_verify():
    """One measure: stats' is the largest of verify's over the outputs (the same at an all-zero reference)."""
    from reparam import verify

    zero, tiny = torch.zeros(3), torch.full((3,), 1e-20)
    assert verify.relative_error(zero, zero) == stats.relative_error(zero, zero) == 0.0
    assert verify.relative_error(tiny, zero) == stats.relative_error(tiny, zero) == math.inf
    a, b = torch.tensor([3.0, 4.5]), torch.tensor([3.0, 4.0])
    assert stats.relative_error((a, zero), (b, zero)) == verify.relative_error(a, b) == pytest.approx(0.1)
    assert math.isnan(verify.relative_error(torch.tensor([math.nan]), torch.ones(1)))


def test_an_exactly_zero_output_is_judged_by_the_absolute_difference_in_the_checks():
    """The equivalence checks never cry wolf at an all-zero reference: rounding-sized values there pass, real
    values fail (the report figure for such a file stays inf)."""
    from reparam import verify
    from reparam.errors import EquivalenceError

    zero = torch.zeros(3, dtype=torch.float64)
    tiny = torch.full((3,), 1e-20)
    assert verify.relative_error(tiny, zero, absolute_at_zero=True) == pytest.approx(3**0.5 * 1e-20)
    assert verify.compare_outputs((torch.full((3,), 1e-20), torch.ones(2)), (zero, torch.ones(2))) <= 1e-19
    with pytest.raises(EquivalenceError, match=r"output\[0\]"):
        verify.compare_outputs((torch.full((3,), 1e-3), torch.ones(2)), (zero, torch.ones(2)))
