"""Tests of the training-time model zoo (``reparam.models``) and of fusing it with ``reparam.fuse``.

* layout: official checkpoint key names and shapes (built on the meta device, so every model is cheap);
* state dicts: strict round trips with randomized, non-trivial BatchNorm statistics;
* blocks: each block computes its documented formula;
* fusion: every block and zoo model fuses exactly in float64 (relative error <= 1e-10) to the
  expected number of executed convolutions, with no batch norm and no branch addition left.
  Kernels are counted with a ``TorchDispatchMode``, i.e. what actually runs, not what the graph says.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import reparam
import reparam.models as zoo
from reparam.models import (
    ACBlock,
    DiverseBranchBlock,
    MobileOneBlock,
    QARepVGGBlock,
    RepLKBlock,
    RepVGGBlock,
)
from reparam.models.mobileone import official_mobileone
from reparam.models.repvgg import GROUPWISE_LAYERS, OFFICIAL_CONFIGS as REPVGG_CONFIGS, official_repvgg

REPVGG_NAMES = sorted(REPVGG_CONFIGS)
MOBILEONE_NAMES = [f"mobileone_s{i}" for i in range(5)]
RELATIVE_TOLERANCE = 1e-10
DIGITS_CHECKPOINT = Path(__file__).resolve().parents[1] / "examples" / "checkpoints" / "repvgg_digits.pt"


# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def single_threaded():
    """Run single-threaded: the tensors here are small, and on a busy 2-core machine intra-op threads
    mostly spin-wait (measured: 45 s instead of 200 s for this file). Restores the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class KernelCounter(TorchDispatchMode):
    """Counts the aten kernels a forward pass executes: convolutions, batch norms, tensor additions."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "convolution":
            self.counts["conv"] += 1
        elif "batch_norm" in name:
            self.counts["batch_norm"] += 1
        elif name in ("add", "add_") and func._overloadname == "Tensor":
            self.counts["add"] += 1
        return func(*args, **(kwargs or {}))


def count_kernels(module: nn.Module, x: torch.Tensor) -> Counter:
    counter = KernelCounter()
    with torch.no_grad(), counter:
        module(x)
    return counter.counts


def randomize_batchnorm_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics (in place)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                shape, dtype = bn.running_mean.shape, bn.running_mean.dtype
                bn.running_mean.copy_(0.1 * torch.randn(shape, generator=generator, dtype=dtype))
                bn.running_var.copy_(0.5 + 1.5 * torch.rand(shape, generator=generator, dtype=dtype))
                bn.weight.copy_(0.5 + torch.rand(shape, generator=generator, dtype=dtype))
                bn.bias.copy_(0.1 * torch.randn(shape, generator=generator, dtype=dtype))
                bn.num_batches_tracked.fill_(7)
    return module


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def fuse_and_check(model: nn.Module, x: torch.Tensor) -> Counter:
    """Fuse ``model`` in float64, assert the fused output matches, return the fused model's kernel counts."""
    model = randomize_batchnorm_(model.double().eval())
    x = x.double()
    fused = reparam.fuse(model, (x,))
    with torch.no_grad():
        ref, out = model(x), fused(x)
    error = relative_error(out, ref)
    assert error <= RELATIVE_TOLERANCE, f"fused output differs: relative error {error:.3g}"
    return count_kernels(fused, x)


def expected_counts(name: str) -> Counter:
    entry = zoo.spec(name)
    return Counter({"conv": entry.deploy_convs, "add": entry.deploy_adds})


def small_input(name: str, batch: int = 2) -> torch.Tensor:
    channels, height, width = zoo.spec(name).input_size
    size = (height, width) if height < 64 else (64, 64)
    return torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(1))


def meta_state_shapes(name: str) -> dict:
    with torch.device("meta"):
        model = zoo.create(name)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ registry


