"""Verification on centre crops of the inputs: which crops, which kernel taps they vouch for, when the check falls back
to the inputs themselves, and that it still catches a wrong fusion."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import randomised

import reparam
from reparam import trace as T
from reparam.errors import ReparamError
from reparam.proofs import closeness
from reparam.taps import TapCoverage, least_fraction, least_side, taps_read, tensor_key
from reparam.verify import CROP_PERIOD, centre_crops


def conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def small_cnn(last_kernel: int = 3) -> nn.Module:
    """Five stride-2 stages (a stride-32 net) and a global-pool head; the last stage's kernel is ``last_kernel``."""
    torch.manual_seed(0)
    stages = [conv_bn(3, 8, 3, 2), conv_bn(8, 8, 3, 2), conv_bn(8, 8, 3, 2), conv_bn(8, 8, 3, 2), conv_bn(8, 8, 3, 2)]
    return randomised(nn.Sequential(*stages, conv_bn(8, 8, last_kernel), nn.AdaptiveAvgPool2d(1), nn.Flatten()))


# ------------------------------------------------------------------------------------------------ the crops


@pytest.mark.parametrize(
    ("side", "crop"), [(224, 128), (256, 128), (299, 171), (320, 160), (380, 220), (384, 192), (240, 144)]
)
def test_crop_sides_halve_the_side_keeping_its_remainder(side, crop):
    (x,) = centre_crops((torch.randn(1, 3, side, side),))
    assert x.shape == (1, 3, crop, crop)
    assert crop % CROP_PERIOD == side % CROP_PERIOD and crop <= 0.75 * side


def test_crop_is_the_centre_and_a_copy():
    x = torch.arange(224 * 240, dtype=torch.float32).reshape(1, 1, 224, 240)
    (c,) = centre_crops((x,))
    assert c.shape == (1, 1, 128, 144)
    assert torch.equal(c, x[..., 48:176, 48:192])
    c.zero_()
    assert x.abs().sum() > 0


def test_small_sequence_and_integer_inputs_are_not_cropped():
    assert centre_crops((torch.randn(1, 3, 160, 160),)) is None  # 128 would keep more than 3/4 of the side
    assert centre_crops((torch.randn(1, 197, 384),)) is None  # tokens: no image sides
    assert centre_crops((torch.randint(0, 9, (1, 3, 224, 224)),)) is None
    tokens, image = torch.randn(1, 197, 384), torch.randn(2, 3, 224, 224)
    crops = centre_crops(({"tokens": tokens, "image": image},))
    assert crops[0]["tokens"] is tokens and crops[0]["image"].shape == (2, 3, 128, 128)


# ------------------------------------------------------------------------------------------------ kernel taps


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 12),
    k=st.integers(1, 9),
    stride=st.integers(1, 4),
    padding=st.integers(0, 5),
    dilation=st.integers(1, 3),
)
def test_taps_read_matches_enumerating_every_output(n, k, stride, padding, dilation):
    out = (n + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    if out > 0:
        brute = [any(0 <= o * stride + t * dilation - padding < n for o in range(out)) for t in range(k)]
        assert taps_read(n, k, stride, padding, dilation, out) == brute
    transposed_out = (n - 1) * stride - 2 * padding + dilation * (k - 1) + 1  # input n, output transposed_out
    if transposed_out > 0:
        brute = [any(0 <= i * stride + t * dilation - padding < transposed_out for i in range(n)) for t in range(k)]
        assert taps_read(transposed_out, k, stride, padding, dilation, n) == brute


@settings(max_examples=200, deadline=None)
@given(k=st.integers(1, 9), stride=st.integers(1, 4), padding=st.integers(0, 5), dilation=st.integers(1, 3))
def test_least_side_is_the_smallest_side_on_which_every_tap_reads_a_pixel(k, stride, padding, dilation):
    def all_read(n):
        out = (n + 2 * padding - dilation * (k - 1) - 1) // stride + 1
        return out > 0 and all(taps_read(n, k, stride, padding, dilation, out))

    least = least_side(k, stride, padding, dilation)
    if least is None:
        assert not any(all_read(n) for n in range(1, 64 * k + 1))
    else:
        assert all_read(least) and not any(all_read(n) for n in range(1, least))


def test_least_fraction_reads_the_recorded_maps_and_skips_one_tap_kernels():
    model = small_cnn(last_kernel=7)
    gm = T.symbolic_trace(model)
    T.propagate_shapes(gm, (torch.randn(1, 3, 224, 224),))
    assert least_fraction([(gm.graph, dict(gm.named_modules()))]) == pytest.approx(4 / 7)  # 7x7 on the 7x7 map
    pooled = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1))
    gm = T.symbolic_trace(pooled)
    T.propagate_shapes(gm, (torch.randn(1, 3, 224, 224),))
    assert least_fraction([(gm.graph, dict(gm.named_modules()))]) == pytest.approx(2 / 224)


