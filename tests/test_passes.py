"""One test per rewrite kind of the pipeline, end to end through ``reparam.fuse_with_report``.

Every test builds a tiny ``nn.Module`` (BatchNorms get random, non-trivial statistics) and checks

(a) numerics: float64 relative L2 error <= 1e-10 against the original on the example input and on a
    fresh one, and <= 1e-5 for a float32 copy fused in float32 (whose outputs stay float32);
(b) the report: the count of each rewrite kind the block exercises (``Report.counts()``);
(c) the result: what actually runs, counted with a ``TorchDispatchMode`` (aten convolutions, batch
    norms, additions of equal-size tensors, concatenations, explicit pads), and never more
    convolutions than the original;
(d) the input model is untouched: state-dict tensors bit-identical, same module tree, same mode.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

import reparam
from conftest import count_ops, graph_counts, random_bn, rel_err

pytestmark = pytest.mark.usefixtures("single_thread")

F64_TOL = 1e-10
F32_TOL = 1e-5


def bn(c: int, nd: int = 2, **kw) -> nn.modules.batchnorm._BatchNorm:
    return random_bn({0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[nd](c, **kw))


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1, nd=2, dilation=1, **kw) -> nn.Sequential:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    return nn.Sequential(conv(cin, cout, k, stride, padding, dilation, groups, bias=False, **kw), bn(cout, nd))


def snapshot(model: nn.Module):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    return state, str(model), modes


def assert_untouched(model: nn.Module, snap) -> None:
    state, text, modes = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), f"{k} changed"
    assert str(model) == text
    assert [m.training for m in model.modules()] == modes


def outputs_close(got, want, tol: float) -> float:
    got_leaves, got_spec = tree_flatten(got)
    want_leaves, want_spec = tree_flatten(want)
    assert got_spec == want_spec
    worst = 0.0
    for a, b in zip(got_leaves, want_leaves, strict=True):
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype, (a.dtype, b.dtype)
            worst = max(worst, rel_err(a, b))
        else:
            assert a == b
    assert worst <= tol, f"relative error {worst:.3e} > {tol:.0e}"
    return worst


def check_fuse(
    model: nn.Module,
    *inputs,
    counts: dict | None = None,
    ops: dict | None = None,
    refused: tuple = (),
    float32: bool = True,
    sizes: tuple = (),
):
    """Fuse ``model`` in float64 and run the (a)-(d) checks of the module docstring.

    ``counts``: expected ``Report.counts()`` entries; ``ops``: expected executed-op counts (``bn`` and
    ``add`` default to 0); ``refused``: substrings each expected in some refusal reason;
    ``sizes``: extra input shapes (for the first input) the fused model must also agree on.
    """
    torch.manual_seed(0)
    model = model.double().eval()
    xs = tuple(x.double() for x in inputs)
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", reparam.TrainingModeWarning)
        fused, report = reparam.fuse_with_report(model, xs)
    assert_untouched(model, snap)
    with torch.no_grad():
        outputs_close(fused(*xs), model(*xs), F64_TOL)
        fresh = tuple(torch.randn_like(x) for x in xs)
        outputs_close(fused(*fresh), model(*fresh), F64_TOL)
        for shape in sizes:
            other = (torch.randn(shape, dtype=torch.float64),) + fresh[1:]
            outputs_close(fused(*other), model(*other), F64_TOL)
    assert report.max_rel_error is not None and report.max_rel_error <= 1e-8
    got = report.counts()
    for kind, n in (counts or {}).items():
        assert got[kind] == n, f"{kind}: expected {n}, report has {dict(got)}\n{report}"
    expected_ops = {"bn": 0, "add": 0, **(ops or {})}
    executed = count_ops(fused, *xs)
    original = count_ops(model, *xs)
    for kind, n in expected_ops.items():
        if n is None:  # not checked
            continue
        assert executed[kind] == n, f"{kind}: expected {n} executed, got {dict(executed)}\n{fused.graph}"
    assert executed["conv"] <= original["conv"]
    reasons = [r.reason for r in report.refusals]
    for needle in refused:
        assert any(needle in r for r in reasons), f"no refusal mentions {needle!r}: {reasons}"
    if float32:
        m32 = copy.deepcopy(model).float()
        x32 = tuple(x.float() for x in xs)
        f32 = reparam.fuse(m32, x32)
        assert all(p.dtype == torch.float32 for p in f32.parameters())
        with torch.no_grad():
            outputs_close(f32(*x32), m32(*x32), F32_TOL)
    return fused, report


def no_bn_no_add(n_conv: int, **extra) -> dict:
    return {"conv": n_conv, "bn": 0, "add": 0, **extra}


# ============================================================================================
# fold_bn


def test_conv_then_bn():
    model = conv_bn(3, 8, 3, padding=1)
    fused, report = check_fuse(
        model, torch.randn(2, 3, 9, 7), counts={"fold_bn": 1}, ops=no_bn_no_add(1), sizes=[(1, 3, 6, 11)]
    )
    assert graph_counts(fused) == {"conv": 1}


def test_conv_with_bias_then_bn():
    model = nn.Sequential(nn.Conv2d(3, 4, (3, 2), 2, (1, 0)), bn(4))
    check_fuse(model, torch.randn(2, 3, 9, 8), counts={"fold_bn": 1}, ops=no_bn_no_add(1))


def test_linear_then_bn1d():
    model = nn.Sequential(nn.Linear(5, 6), random_bn(nn.BatchNorm1d(6)))
    fused, report = check_fuse(model, torch.randn(4, 5), counts={"fold_bn": 1}, ops={"bn": 0})
    assert graph_counts(fused) == {"linear": 1}


def test_bn_then_conv_without_padding_folds():
    model = nn.Sequential(bn(4), nn.Conv2d(4, 6, 3, 2, 0))
    check_fuse(model, torch.randn(2, 4, 9, 8), counts={"fold_bn": 1}, ops=no_bn_no_add(1))


def test_bn_then_zero_padded_conv_is_refused():
    model = nn.Sequential(bn(4), nn.Conv2d(4, 6, 3, 1, 1))
    fused, report = check_fuse(model, torch.randn(2, 4, 7, 8), counts={"fold_bn": 0}, ops={"conv": 1, "bn": 1})
    reasons = " ".join(r.reason for r in report.refusals)
    assert "bias" in reasons and "pad" in reasons, reasons


def test_bn_then_linear():
    model = nn.Sequential(random_bn(nn.BatchNorm1d(5)), nn.Linear(5, 6))
    fused, _ = check_fuse(model, torch.randn(4, 5), counts={"fold_bn": 1}, ops={"bn": 0})
    assert graph_counts(fused) == {"linear": 1}


class LoneBNBranches(nn.Module):
    """x + BN1(x) + BN2(x): no conv anywhere, one channel-wise affine after fusion."""

    def __init__(self, c=4):
        super().__init__()
        self.bn1, self.bn2 = bn(c), bn(c)

    def forward(self, x):
        return x + self.bn1(x) + self.bn2(x)


def test_lone_bn_branches_become_one_channel_affine():
    check_fuse(
        LoneBNBranches(),
        torch.randn(2, 4, 5, 3),
        counts={"fold_bn": 2, "merge_parallel": 2},
        ops={"conv": 0, "bn": 0, "add": 0, "addcmul": 1},
    )


class ConvPlusLoneBN(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.bn = bn(c)

    def forward(self, x):
        return self.conv(x) + self.bn(x)


def test_lone_bn_branch_next_to_conv():
    check_fuse(
        ConvPlusLoneBN(), torch.randn(2, 4, 6, 5), counts={"fold_bn": 1, "merge_parallel": 1}, ops=no_bn_no_add(1)
    )


def test_bn_without_running_stats_is_never_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), random_bn(nn.BatchNorm2d(4, track_running_stats=False)))
    fused, report = check_fuse(model, torch.randn(3, 3, 6, 5), counts={"fold_bn": 0}, ops={"conv": 1, "bn": 1})
    assert any("running statistics" in r.reason for r in report.refusals), report.refusals


class ConvBNAndOtherUser(nn.Module):
    """The conv feeds the BN and a ReLU: folding the BN would duplicate the conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 1, 1)
        self.bn = bn(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + torch.relu(y)


def test_conv_with_two_users_is_not_duplicated():
    model = ConvBNAndOtherUser()
    fused, report = check_fuse(model, torch.randn(2, 3, 7, 6), ops={"conv": 1, "bn": None, "add": 1})
    assert count_ops(fused, torch.randn(2, 3, 7, 6, dtype=torch.float64))["conv"] == 1


# ============================================================================================
# merge_parallel: the classic blocks


class RepVGG(nn.Module):
    def __init__(self, cin, cout, stride=1, groups=1, nd=2, padding_mode="zeros"):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride, 1, groups, nd=nd, padding_mode=padding_mode)
        self.one = conv_bn(cin, cout, 1, stride, 0, groups, nd=nd)
        self.identity = bn(cin, nd) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.dense(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return F.relu(y)


@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (1, 2), (2, 4), (1, 4)])
def test_repvgg_block(stride, groups):
    model = RepVGG(8, 8, stride, groups)
    identity = stride == 1
    fused, _ = check_fuse(
        model,
        torch.randn(2, 8, 9, 7),
        counts={"fold_bn": 3 if identity else 2, "merge_parallel": 2 if identity else 1},
        ops=no_bn_no_add(1),
        sizes=[(1, 8, 6, 11)],
    )
    (conv,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.groups == groups and conv.kernel_size == (3, 3) and conv.stride == (stride, stride)


def test_repvgg_stack():
    model = nn.Sequential(RepVGG(3, 8, 2), RepVGG(8, 8), RepVGG(8, 16, 2, 2), RepVGG(16, 16, 1, 4))
    check_fuse(model, torch.randn(2, 3, 17, 15), counts={"fold_bn": 10, "merge_parallel": 6}, ops=no_bn_no_add(4))


class ACNet(nn.Module):
    def __init__(self, c=4, stride=1):
        super().__init__()
        self.square = conv_bn(c, c, 3, stride, 1)
        self.hor = conv_bn(c, c, (1, 3), stride, (0, 1))
        self.ver = conv_bn(c, c, (3, 1), stride, (1, 0))

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


@pytest.mark.parametrize("stride", [1, 2])
def test_acnet_block(stride):
    fused, _ = check_fuse(
        ACNet(4, stride), torch.randn(2, 4, 9, 12), counts={"fold_bn": 3, "merge_parallel": 2}, ops=no_bn_no_add(1)
    )
    (conv,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.kernel_size == (3, 3)


class NonSquare(nn.Module):
    """3x5 + 1x3 + 3x1 + 1x1, stride 2, on odd / rectangular sizes."""

    def __init__(self, c=3):
        super().__init__()
        self.a = conv_bn(c, 5, (3, 5), 2, (1, 2))
        self.b = conv_bn(c, 5, (1, 3), 2, (0, 1))
        self.c = conv_bn(c, 5, (3, 1), 2, (1, 0))
        self.d = nn.Conv2d(c, 5, 1, 2, 0)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x) + self.d(x)


def test_non_square_kernels_stride2_odd_sizes():
    fused, _ = check_fuse(
        NonSquare(),
        torch.randn(2, 3, 9, 14),
        counts={"fold_bn": 3, "merge_parallel": 3},
        ops=no_bn_no_add(1),
        sizes=[(1, 3, 8, 7), (1, 3, 11, 5)],
    )
    (conv,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.kernel_size == (3, 5) and conv.stride == (2, 2)


class QARepVGG(nn.Module):
    """BN after the sum: BN(BN(conv3x3(x)) + conv1x1(x) + x)."""

    def __init__(self, c=6):
        super().__init__()
        self.dense = conv_bn(c, c, 3, 1, 1)
        self.one = nn.Conv2d(c, c, 1, bias=False)
        self.bn = bn(c)

    def forward(self, x):
        return F.relu(self.bn(self.dense(x) + self.one(x) + x))


def test_qarepvgg_bn_after_sum():
    check_fuse(QARepVGG(), torch.randn(2, 6, 7, 8), counts={"fold_bn": 2, "merge_parallel": 2}, ops=no_bn_no_add(1))


class RepLK(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.large = conv_bn(c, c, 31, 1, 15, groups=c)
        self.small = conv_bn(c, c, 5, 1, 2, groups=c)

    def forward(self, x):
        return self.large(x) + self.small(x)


def test_replk_31x31_plus_5x5_depthwise():
    fused, _ = check_fuse(
        RepLK(),
        torch.randn(1, 4, 20, 17),
        counts={"fold_bn": 2, "merge_parallel": 1},
        ops=no_bn_no_add(1),
        float32=False,
    )
    (conv,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.kernel_size == (31, 31) and conv.groups == 4


class MobileOne(nn.Module):
    """k over-parameterised conv branches + a 1x1 scale branch + a BN skip (stride 1, in == out)."""

    def __init__(self, c=4, k=3, kernel=3, groups=1):
        super().__init__()
        self.convs = nn.ModuleList(conv_bn(c, c, kernel, 1, kernel // 2, groups) for _ in range(k))
        self.scale = conv_bn(c, c, 1, 1, 0, groups) if kernel > 1 else None
        self.skip = bn(c)

    def forward(self, x):
        y = self.skip(x)
        if self.scale is not None:
            y = y + self.scale(x)
        for conv in self.convs:
            y = y + conv(x)
        return F.relu(y)


@pytest.mark.parametrize("kernel,groups", [(3, 1), (3, 4), (1, 1)])
def test_mobileone_block(kernel, groups):
    has_scale = kernel > 1
    model = MobileOne(4, 3, kernel, groups)
    check_fuse(
        model,
        torch.randn(2, 4, 7, 6),
        counts={"fold_bn": 4 + has_scale, "merge_parallel": 3 + has_scale},
        ops=no_bn_no_add(1),
    )


class DBBPadded(nn.Module):
    """DBB's 1x1 -> kxk branch done right: F.pad before the 1x1 (with bias and BN) and no padding in the kxk."""

    def __init__(self, c=4, explicit_pad=True):
        super().__init__()
        self.explicit_pad = explicit_pad
        self.one = nn.Conv2d(c, c, 1, bias=True)
        self.bn1 = bn(c)
        self.kxk = nn.Conv2d(c, c, 3, 1, 0 if explicit_pad else 1, bias=False)
        self.bn2 = bn(c)

    def forward(self, x):
        if self.explicit_pad:
            x = F.pad(x, [1, 1, 1, 1])
        return self.bn2(self.kxk(self.bn1(self.one(x))))


def test_dbb_1x1_kxk_with_explicit_pad_is_exact():
    check_fuse(
        DBBPadded(explicit_pad=True),
        torch.randn(2, 4, 7, 6),
        counts={"compose": 1, "pad": 1, "fold_bn": 2},
        ops=no_bn_no_add(1, pad=0),
    )


def test_pad_is_not_counted_as_compose():
    _, report = reparam.fuse_with_report(PadConv([1, 1, 1, 1]).eval(), (torch.randn(1, 3, 6, 7),))
    assert report.counts() == {"pad": 1}


def test_dbb_1x1_kxk_without_pad_is_refused():
    fused, report = check_fuse(
        DBBPadded(explicit_pad=False), torch.randn(2, 4, 7, 6), counts={"compose": 0, "fold_bn": 2}, ops=no_bn_no_add(2)
    )
    assert any("bias" in r.reason and "pads with zeros" in r.reason for r in report.refusals), report.refusals


class DBBFull(nn.Module):
    """DiverseBranchBlock with exact branches: kxk, 1x1, pad->1x1->kxk, pad->1x1->avg (no pad in the avg)."""

    def __init__(self, c=4):
        super().__init__()
        self.origin = conv_bn(c, c, 3, 1, 1)
        self.one = conv_bn(c, c, 1)
        self.one_kxk = nn.Sequential(nn.ZeroPad2d(1), conv_bn(c, c, 1), conv_bn(c, c, 3))
        self.one_avg = nn.Sequential(
            nn.ZeroPad2d(1), nn.Conv2d(c, c, 1, bias=False), bn(c), nn.AvgPool2d(3, 1, 0), bn(c)
        )

    def forward(self, x):
        return self.origin(x) + self.one(x) + self.one_kxk(x) + self.one_avg(x)


def test_dbb_full_block():
    check_fuse(
        DBBFull(),
        torch.randn(2, 4, 8, 7),
        counts={"fold_bn": 6, "merge_parallel": 3, "pool": 1, "pad": 2},
        ops=no_bn_no_add(1, pad=0),
    )


class AvgBranch(nn.Module):
    def __init__(self, c=4, include_pad=True, stride=1):
        super().__init__()
        self.conv = conv_bn(c, c, 3, stride, 1)
        self.pool = nn.AvgPool2d(3, stride, 1, count_include_pad=include_pad)

    def forward(self, x):
        return self.conv(x) + self.pool(x)


@pytest.mark.parametrize("stride", [1, 2])
def test_avgpool_branch_count_include_pad_merges(stride):
    check_fuse(
        AvgBranch(include_pad=True, stride=stride),
        torch.randn(2, 4, 9, 8),
        counts={"pool": 1, "merge_parallel": 1, "fold_bn": 1},
        ops=no_bn_no_add(1, pool=0),
    )


def test_avgpool_branch_without_count_include_pad_is_refused():
    fused, report = check_fuse(
        AvgBranch(include_pad=False),
        torch.randn(2, 4, 9, 8),
        counts={"pool": 0, "merge_parallel": 0},
        ops={"conv": 1, "add": 1, "pool": 1},
        refused=("count_include_pad",),
    )


class ReflectBlock(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.dense = conv_bn(c, c, 3, 1, 1, padding_mode="reflect")
        self.one = conv_bn(c, c, 1)

    def forward(self, x):
        return self.dense(x) + self.one(x) + x


def test_reflect_padded_3x3_plus_1x1_plus_identity_merges():
    fused, _ = check_fuse(
        ReflectBlock(), torch.randn(2, 4, 7, 6), counts={"merge_parallel": 2, "fold_bn": 2}, ops=no_bn_no_add(1)
    )
    (conv,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.padding_mode == "reflect"


class ReflectPlusZero(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, 1, 1, padding_mode="reflect")
        self.b = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_reflect_padded_plus_zero_padded_3x3_is_refused():
    check_fuse(
        ReflectPlusZero(),
        torch.randn(2, 4, 7, 6),
        counts={"merge_parallel": 0},
        ops={"conv": 2, "add": 1},
        refused=("reflect",),
    )


@pytest.mark.parametrize("nd", [1, 3])
def test_1d_and_3d_blocks(nd):
    size = (2, 4, 11) if nd == 1 else (1, 4, 5, 6, 7)
    check_fuse(
        RepVGG(4, 4, 1, 2, nd=nd), torch.randn(*size), counts={"fold_bn": 3, "merge_parallel": 2}, ops=no_bn_no_add(1)
    )
    check_fuse(
        RepVGG(4, 6, 2, 2, nd=nd), torch.randn(*size), counts={"fold_bn": 2, "merge_parallel": 1}, ops=no_bn_no_add(1)
    )


class DilatedPlusOne(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, 1, 2, 2)
        self.b = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_dilated_3x3_plus_1x1_merges():
    check_fuse(DilatedPlusOne(), torch.randn(2, 4, 9, 8), counts={"merge_parallel": 1}, ops=no_bn_no_add(1))


# ============================================================================================
# merge_concat


class ConcatConvs(nn.Module):
    def __init__(self, c=4, k2=3, stride=1):
        super().__init__()
        self.a = conv_bn(c, 3, 3, stride, 1)
        self.b = conv_bn(c, 5, k2, stride, k2 // 2)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


@pytest.mark.parametrize("stride", [1, 2])
def test_channel_concat_of_parallel_convs(stride):
    fused, _ = check_fuse(
        ConcatConvs(stride=stride),
        torch.randn(2, 4, 9, 8),
        counts={"merge_concat": 1, "fold_bn": 2},
        ops=no_bn_no_add(1, cat=0),
    )
    (conv,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.out_channels == 8


def test_channel_concat_of_3x3_and_1x1_is_not_inflated():
    """Concatenating a 1x1 into a 3x3 would cost more MACs than it saves: two convs stay."""
    fused, report = check_fuse(
        ConcatConvs(k2=1), torch.randn(2, 4, 9, 8), counts={"merge_concat": 0, "fold_bn": 2}, ops=no_bn_no_add(2, cat=1)
    )


# ============================================================================================
# skip / scale / pad / dropout


class LinearSkip(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return x + self.conv(x)


def test_linear_skip():
    check_fuse(LinearSkip(), torch.randn(2, 4, 7, 5), counts={"skip": 1, "merge_parallel": 1}, ops=no_bn_no_add(1))


class LayerScale(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = conv_bn(c, c, 3, 1, 1)
        self.gamma = nn.Parameter(torch.randn(c, 1, 1))

    def forward(self, x):
        return x + self.gamma * self.conv(x)


def test_layer_scale():
    check_fuse(
        LayerScale(), torch.randn(2, 4, 6, 7), counts={"scale": 1, "skip": 1, "fold_bn": 1}, ops=no_bn_no_add(1, mul=0)
    )


class ScalarScale(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return (self.conv(x) * 0.5 - x / 4) * 2.0


def test_scalar_multiplies_and_subtraction():
    check_fuse(ScalarScale(), torch.randn(2, 4, 6, 7), ops=no_bn_no_add(1, mul=0))


class PadConv(nn.Module):
    def __init__(self, pads, c=3):
        super().__init__()
        self.pads = pads
        self.conv = nn.Conv2d(c, 5, 3, 1, 0)

    def forward(self, x):
        return self.conv(F.pad(x, self.pads))


def test_explicit_symmetric_zero_pad_folds_into_conv_padding():
    fused, _ = check_fuse(PadConv([1, 1, 1, 1]), torch.randn(2, 3, 6, 7), counts={"pad": 1}, ops=no_bn_no_add(1, pad=0))
    (conv,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.padding == (1, 1)


def test_explicit_asymmetric_zero_pad():
    check_fuse(PadConv([1, 2, 0, 1]), torch.randn(2, 3, 6, 7), counts={"pad": 1}, ops=no_bn_no_add(1))


class DropoutModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 1, 1)
        self.drop = nn.Dropout(0.3)
        self.bn = bn(4)
        self.drop2 = nn.Dropout2d(0.2)

    def forward(self, x):
        y = self.bn(self.drop(self.conv(x)))
        return F.dropout(self.drop2(y), 0.5, training=self.training)


def test_dropout_is_removed_in_eval():
    fused, _ = check_fuse(DropoutModel(), torch.randn(2, 3, 6, 5), counts={"fold_bn": 1}, ops=no_bn_no_add(1))
    assert not any(isinstance(m, nn.Dropout) for m in fused.modules())
    assert not any(n.target is F.dropout for n in fused.graph.nodes)


# ============================================================================================
# functional forms


class FunctionalConvBN(nn.Module):
    """F.conv2d with parameter weights, then timm's BatchNormAct2d pattern (_assert + F.batch_norm)."""

    def __init__(self, cin=3, cout=4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.randn(cout))
        self.bn = BatchNormAct2d(cout)
        random_bn(self.bn)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.weight, self.bias, stride=1, padding=1))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d's forward, trimmed to the eval path."""

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
        )
        return F.relu(x)


def test_functional_conv_and_timm_batchnorm_act():
    fused, _ = check_fuse(FunctionalConvBN(), torch.randn(2, 3, 7, 6), counts={"fold_bn": 1}, ops=no_bn_no_add(1))
    assert not any(n.target is F.batch_norm for n in fused.graph.nodes)


class FunctionalRepVGG(nn.Module):
    """RepVGG with every BN as BatchNormAct2d(act=identity) and the sum done with torch.add."""

    def __init__(self, c=4):
        super().__init__()
        self.w3 = nn.Parameter(torch.randn(c, c, 3, 3))
        self.w1 = nn.Parameter(torch.randn(c, c, 1, 1))
        self.bn3, self.bn1, self.bni = (random_bn(BNNoAct(c)) for _ in range(3))

    def forward(self, x):
        a = self.bn3(F.conv2d(x, self.w3, None, 1, 1))
        b = self.bn1(F.conv2d(x, self.w1))
        return torch.add(torch.add(a, b), self.bni(x))


class BNNoAct(BatchNormAct2d):
    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps
        )


def test_functional_repvgg_block():
    check_fuse(
        FunctionalRepVGG(), torch.randn(2, 4, 7, 6), counts={"fold_bn": 3, "merge_parallel": 2}, ops=no_bn_no_add(1)
    )


# ============================================================================================
# regressions: compiler bugs found by this battery (and fixed)


class PadPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(F.pad(F.pad(x, [1, 1, 1, 1]), [0, 1, 0, 0]))


def test_pad_only_region_adds_no_conv():
    x = torch.randn(2, 3, 5, 4)
    fused, _ = check_fuse(PadPad(), x, ops={"conv": 0, "pad": 1})


class InPlaceAfterAffineReader(nn.Module):
    """``y.mul_`` / ``y.relu_`` / ``y.add_`` mutate a tensor that an affine op has already read (eager order)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(4, 4, 3, 1, 1)
        self.bn = bn(4)

    def forward(self, x):
        y = self.conv(x)
        if self.kind == "mul_":
            z = self.bn(y)
            y.mul_(2)
            return y + z
        if self.kind == "relu_":
            w = y + 1
            y.relu_()
            return y + w
        z = y * 1
        y.add_(x)
        return y, z


@pytest.mark.parametrize("kind", ["mul_", "relu_", "add_"])
def test_in_place_mutation_is_respected(kind):
    check_fuse(InPlaceAfterAffineReader(kind), torch.randn(2, 4, 5, 6), ops={"conv": None, "add": None, "bn": None})


class ScaleThenPad(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.bn1, self.bn2 = bn(3, 1), bn(3, 1)

    def forward(self, x):
        if self.kind == "scale":
            return F.pad(x * 2, [1, 1])
        if self.kind == "neg":
            return F.pad(-x, [0, 0])
        return F.pad(self.bn2(self.bn1(x)), [0, 0])


@pytest.mark.parametrize("kind", ["scale", "neg", "bn"])
def test_channelwise_then_pad(kind):
    check_fuse(ScaleThenPad(kind), torch.randn(2, 3, 5), ops={"bn": None, "pad": None})


class AliasedIAdd(nn.Module):
    """``z = y; z += x`` also changes ``y`` in eager PyTorch; torch.fx traces ``+=`` as ``z = z + x``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, 1, 1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        z = y
        z += x
        return y + z


def test_aliased_in_place_add_is_never_silently_wrong():
    model = AliasedIAdd().double().eval()
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    fused = reparam.fuse(model, (x,))  # the trace is unfaithful: fused part by part instead, never refused
    assert any("unfaithfully" in note for note in fused.reparam_report.notes)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= F64_TOL


class MutationThroughAlias(nn.Module):
    """``z = y.add_(1)`` returns ``y`` itself, so ``y.mul_(2)`` afterwards changes ``z`` too."""

    def __init__(self):
        super().__init__()
        self.bn = bn(3)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = torch.relu(x)
        z = y.add_(1)
        y.mul_(2)
        return self.conv(self.bn(z))


def test_mutation_through_an_alias():
    """z shares y's storage, so bn(z) must not move above y.mul_(2): the whole storage is a barrier."""
    check_fuse(MutationThroughAlias(), torch.randn(2, 3, 5, 4), ops={"conv": None, "bn": None})


class UnusedInPlaceResult(nn.Module):
    """``y.relu_(); y.mul_(2)`` with their results unused, after an affine region that reads ``y`` first."""

    def __init__(self):
        super().__init__()
        self.bn = bn(3)
        self.c1 = nn.Conv2d(3, 3, 1, bias=False)
        self.c2 = nn.Conv2d(3, 3, 1, bias=False)

    def forward(self, x):
        y = torch.relu(x)
        z = self.c2(self.c1(self.bn(y)))
        y.relu_()
        y.mul_(2)
        return z, y


def test_in_place_op_with_unused_result_survives_rewrites():
    """Dead-code elimination keeps y.relu_() and y.mul_(2) although nobody reads their results."""
    check_fuse(UnusedInPlaceResult(), torch.randn(2, 3, 5, 4), ops={"conv": None})


class GhostCheapBranches(nn.Module):
    """GhostNetV3's module: ``x1 = sum of conv-BN branches(x)`` (a biased 1×1 once merged), then
    ``x2 = BN-1×1dw(x1) + BN(x1) + sum of 3×3dw-BN(x1)`` and ``cat([x1, x2])``.  The 1×1 and BN
    branches compose through x1's conv, the zero-padded 3×3 ones cannot (the bias would leak into the
    border), so the sum's terms have different roots."""

    def __init__(self, c=4):
        super().__init__()
        self.primary = nn.ModuleList([conv_bn(3, c, 1) for _ in range(2)])
        self.scale = conv_bn(c, c, 1, groups=c)
        self.skip = bn(c)
        self.cheap = nn.ModuleList([conv_bn(c, c, 3, padding=1, groups=c) for _ in range(3)])

    def forward(self, x):
        x1 = self.primary[0](x) + self.primary[1](x)
        x2 = self.scale(x1) + self.skip(x1)
        for conv in self.cheap:
            x2 += conv(x1)
        return torch.cat([x1, x2], dim=1)


def test_join_with_terms_from_different_roots_merges_from_the_common_one():
    """before: 7 convs, 6 BNs, 5 adds -> after: the 1×1 from x and one 3×3 depthwise from x1."""
    check_fuse(GhostCheapBranches(), torch.randn(2, 3, 7, 6), ops=no_bn_no_add(2, cat=1))


class BranchAfterStrided(nn.Module):
    """Unprofitable region (a concat of an identity and a conv): cut at the nearest join's inputs only,
    so the inner sum still merges."""

    def __init__(self, c=4):
        super().__init__()
        self.a = conv_bn(c, c, 3, padding=1)
        self.b = conv_bn(c, c, 1)

    def forward(self, x):
        y = torch.relu(x)
        return torch.cat([y, self.a(y) + self.b(y) + y], dim=1)


def test_unprofitable_concat_cuts_at_its_own_inputs():
    check_fuse(BranchAfterStrided(), torch.randn(2, 4, 6, 5), ops=no_bn_no_add(1, cat=1))