def test_names_cover_the_issue_list():
    expected = {
        "repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "repvgg_b1g2", "repvgg_b1g4",
        "repvgg_b2", "repvgg_b2g2", "repvgg_b2g4", "repvgg_b3", "repvgg_b3g2", "repvgg_b3g4", "repvgg_d2se",
        "mobileone_s0", "mobileone_s1", "mobileone_s2", "mobileone_s3", "mobileone_s4",
        "acnet_resnet18", "dbb_resnet18", "repvgg_digits",
    }  # fmt: skip
    assert expected <= set(zoo.names())
    assert zoo.names() == sorted(zoo.names())


def test_create_rejects_unknown_names_and_passes_num_classes():
    with pytest.raises(KeyError, match="repvgg_a0"):
        zoo.create("repvgg_z9")
    with torch.device("meta"):
        assert zoo.create("repvgg_a0", num_classes=7).linear.out_features == 7
        assert zoo.create("repvgg_a0").linear.out_features == 1000
        assert zoo.create("repvgg_digits").linear.out_features == 10


@pytest.mark.parametrize("name", ["repvgg_b1", "mobileone_s2", "dbb_resnet18"])
def test_zoo_holds_training_time_definitions_only(name):
    with torch.device("meta"):
        model = zoo.create(name)
    for module in model.modules():
        for method in ("switch_to_deploy", "reparameterize", "fuse"):
            assert not hasattr(module, method), f"{type(module).__name__} has a deploy method {method}"


# -------------------------------------------------------------------------------------- official layouts


def test_repvgg_a0_official_keys():
    shapes = meta_state_shapes("repvgg_a0")
    assert shapes["stage0.rbr_dense.conv.weight"] == (48, 3, 3, 3)
    assert shapes["stage0.rbr_1x1.conv.weight"] == (48, 3, 1, 1)
    assert shapes["stage0.rbr_dense.bn.running_var"] == (48,)
    assert not any(key.startswith("stage0.rbr_identity") for key in shapes)
    for stage in range(1, 5):
        assert f"stage{stage}.0.rbr_identity.weight" not in shapes
    assert shapes["stage1.1.rbr_identity.running_mean"] == (48,)
    assert shapes["stage3.13.rbr_dense.conv.weight"] == (192, 192, 3, 3)
    assert shapes["stage4.0.rbr_dense.conv.weight"] == (1280, 192, 3, 3)
    assert shapes["linear.weight"] == (1000, 1280)
    assert "stage3.14.rbr_dense.conv.weight" not in shapes
    assert len(shapes) == 351


