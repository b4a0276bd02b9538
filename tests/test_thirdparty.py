"""``reparam.fuse`` on third-party models: timm's reparameterizable families and torchvision's classics.

Random weights (``pretrained=False``), non-trivial BatchNorm statistics (running_mean ~ N(0, 0.1),
running_var ~ U(0.5, 2)), the smallest input each model accepts.  For every model:

* exact: the fused float32 model within 1e-5 (relative L2) of the float32 original, the fused float64
  model within 1e-9 of the float64 original;
* the input model is untouched (state dict bit-identical, same mode);
* no more multiply-accumulates (``reparam.stats.count_macs``) than the original;
* no more convolutions or batch norms executed than the original, and than timm's own deploy path
  (``timm.utils.model.reparameterize_model``) where the model has one, else than PyTorch's conv/BN
  folding (``torch.fx.experimental.optimization.fuse``).

The default run covers one model or two per family; ``-m slow`` sweeps every model that
``benchmarks/coverage.py --all`` does.  Also here: inputs of batch 1, rectangular and channels-last,
tuple/dict/list outputs, the fallback for models fx cannot trace, and the lift rules for reshapes.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reparam
from reparam.stats import count_kernels, count_macs, relative_error

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

torch.set_num_threads(1)  # small float64 convolutions on a loaded 2-core machine: threads only hurt

_SPEC = importlib.util.spec_from_file_location(
    "reparam_coverage", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "coverage.py")
)
coverage = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = coverage  # dataclasses look their module up there
_SPEC.loader.exec_module(coverage)

FP32_TOL, FP64_TOL = coverage.FP32_TOL, coverage.FP64_TOL

# what CI runs: one model per family (the slow sweep takes all of them)
TIMM_SLICE = [
    "repvgg_a0",
    "repvgg_b1g4",
    "mobileone_s0",
    "mobileone_s4",
    "gernet_s",
    "fastvit_t8",
    "fastvit_sa12",
    "repghostnet_050",
    "repvit_m0_9",
    "ghostnetv2_100",
    "ghostnetv3_050",
    "levit_128s",
    "levit_conv_128s",
    "efficientvit_m0",
    "shvit_s1",
    "tiny_vit_5m_224",
    "lcnetv2_small",
    "efficientvim_m1",
    "iformer_t",
    "nextvit_small",
]
TV_SLICE = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_y_400mf",
    "vgg11_bn",
    "shufflenet_v2_x0_5",
    "googlenet",
    "inception_v3",
    "densenet121",
    "convnext_tiny",
    "mnasnet0_5",
]
MAX_PARAMS = 150e6  # float64 copies of larger models exhaust a small CI machine's memory


def _param(name: str):
    """Models hit by a known compiler limitation (``coverage.KNOWN_ISSUES``) run as non-strict xfails."""
    why = coverage.known_issue(name)
    return pytest.param(name, marks=pytest.mark.xfail(reason=why, strict=False)) if why else name


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _snapshot(model):
    return model.training, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, snap):
    training, state = snap
    now = model.state_dict()
    assert model.training == training
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), f"input model changed: {k}"


def check_model(name: str) -> None:
    """The whole contract on one model (see the module docstring)."""
    model, x, _ = coverage.build(name)
    snap = _snapshot(model)
    with torch.no_grad():
        want = model(x)
    fused = reparam.fuse(model, (x,))
    _assert_untouched(model, snap)
    with torch.no_grad():
        err32 = relative_error(fused(x), want)
    assert err32 <= FP32_TOL, f"{name}: float32 relative error {err32:.2e}"

    m64, x64 = copy.deepcopy(model).double(), x.double()
    with torch.no_grad():
        want64 = m64(x64)
    fused64 = reparam.fuse(m64, (x64,), check=False)  # checked here, against the float64 original
    with torch.no_grad():
        got64 = fused64(x64)
    assert all(t.dtype == torch.float64 for t in torch.utils._pytree.tree_leaves(got64))
    err64 = relative_error(got64, want64)
    assert err64 <= FP64_TOL, f"{name}: float64 relative error {err64:.2e}"

    # the MAC invariant: under the default cost="macs" no merge adds multiply-accumulates (FlopCounterMode's count)
    macs_before, macs_after = count_macs(model, x), count_macs(fused, x)
    assert macs_after <= macs_before, f"{name}: MACs grew from {macs_before:,} to {macs_after:,}"

    ours = count_kernels(fused, x)
    before = count_kernels(model, x)
    assert ours["conv"] <= before["conv"] and ours["batch_norm"] <= before["batch_norm"], (name, before, ours)
    deploy, label = coverage.reference_deploy(model)  # timm's deploy path, else torch.fx's BN folding
    if deploy is not None:
        theirs = count_kernels(deploy, x)
        assert ours["conv"] <= theirs["conv"], f"{name}: {ours['conv']} convs, {label}'s deploy path {theirs['conv']}"
        assert ours["batch_norm"] <= theirs["batch_norm"], (
            f"{name}: {ours['batch_norm']} batch norms, {label}'s deploy path {theirs['batch_norm']}"
        )


@pytest.mark.parametrize("name", [_param(n) for n in TIMM_SLICE + [f"tv:{n}" for n in TV_SLICE]])
def test_slice(name):
    check_model(name)


def _sweep_names():
    try:
        return coverage.model_names(all_models=True)
    except (ImportError, AttributeError, KeyError):  # timm reorganised: the slow sweep has nothing to enumerate
        return []


@pytest.mark.slow
@pytest.mark.parametrize("name", [_param(n) for n in _sweep_names() if n not in TIMM_SLICE and n[3:] not in TV_SLICE])
def test_sweep(name):
    params = coverage.param_count(name)
    if params is not None and params > MAX_PARAMS:
        pytest.skip(f"{params / 1e6:.0f}M parameters")
    check_model(name)


def test_families_are_enumerated():
    """The sweep finds timm's reparameterizable families itself (no hand-kept list)."""
    families = coverage.timm_families()
    assert {"byobnet", "fastvit", "repghost", "repvit", "ghostnet", "levit"} <= set(families)
    names = {n for ns in families.values() for n in ns}
    assert {"repvgg_a0", "mobileone_s0", "fastvit_t8", "repghostnet_050", "repvit_m0_9", "levit_128s"} <= names