class OpaqueLargeKernel(nn.Module):
    """A 7x7 convolution inside a module whose forward does not trace: the graph calls it as it is."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, 7, 7))

    def forward(self, x):
        if x.shape[-1] > 0:
            return F.conv2d(x, self.weight, padding=3)
        return x


def test_the_shape_run_reports_the_convolutions_of_modules_called_as_they_are():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1), OpaqueLargeKernel())
    gm = T.symbolic_trace(model)
    run = T.propagate_shapes(gm, (torch.randn(1, 3, 64, 64),))
    graphs = [(gm.graph, dict(gm.named_modules()))]
    assert least_fraction(graphs) == pytest.approx(least_side(3, 4, 1, 1) / 64)  # the graph sees the 3x3 only
    assert len(run.convolutions) == 2
    assert least_fraction(graphs, run.convolutions) == pytest.approx(4 / 16)  # 7x7 on the 16x16 map: 4 pixels


class ChannelAttention(nn.Module):
    """ECA: a 1-d convolution along the pooled channels (its axis does not shrink with the image)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.eca = nn.Conv1d(1, 1, 5, padding=2, bias=False)

    def forward(self, x):
        y = self.conv(x)
        w = self.eca(y.mean((2, 3)).unsqueeze(1)).squeeze(1)
        return y * w.sigmoid()[:, :, None, None]


def test_a_one_dimensional_convolution_does_not_hide_the_crop_the_others_need():
    gm = T.symbolic_trace(ChannelAttention(16))
    run = T.propagate_shapes(gm, (torch.randn(1, 3, 64, 64),))
    graphs = [(gm.graph, dict(gm.named_modules()))]
    # the 5-tap convolution on its 16 channels counts as if they shrank with the image: 3 of 16 (conservative)
    assert least_fraction(graphs, run.convolutions) == pytest.approx(least_side(5, 1, 2, 1) / 16)


def test_tap_coverage_names_convolutions_whose_outer_taps_read_only_padding():
    coverage = TapCoverage()
    with coverage:
        F.conv2d(torch.randn(1, 2, 7, 7), torch.randn(3, 2, 13, 13), padding=6)  # every tap reads a pixel
        F.conv_transpose2d(torch.randn(1, 2, 4, 4), torch.randn(2, 3, 3, 3), stride=2, padding=1)
        F.conv2d(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 13, 13), padding=6)  # taps 0-2 and 10-12 do not
    assert coverage.unread == ["13x13 kernel on a 4x4 input"]


def test_a_run_that_cannot_count_stops_at_its_first_unread_tap():
    from reparam.taps import TapsUnread

    ran = []
    coverage = TapCoverage(stop=True)
    with pytest.raises(TapsUnread, match="13x13 kernel on a 4x4 input"), coverage:
        F.conv2d(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 13, 13), padding=6)
        ran.append("the rest of the run")
    assert ran == [] and coverage.unread == ["13x13 kernel on a 4x4 input"]


# ------------------------------------------------------------------------------------------------ the pipeline


def test_a_cnn_is_verified_on_a_crop_and_on_the_inputs_when_asked():
    model, x = small_cnn(), torch.randn(1, 3, 224, 224)
    fused, report = reparam.fuse_with_report(model, x)
    assert report.verified_on == "centre crops of the inputs (1x3x224x224 -> 1x3x64x64)"  # 3x3 kernels: 2x2 maps do
    assert report.max_rel_error < 1e-12
    assert report.to_dict()["verified_on"] == report.verified_on
    assert "on centre crops" in str(report)
    _, full = reparam.fuse_with_report(model, x, check="full")
    assert full.verified_on == "the inputs"
    torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def test_check_accepts_only_true_false_or_full():
    with pytest.raises(ReparamError, match="check must be True, False or 'full'"):
        reparam.fuse(small_cnn(), torch.randn(1, 3, 64, 64), check="crop")