@pytest.mark.parametrize("name", REPVGG_NAMES)
def test_repvgg_layouts(name):
    _, depths, multipliers, groups, use_se = REPVGG_CONFIGS[name]
    shapes = meta_state_shapes(name)
    widths = [int(64 * multipliers[0]), int(128 * multipliers[1]), int(256 * multipliers[2]), int(512 * multipliers[3])]
    stem = min(64, widths[0])
    assert shapes["stage0.rbr_dense.conv.weight"] == (stem, 3, 3, 3)
    channels, layer = stem, 1
    for stage, (depth, width) in enumerate(zip(depths, widths, strict=True), start=1):
        for block in range(depth):
            prefix = f"stage{stage}.{block}"
            layer_groups = groups if layer in GROUPWISE_LAYERS else 1
            assert shapes[f"{prefix}.rbr_dense.conv.weight"] == (width, channels // layer_groups, 3, 3)
            assert shapes[f"{prefix}.rbr_1x1.conv.weight"] == (width, channels // layer_groups, 1, 1)
            assert (f"{prefix}.rbr_identity.weight" in shapes) == (block > 0)
            assert (f"{prefix}.se.down.weight" in shapes) == use_se
            channels, layer = width, layer + 1
        assert f"stage{stage}.{depth}.rbr_dense.conv.weight" not in shapes
    assert shapes["linear.weight"] == (1000, widths[3])


def test_repvgg_d2se_official_keys():
    shapes = meta_state_shapes("repvgg_d2se")
    assert shapes["stage0.se.down.weight"] == (4, 64, 1, 1)
    assert shapes["stage0.se.up.bias"] == (64,)
    assert shapes["stage3.23.se.down.weight"] == (40, 640, 1, 1)
    assert shapes["stage4.0.se.up.weight"] == (2560, 160, 1, 1)
    assert len(shapes) == 985


def test_mobileone_s0_official_keys():
    shapes = meta_state_shapes("mobileone_s0")
    assert shapes["stage0.rbr_conv.0.conv.weight"] == (48, 3, 3, 3)
    assert "stage0.rbr_conv.1.conv.weight" not in shapes  # the stem has a single conv branch
    assert shapes["stage0.rbr_scale.conv.weight"] == (48, 3, 1, 1)
    assert not any(key.startswith("stage0.rbr_skip") for key in shapes)
    assert shapes["stage1.0.rbr_conv.3.conv.weight"] == (48, 1, 3, 3)  # depthwise, 4 branches
    assert "stage1.0.rbr_conv.4.conv.weight" not in shapes
    assert "stage1.0.rbr_skip.weight" not in shapes  # stride 2
    assert shapes["stage1.0.rbr_scale.conv.weight"] == (48, 1, 1, 1)
    assert shapes["stage1.1.rbr_conv.3.conv.weight"] == (48, 48, 1, 1)  # pointwise
    assert "stage1.1.rbr_scale.conv.weight" not in shapes  # no scale branch for 1x1 blocks
    assert shapes["stage1.1.rbr_skip.running_var"] == (48,)
    assert shapes["stage2.1.rbr_conv.0.conv.weight"] == (128, 48, 1, 1)
    assert "stage2.1.rbr_skip.weight" not in shapes
    assert shapes["stage4.1.rbr_conv.0.conv.weight"] == (1024, 256, 1, 1)
    assert shapes["linear.weight"] == (1000, 1024)
    assert not any(".se." in key for key in shapes)
    assert len(shapes) == 1323


def test_mobileone_s4_squeeze_excitation_placement():
    shapes = meta_state_shapes("mobileone_s4")
    se_blocks = sorted({key.rsplit(".se.", 1)[0] for key in shapes if ".se." in key})
    expected = [f"stage3.{i}" for i in range(10, 20)] + ["stage4.0", "stage4.1"]
    assert se_blocks == sorted(expected)
    assert shapes["stage3.10.se.reduce.weight"] == (56, 896, 1, 1)
    assert shapes["stage3.19.se.expand.weight"] == (896, 56, 1, 1)
    assert shapes["stage4.1.se.reduce.weight"] == (128, 2048, 1, 1)
    assert shapes["stage0.rbr_conv.0.conv.weight"] == (64, 3, 3, 3)


@pytest.mark.parametrize("name", MOBILEONE_NAMES)
def test_mobileone_layouts(name):
    shapes = meta_state_shapes(name)
    branches = 4 if name == "mobileone_s0" else 1
    for stage, depth in enumerate([2, 8, 10, 1], start=1):
        for unit in range(depth):
            depthwise, pointwise = f"stage{stage}.{2 * unit}", f"stage{stage}.{2 * unit + 1}"
            assert shapes[f"{depthwise}.rbr_conv.0.conv.weight"][1:] == (1, 3, 3)
            assert f"{depthwise}.rbr_conv.{branches - 1}.bn.weight" in shapes
            assert f"{depthwise}.rbr_conv.{branches}.bn.weight" not in shapes
            assert f"{depthwise}.rbr_scale.conv.weight" in shapes
            assert (f"{depthwise}.rbr_skip.weight" in shapes) == (unit > 0)
            assert shapes[f"{pointwise}.rbr_conv.0.conv.weight"][2:] == (1, 1)
            assert f"{pointwise}.rbr_scale.conv.weight" not in shapes
        assert f"stage{stage}.{2 * depth}.rbr_conv.0.conv.weight" not in shapes


def test_resnet18_variant_layouts():
    acnet, dbb = meta_state_shapes("acnet_resnet18"), meta_state_shapes("dbb_resnet18")
    for shapes in (acnet, dbb):
        assert shapes["stage0.conv1.conv.weight"] == (64, 3, 7, 7)
        assert shapes["stage2.0.shortcut.conv.weight"] == (128, 64, 1, 1)
        assert "stage1.0.shortcut.conv.weight" not in shapes
        assert shapes["linear.weight"] == (1000, 512)
    assert acnet["stage1.0.conv1.square_conv.weight"] == (64, 64, 3, 3)
    assert acnet["stage2.0.conv1.ver_conv.weight"] == (128, 64, 3, 1)
    assert acnet["stage2.0.conv1.hor_conv.weight"] == (128, 64, 1, 3)
    assert dbb["stage1.0.conv1.dbb_origin.conv.weight"] == (64, 64, 3, 3)
    assert dbb["stage1.0.conv1.dbb_avg.conv.weight"] == (64, 64, 1, 1)
    assert dbb["stage1.0.conv1.dbb_1x1_kxk.conv2.weight"] == (64, 64, 3, 3)
    assert dbb["stage4.1.conv2.dbb_1x1.conv.weight"] == (512, 512, 1, 1)


# -------------------------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "acnet_resnet18", "dbb_resnet18", "repvgg_digits"])
def test_state_dict_round_trip_with_random_batchnorm(name):
    torch.manual_seed(0)
    source = randomize_batchnorm_(zoo.create(name), seed=3).eval()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    torch.manual_seed(1)
    fresh = zoo.create(name).eval()
    x = small_input(name)
    with torch.no_grad():
        before = fresh(x)
        fresh.load_state_dict(state, strict=True)
        after, expected = fresh(x), source(x)
    assert torch.equal(after, expected)
    assert not torch.allclose(before, expected)  # the load really changed the computation
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_shipped_digits_checkpoint_loads_strictly_and_fuses():
    state = torch.load(DIGITS_CHECKPOINT, weights_only=True)
    assert DIGITS_CHECKPOINT.stat().st_size < 1_000_000
    model = zoo.create("repvgg_digits").double().eval()
    model.load_state_dict(state, strict=True)
    x = small_input("repvgg_digits", batch=4).double()
    fused = reparam.fuse(model, (x,))
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) <= RELATIVE_TOLERANCE
    assert count_kernels(fused, x) == expected_counts("repvgg_digits")


def test_strict_load_names_missing_and_unexpected_keys():
    state = zoo.create("repvgg_digits").state_dict()
    state["stage1.0.rbr_identity.weight"] = state.pop("stage1.1.rbr_identity.weight")
    with pytest.raises(RuntimeError, match="stage1.1.rbr_identity.weight"):
        zoo.create("repvgg_digits").load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------- block formulas


def _input(channels: int = 8, height: int = 13, width: int = 11) -> torch.Tensor:
    return torch.randn(2, channels, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def _eval64(block: nn.Module) -> nn.Module:
    return randomize_batchnorm_(block.double().eval(), seed=5)


def test_repvgg_block_formula():
    block = _eval64(RepVGGBlock(8, 8))
    x = _input()
    expected = F.relu(block.rbr_dense(x) + block.rbr_1x1(x) + block.rbr_identity(x))
    assert torch.equal(block(x), expected)
    assert RepVGGBlock(8, 16).rbr_identity is None and RepVGGBlock(8, 8, stride=2).rbr_identity is None


def test_mobileone_block_formula():
    block = _eval64(MobileOneBlock(8, 8, 3, groups=8, num_conv_branches=3))
    x = _input()
    expected = block.rbr_scale(x) + block.rbr_skip(x)
    for branch in block.rbr_conv:
        expected = expected + branch(x)
    assert torch.equal(block(x), F.relu(expected))
    assert MobileOneBlock(8, 16, 1).rbr_scale is None


def test_qarepvgg_block_formula():
    block = _eval64(QARepVGGBlock(8, 8))
    x = _input()
    assert torch.equal(block(x), F.relu(block.bn(block.rbr_dense(x) + block.rbr_1x1(x) + x)))
    assert not QARepVGGBlock(8, 8, stride=2).has_identity


def test_acblock_formula_and_asymmetric_shapes():
    block = _eval64(ACBlock(8, 16, 5, stride=2))
    x = _input()
    expected = block.square_bn(block.square_conv(x)) + block.ver_bn(block.ver_conv(x)) + block.hor_bn(block.hor_conv(x))
    assert torch.equal(block(x), expected)
    assert block.ver_conv.weight.shape == (16, 8, 5, 1) and block.hor_conv.weight.shape == (16, 8, 1, 5)


def _bn_then_pad_with_bn_value(bn: nn.BatchNorm2d, y: torch.Tensor, pad: int) -> torch.Tensor:
    """Official DBB semantics in eval mode: batch-normalize, then pad with the BN's output for a zero input."""
    normalized = bn(y)
    border = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
    padded = F.pad(normalized, [pad] * 4)
    inside = F.pad(torch.ones_like(normalized), [pad] * 4)
    return padded + (1 - inside) * border.view(1, -1, 1, 1)


@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 2)])
def test_dbb_borders_match_bn_and_pad_semantics(stride, groups):
    block = _eval64(DiverseBranchBlock(8, 16, 3, stride=stride, groups=groups))
    x, pad = _input(), 1
    unpadded_conv1 = F.conv2d(x, block.dbb_1x1_kxk.conv1.weight, groups=groups)
    mid = _bn_then_pad_with_bn_value(block.dbb_1x1_kxk.bn1, unpadded_conv1, pad)
    kxk = block.dbb_1x1_kxk.bn2(F.conv2d(mid, block.dbb_1x1_kxk.conv2.weight, stride=stride, groups=groups))
    unpadded_avg_conv = F.conv2d(x, block.dbb_avg.conv.weight, groups=groups)
    pooled = F.avg_pool2d(_bn_then_pad_with_bn_value(block.dbb_avg.bn, unpadded_avg_conv, pad), 3, stride)
    avg = block.dbb_avg.avgbn(pooled)
    expected = block.dbb_origin(x) + block.dbb_1x1(x) + avg + kxk
    assert torch.allclose(block(x), expected, rtol=0, atol=1e-12)
    border = (kxk - block.dbb_1x1_kxk(x)).abs().max()
    assert border < 1e-12