# ----------------------------------------------------------------------------------------------- inputs


def _small_repvgg():
    model, _, _ = coverage.build("repvgg_a0")
    return model


@pytest.mark.parametrize(
    "shape,channels_last",
    [
        ((1, 3, 64, 64), False),  # batch 1
        ((2, 3, 48, 80), False),  # rectangular
        ((2, 3, 64, 64), True),  # channels-last memory format
        ((1, 3, 37, 53), True),  # all of it, odd sizes
    ],
)
def test_input_variants(shape, channels_last):
    model = _small_repvgg()
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_before = x.clone()
    fused = reparam.fuse(model, (x,))
    assert torch.equal(x, x_before)
    with torch.no_grad():
        want, got = model(x), fused(x)
        assert relative_error(got, want) <= FP32_TOL
        other = torch.randn(shape)  # the fused model is not specialised to the example's shape
        assert relative_error(fused(other), model(other)) <= FP32_TOL
    assert count_kernels(fused, x)["conv"] == 22


@pytest.mark.parametrize("name", ["fastvit_t8", "tv:mobilenet_v3_small"])
def test_batch1_rectangular_channels_last_other_families(name):
    model, _, _ = coverage.build(name)
    x = torch.randn(1, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    fused = reparam.fuse(model, (x,))
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) <= FP32_TOL
        other = torch.randn(3, 3, 64, 96)
        assert relative_error(fused(other), model(other)) <= FP32_TOL
    assert count_kernels(fused, x)["batch_norm"] == 0


def test_inferred_example_inputs():
    """No example inputs: reparam finds a size the model accepts and still verifies."""
    model, x, _ = coverage.build("mobileone_s0")
    fused = reparam.fuse(model)
    report = fused.reparam_report
    assert report.max_rel_error is not None and 0 <= report.max_rel_error <= 1e-8  # verified on the inferred inputs
    assert not any("verification skipped" in note for note in report.notes)
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) <= FP32_TOL