def test_when_the_smallest_crop_does_not_run_the_next_side_is_tried():
    torch.manual_seed(0)
    model = randomised(nn.Sequential(*small_cnn()[:6], nn.MaxPool2d(3, stride=1), nn.AdaptiveAvgPool2d(1)))
    _, report = reparam.fuse_with_report(model, torch.randn(1, 3, 224, 224))  # 2x2 maps are too small for the pool
    assert report.verified_on == "centre crops of the inputs (1x3x224x224 -> 1x3x96x96)"  # 3x3 maps: one step up


def test_crops_between_the_smallest_and_the_default_are_tried_in_steps_of_the_period():
    from reparam.pipeline import _crops_to_try

    x = (torch.randn(1, 3, 299, 299),)
    sides = [crops[0][0].shape[-1] for crops in _crops_to_try([x], 64 / 299)]
    assert sides == [75, 107, 139, 171]  # the smallest, two between (each 32 more: same remainder), the default
    assert [crops[0][0].shape[-1] for crops in _crops_to_try([x], None)] == [171]


def test_a_model_that_only_runs_at_its_input_size_is_verified_on_the_inputs():
    torch.manual_seed(0)
    model = randomised(nn.Sequential(conv_bn(3, 4, 3, 4), nn.Flatten(), nn.Linear(4 * 56 * 56, 10)))
    _, report = reparam.fuse_with_report(model, torch.randn(1, 3, 224, 224))
    assert report.verified_on == "the inputs" and report.counts()["fold_bn"] == 1


def test_a_large_kernel_whose_outer_taps_read_only_padding_at_the_crop_is_verified_on_the_inputs():
    model, x = small_cnn(last_kernel=13), torch.randn(1, 3, 224, 224)  # 13x13 on 7x7 (224) but on 4x4 (128)
    _, report = reparam.fuse_with_report(model, x)
    assert report.verified_on == "the inputs"
    _, small = reparam.fuse_with_report(small_cnn(last_kernel=7), x)  # 7x7 reads every tap on 4x4
    assert small.verified_on.startswith("centre crops")


def test_a_wrong_outer_tap_agrees_on_the_crop_but_is_not_accepted_there():
    model = small_cnn(last_kernel=13).double()
    gm = T.symbolic_trace(copy.deepcopy(model))
    with torch.no_grad():
        gm.get_submodule("5.0").weight[:, :, 0, 0] += 1.0  # a tap that reads only padding on a 4x4 map
    (crop,) = centre_crops((torch.randn(1, 3, 224, 224, dtype=torch.float64),))
    with torch.no_grad():
        assert torch.allclose(gm(crop), model(crop), rtol=1e-13, atol=0)  # the crop alone cannot see it
    assert closeness(gm, model, (crop,)).worst is None
    with torch.no_grad():
        gm.get_submodule("5.0").weight[:, :, 0, 0] -= 1.0
    assert closeness(gm, model, (crop,)).worst is None  # 13x13 on 4x4: never vouched for by this crop
    full = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    assert closeness(gm, model, (full,)).worst == 0.0


def test_a_crop_past_the_proof_trigger_is_proven_region_by_region_there(monkeypatch):
    import reparam.proofs as proofs

    monkeypatch.setattr(proofs, "PROOF_TRIGGER", -1.0)  # as a deep net with random statistics is on a crop
    proved, real = [], proofs.prove
    monkeypatch.setattr(proofs, "prove", lambda gm, p, x: proved.append(x[0].shape[-1]) or real(gm, p, x))
    model, x = small_cnn(), torch.randn(1, 3, 224, 224)
    _, report = reparam.fuse_with_report(model, x)
    assert report.verified_on == "centre crops of the inputs (1x3x224x224 -> 1x3x64x64)"
    assert proved == [64]  # the regions proven on the crop; no float64 run at the full size


def test_a_wrong_weight_a_crop_does_not_prove_is_caught_and_named_on_the_inputs(monkeypatch):
    import reparam.proofs as proofs
    from test_fuzz_verify import _WrongWeight

    monkeypatch.setattr(proofs, "PROOF_TRIGGER", -1.0)
    proved, real = [], proofs.prove
    monkeypatch.setattr(proofs, "prove", lambda gm, p, x: proved.append(x[0].shape[-1]) or real(gm, p, x))
    model, x = small_cnn(), torch.randn(1, 3, 224, 224)
    with _WrongWeight(index=2, delta=1e-6) as wrong, pytest.raises(reparam.EquivalenceError, match=r"region \S+"):
        reparam.fuse(model, x)
    assert wrong.applied
    assert proved[0] == 64 and proved[-1] == 224  # disproven on the crop: the check on the inputs names it