def test_dbb_identity_initialised_1x1_and_depthwise_layout():
    block = DiverseBranchBlock(8, 8, 3, groups=2)
    x = torch.randn(1, 8, 5, 5)
    assert torch.equal(block.dbb_1x1_kxk.conv1(x)[..., 1:-1, 1:-1], x)
    depthwise = DiverseBranchBlock(8, 8, 3, groups=8)
    assert not hasattr(depthwise, "dbb_1x1") and not hasattr(depthwise.dbb_avg, "conv")
    assert depthwise.dbb_avg.avg.count_include_pad
    assert depthwise.dbb_1x1_kxk.conv1.weight.shape == (16, 1, 1, 1)


def test_replk_block_defaults_to_depthwise():
    block = RepLKBlock(8, kernel_size=7, small_kernel=3)
    assert block.lkb_origin.conv.weight.shape == (8, 1, 7, 7)
    assert block.small_conv.conv.weight.shape == (8, 1, 3, 3)
    assert block(torch.randn(1, 8, 9, 9)).shape == (1, 8, 9, 9)
    assert not hasattr(RepLKBlock(8, kernel_size=7, small_kernel=None), "small_conv")


# ------------------------------------------------------------------------------------------------ fusion

BLOCK_CASES = {
    "repvgg": (lambda: RepVGGBlock(8, 8), 1),
    "repvgg_s2_g2": (lambda: RepVGGBlock(8, 16, 3, stride=2, groups=2), 1),
    "repvgg_se": (lambda: RepVGGBlock(8, 16, use_se=True), 3),
    "mobileone_dw_3branches": (lambda: MobileOneBlock(8, 8, 3, groups=8, num_conv_branches=3), 1),
    "mobileone_pw_skip": (lambda: MobileOneBlock(8, 8, 1, num_conv_branches=2), 1),
    "mobileone_pw_s2_se": (lambda: MobileOneBlock(8, 16, 3, stride=2, groups=2, use_se=True), 3),
    "acb": (lambda: ACBlock(8, 16, 3), 1),
    "acb_k5_s2_g2": (lambda: ACBlock(8, 16, 5, stride=2, groups=2), 1),
    "dbb": (lambda: DiverseBranchBlock(8, 16, 3), 1),
    "dbb_s2_g2": (lambda: DiverseBranchBlock(8, 16, 3, stride=2, groups=2), 1),
    "dbb_internal_width": (lambda: DiverseBranchBlock(8, 8, 5, internal_channels=12, groups=4), 1),
    "dbb_depthwise": (lambda: DiverseBranchBlock(8, 8, 3, groups=8), 1),
    "dbb_depthwise_k5_s2": (lambda: DiverseBranchBlock(8, 8, 5, stride=2, groups=8), 1),
    "qarepvgg": (lambda: QARepVGGBlock(8, 8), 1),
    "qarepvgg_s2_g2": (lambda: QARepVGGBlock(8, 16, stride=2, groups=2), 1),
    "replk": (lambda: RepLKBlock(8, kernel_size=7, small_kernel=3), 1),
    "replk_s2_dense": (lambda: RepLKBlock(8, 16, 9, stride=2, groups=1, small_kernel=5), 1),
}