class TupleDictOutputs(nn.Module):
    """A timm backbone whose forward returns a dict holding a tuple, a list and a tensor."""

    def __init__(self):
        super().__init__()
        self.body = timm.create_model("repvgg_a0", pretrained=False, features_only=True, out_indices=(1, 3))
        coverage.randomize_batchnorm_(self.body)

    def forward(self, x):
        feats = self.body(x)
        return {"pair": (feats[0], feats[1].mean((2, 3))), "list": [feats[1]], "last": feats[-1]}


def test_tuple_dict_list_outputs():
    model = TupleDictOutputs().eval()
    x = torch.randn(1, 3, 64, 96)
    fused = reparam.fuse(model, (x,))
    with torch.no_grad():
        got, want = fused(x), model(x)
    assert set(got) == {"pair", "list", "last"} and isinstance(got["pair"], tuple) and isinstance(got["list"], list)
    assert relative_error(got, want) <= FP32_TOL
    assert count_kernels(fused, x)["batch_norm"] == 0


def test_features_only_model():
    model = timm.create_model("mobileone_s0", pretrained=False, features_only=True)
    coverage.randomize_batchnorm_(model).eval()
    x = torch.randn(2, 3, 64, 64)
    fused = reparam.fuse(model, (x,))
    with torch.no_grad():
        got, want = fused(x), model(x)
    assert isinstance(got, list) and len(got) == len(want)
    assert relative_error(got, want) <= FP32_TOL
    assert count_kernels(fused, x)["batch_norm"] == 0


# ----------------------------------------------------------------------------------------------- fallback


class DataDependent(nn.Module):
    """Branches on a tensor's value: fx cannot trace the whole; its children still fuse."""

    def __init__(self):
        super().__init__()
        self.a = timm.create_model("repvgg_a0", pretrained=False, num_classes=0)
        self.b = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        coverage.randomize_batchnorm_(self)

    def forward(self, x):
        if x.mean() > 100:  # data-dependent control flow
            return self.b(x)
        return self.a(x) + self.b(x).mean((2, 3)).sum(1, keepdim=True)


def test_untraceable_model_falls_back_and_names_the_parts():
    model = DataDependent().eval()
    x = torch.randn(2, 3, 64, 64)
    fused = reparam.fuse(model, (x,))
    notes = fused.reparam_report.notes
    assert any("DataDependent" in n and "trace" in n for n in notes), notes
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) <= FP32_TOL
    counts = count_kernels(fused, x)
    assert counts["batch_norm"] == 0 and counts["conv"] == 22 + 1


def test_untraceable_model_without_example_inputs_is_fused_and_verified():
    """No example inputs and no trace: inputs are inferred from the first layer, one eager run records
    every child's inputs, and the result is still checked."""
    model = DataDependent().eval()
    fused = reparam.fuse(model)
    assert fused.reparam_report.max_rel_error is not None and fused.reparam_report.max_rel_error <= 1e-8
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) <= FP32_TOL
    counts = count_kernels(fused, x)
    assert counts["batch_norm"] == 0 and counts["conv"] == 22 + 1


def test_untraceable_model_with_constant_inputs_checks_a_random_twin(monkeypatch):
    import reparam.pipeline as pipeline

    calls = []
    real = pipeline.record_calls
    monkeypatch.setattr(pipeline, "record_calls", lambda m, x, only: calls.append(x) or real(m, x, only))
    model = DataDependent().eval()
    fused = reparam.fuse(model, (torch.zeros(1, 3, 32, 32),))
    # the parts are proven on what a random twin of the user's zeros makes them see
    assert calls and all(c[0].shape == (1, 3, 32, 32) and float(c[0].std()) > 0.5 for c in calls)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) <= FP32_TOL