class UntouchedLargeKernel(nn.Module):
    """ConvNeXt's shape: stride-2 stages whose BatchNorms fold, then a 7x7 depthwise convolution nothing rewrites (on
    a 2x2 map at 64 pixels its outer taps read only padding) and a head."""

    def __init__(self):
        super().__init__()
        self.stages = small_cnn()[:5]
        self.mix = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.head = nn.Sequential(nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.head(self.mix(self.stages(x)))


def test_a_convolution_no_rewrite_touched_need_not_read_every_tap_on_the_crop():
    model, x = UntouchedLargeKernel().eval(), torch.randn(1, 3, 224, 224)
    fused, report = reparam.fuse_with_report(model, x)
    assert report.counts()["fold_bn"] == 5 and report.max_rel_error < 1e-12
    # the 7x7 keeps the original's weight: 64 pixels (2x2 maps) do; it alone would ask for 128 (4x4)
    assert report.verified_on == "centre crops of the inputs (1x3x224x224 -> 1x3x64x64)"
    torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


class SharedTwice(nn.Module):
    """One 7x7 convolution called twice on a 2x2 map: its outer taps read only padding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.down = nn.Conv2d(3, 8, 32, stride=32)
        self.wide = nn.Conv2d(8, 8, 7, padding=3)

    def forward(self, x):
        y = self.down(x)
        return self.wide(y) + self.wide(y.relu())


def test_a_shared_weight_vouches_only_for_calls_the_other_run_makes_alike():
    from reparam.taps import shared_tensors, unmatched_shared

    model = SharedTwice().double().eval()
    x = (torch.randn(1, 3, 64, 64, dtype=torch.float64),)
    same = T.symbolic_trace(model)  # the same weights, called alike: the unread taps hold the same numbers
    assert closeness(same, model, x).worst is None  # without the exemption the crop cannot count
    assert closeness(same, model, x, shared_tensors(same, model)).worst == 0.0
    # the second call wrongly reduced to the centre 3x3: equal on 2x2 maps, and every tap of the 3x3 is read there
    wrong = T.symbolic_trace(model)
    wrong.narrow = nn.Conv2d(8, 8, 3, padding=1).double()
    with torch.no_grad():
        wrong.narrow.weight.copy_(model.wide.weight[:, :, 2:5, 2:5])
        wrong.narrow.bias.copy_(model.wide.bias)
    second = [n for n in wrong.graph.nodes if n.op == "call_module" and n.target == "wide"][1]
    second.target = "narrow"
    wrong.recompile()
    with torch.no_grad():
        assert torch.allclose(wrong(*x), model(*x), rtol=1e-13, atol=0)  # the crop alone cannot see it
    shared = shared_tensors(wrong, model)
    assert tensor_key(model.wide.weight) in shared
    assert closeness(wrong, model, x, shared).worst is None  # the original calls the 7x7 twice, the graph once
    coverage = [TapCoverage(shared=shared), TapCoverage(shared=shared)]
    with coverage[0], torch.no_grad():
        model(*x)
    with coverage[1], torch.no_grad():
        wrong(*x)
    assert unmatched_shared(*coverage) == ["7x7 kernel on a 2x2 input"]
    assert coverage[0].unread == coverage[1].unread == []


def test_a_shared_weight_in_another_geometry_is_not_vouched_for():
    from reparam.taps import unmatched_shared

    w, x = torch.randn(4, 4, 7, 7), torch.randn(1, 4, 2, 2)
    shared = frozenset({tensor_key(w)})
    coverage = [TapCoverage(shared=shared), TapCoverage(shared=shared)]
    with coverage[0]:
        F.conv2d(x, w, padding=3)
    with coverage[1]:
        F.conv2d(x, w, padding=6, dilation=2)  # the same numbers on another grid: a different convolution
    assert unmatched_shared(*coverage) == ["7x7 kernel on a 2x2 input"] * 2  # neither call has a twin
    with coverage[1]:
        F.conv2d(x, w, padding=3)
    assert unmatched_shared(*coverage) == ["7x7 kernel on a 2x2 input"]  # the dilated call still has none
    assert least_fraction([], [((1, 4, 8, 8), (4, 4, 7, 7), (1, 1), (3, 3), (1, 1), False, tensor_key(w))]) == 0.5
    assert least_fraction([], [((1, 4, 8, 8), (4, 4, 7, 7), (1, 1), (3, 3), (1, 1), False, tensor_key(w))], shared) == 0


class Windows(nn.Module):
    """A stride-8 body whose map is cut into 24x24 windows at the end, like MaxViT's grid attention: it runs at its
    input (192: 24x24 maps) but on no crop, and fails there only after the whole body."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 8, 3, 2), conv_bn(8, 8, 3, 2), conv_bn(8, 8, 3, 2), conv_bn(8, 8, 3))

    def forward(self, x):
        x = self.body(x)
        n, c, h, w = x.shape
        return x.view(n, c, h // 24, 24, w // 24, 24).mean((3, 5))


class ReadsAValue(nn.Module):
    """Keeps the positive activations only: how many there are is a value, not a shape."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y[y > 0].sum()


def test_a_crop_a_run_on_stand_ins_rules_out_is_not_run_in_float64(monkeypatch):
    import reparam.pipeline as pipeline

    model, x = randomised(Windows().eval()), torch.randn(1, 3, 192, 192)
    sides = []
    real = pipeline.closeness
    monkeypatch.setattr(
        pipeline,
        "closeness",
        lambda gm, ref, args, shared: sides.append(args[0].shape[-1]) or real(gm, ref, args, shared),
    )
    fused, report = reparam.fuse_with_report(model, x)
    assert report.verified_on == "the inputs" and report.max_rel_error < 1e-12
    assert sides == [64]  # the smallest crop was tried; 96 and the default 128 (12x12, 16x16 maps) were seen not to run
    monkeypatch.setattr(pipeline, "could_agree_closely", lambda gm, args, shared: True)
    sides.clear()
    reparam.fuse(model, x)
    assert sides == [64, 96, 128]  # without the stand-in runs, the float64 runs at 96 and 128 are spent for nothing


def test_a_run_on_stand_ins_tells_crops_that_cannot_conclude():
    from reparam.proofs import could_agree_closely

    crop = torch.randn(1, 3, 128, 128, dtype=torch.float64)
    assert not could_agree_closely(T.symbolic_trace(Windows().double().eval()), (crop,))  # fails at 16x16
    assert not could_agree_closely(T.symbolic_trace(small_cnn(last_kernel=13).double()), (crop,))  # 13x13 on 4x4
    assert could_agree_closely(T.symbolic_trace(small_cnn().double()), (crop,))
    reads = T.symbolic_trace(ReadsAValue().double().eval())  # the real run decides what a stand-in cannot know
    assert could_agree_closely(reads, (crop,))


class SizeCache(nn.Module):
    """Caches a bias map the size of its first input (as some models cache position tables): a run at the crop's
    size leaves a cache the full-size run cannot use, unless it is undone."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.cache = {}

    def forward(self, x):
        if "bias" not in self.cache:
            self.cache["bias"] = torch.linspace(0, 1, x.shape[-1], dtype=x.dtype)
        return x + self.cache["bias"] * self.scale


def test_caches_filled_at_the_crop_size_do_not_reach_the_check_on_the_inputs():
    torch.manual_seed(0)
    model = randomised(nn.Sequential(SizeCache(), small_cnn(last_kernel=13)))  # 13x13: falls back to the inputs
    x = torch.randn(1, 3, 224, 224)
    fused, report = reparam.fuse_with_report(model, x)
    assert report.verified_on == "the inputs" and report.max_rel_error < 1e-12
    assert model[0].cache == {}  # the user's model is untouched
    torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shift", [1e-3, 1e-7])
def test_a_wrong_fold_is_still_caught_and_named_with_crops_on(monkeypatch, shift):
    import reparam.affine as A

    real = A.batchnorm

    def wrong(mean, var, weight, bias, eps, layout):
        good = real(mean, var, weight, bias, eps, layout)
        return A.channelwise(good.weight.reshape(-1), good.bias + shift, layout)

    monkeypatch.setattr(A, "batchnorm", wrong)
    with pytest.raises(reparam.EquivalenceError, match=r"region \S+ .*relative error"):
        reparam.fuse(small_cnn(), torch.randn(1, 3, 224, 224))