@pytest.mark.parametrize("case", sorted(BLOCK_CASES))
def test_block_fuses_to_one_conv(case):
    build, convs = BLOCK_CASES[case]
    torch.manual_seed(0)
    block = build()
    x = _input()
    assert count_kernels(block.double().eval(), x)["conv"] >= convs  # the training form runs more kernels
    counts = fuse_and_check(block, x)
    assert counts == Counter({"conv": convs}), counts


DEFAULT_FUSION_MODELS = [
    "repvgg_a0",
    "mobileone_s0",
    "acnet_resnet18",
    "dbb_resnet18",
    "repvgg_digits",
    "resnext_multipath_tiny",
]
SLOW_FUSION_MODELS = [name for name in zoo.names() if name not in DEFAULT_FUSION_MODELS]


def _check_model_fusion(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.create(name)
    x = small_input(name, batch=1)
    counts = fuse_and_check(model, x)
    assert counts == expected_counts(name), f"{name}: fused model runs {dict(counts)}"


@pytest.mark.parametrize("name", DEFAULT_FUSION_MODELS)
def test_zoo_model_fuses_exactly(name):
    _check_model_fusion(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_FUSION_MODELS)
def test_zoo_model_fuses_exactly_full_list(name):
    _check_model_fusion(name)


@pytest.mark.parametrize(
    "build,convs",
    [
        (lambda: official_repvgg((2, 2, 3, 1), (0.25, 0.25, 0.25, 0.25), 10, groups=4), 9),
        (lambda: official_repvgg((2, 2, 3, 1), (0.25, 0.25, 0.25, 0.25), 10, use_se=True), 27),
        (lambda: official_mobileone((0.25, 0.25, 0.25, 0.25), 10, use_se=True), 43 + 24),
    ],
    ids=["repvgg_narrow_g4", "repvgg_narrow_se", "mobileone_narrow_se"],
)
def test_narrow_official_layouts_fuse_exactly(build, convs):
    """Groups and SE in the official layouts, at a width cheap enough for the default run."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 48, 40)
    assert fuse_and_check(build(), x) == Counter({"conv": convs})