class ConvBNWithConfig(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.window = 4  # read by the parent's forward, like timm's LocalWindowAttention reads attn.resolution
        coverage.randomize_batchnorm_(self)

    def forward(self, x):
        return self.bn(self.conv(x))


class ReadsChildAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = ConvBNWithConfig()

    def forward(self, x):
        if x.shape[-1] == self.inner.window:  # control flow on a shape: fx cannot trace this module
            return self.inner(x)
        return self.inner(x).amax(-1) * self.inner.window


def test_fallback_keeps_plain_attributes_of_traced_children():
    model = ReadsChildAttribute().eval()
    x = torch.randn(2, 3, 8, 8)
    fused = reparam.fuse(model, (x,))
    assert fused.inner.window == 4
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) <= 1e-6
    assert count_kernels(fused, x)["batch_norm"] == 0


# ----------------------------------------------------------------------------------------------- lift rules


class LinearNorm(nn.Module):
    """LeViT's ``Linear -> BatchNorm1d over tokens``: ``bn(linear(x).flatten(0, 1)).reshape_as(...)``."""

    def __init__(self, cin=8, cout=12):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)
        self.head = nn.Linear(cout, 5)
        coverage.randomize_batchnorm_(self)

    def forward(self, x):
        y = self.linear(x)
        return self.head(self.bn(y.flatten(0, 1)).reshape_as(y))


class OpenFlatten(nn.Module):
    """A flatten that is not undone: the scale before it still folds into the linear."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(F.gelu((self.linear(x) * 3.0).flatten(0, 1)))


def _fused_counts(model, x):
    fused = reparam.fuse(model, (x,))
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) <= 1e-6
    return count_kernels(fused, x), fused


def test_reshape_pair_around_batchnorm1d_folds_into_linear():
    counts, fused = _fused_counts(LinearNorm().eval(), torch.randn(2, 7, 8))
    assert counts["batch_norm"] == 0 and counts["linear"] == 1  # linear, BN and head: one matmul


def test_unpaired_reshape_is_not_lifted():
    """Lifting it would end the region at the flatten, whose shape is not the root's: nothing would fold."""
    model = OpenFlatten().eval()
    x = torch.randn(2, 7, 8)
    fused = reparam.fuse(model, (x,))
    from conftest import count_ops

    assert count_ops(fused, x)["mul"] == 0
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) <= 1e-6


class SquareTranspose(nn.Module):
    """A transpose of a square token grid keeps the shape but moves the data: never lifted."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x):  # x: (N, N, 6)
        return self.b(self.a(x).transpose(0, 1))


def test_square_transpose_is_not_lifted():
    model = SquareTranspose().eval()
    x = torch.randn(5, 5, 6)
    counts, _ = _fused_counts(model, x)
    assert counts["linear"] == 2


class ReshapeChannelsFirst(nn.Module):
    """A reshape that keeps the last axis of a channels-first tensor does not carry a conv through."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        coverage.randomize_batchnorm_(self)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y.flatten(0, 1).relu().reshape_as(y) * 2.0


def test_reshape_of_channels_first_tensor():
    counts, _ = _fused_counts(ReshapeChannelsFirst().eval(), torch.randn(2, 4, 6, 6))
    assert counts["batch_norm"] == 0 and counts["conv"] == 1


class ContiguousBeforeView(nn.Module):
    """``.contiguous()`` matters before a ``view``: ShuffleNet's channel shuffle, and a flatten by view
    of a conv output (channels-last when the input is)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        coverage.randomize_batchnorm_(self)

    def forward(self, x):
        y = self.bn(self.conv(x))
        b, c, h, w = y.size()
        s = torch.transpose(y.view(b, 2, c // 2, h, w), 1, 2).contiguous().view(b, c, h, w)
        return s + y.contiguous().view(b, c, h, w)


@pytest.mark.parametrize("channels_last", [False, True])
def test_contiguous_before_view_is_kept(channels_last):
    model = ContiguousBeforeView().eval()
    x = torch.randn(2, 4, 6, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fused = reparam.fuse(model, (x,))
    for inp in (x, torch.randn(2, 4, 6, 5).contiguous(memory_format=torch.channels_last)):
        with torch.no_grad():
            assert relative_error(fused(inp), model(inp)) <= 1e-6
    assert count_kernels(fused, x)["batch_norm"] == 0
