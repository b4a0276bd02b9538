"""Cross-layer equalization (reparam.passes.equalize, reparam.equalization): exact on random conv / BN / ReLU /
pool / concat graphs and on zoo models (float64 relative error <= 1e-10), balanced ranges after convergence, a
higher worst-layer int8 weight SNR where BatchNorm statistics are uneven, and named refusals where it would not be
exact (SiLU / ReLU6 between layers, residual adds)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

import reparam
import reparam.models as zoo
from conftest import core_settings
from reparam import quant
from reparam.passes import equalize as E

EXACT = 1e-10


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics: channel scales gamma / sigma spread over orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g).pow(3) * 4 + 1e-3)
            m.weight.data.copy_(1 + 0.5 * torch.randn(c, generator=g))
            m.bias.data.copy_(0.3 * torch.randn(c, generator=g))
    return model


class Fork(nn.Module):
    """``cat([conv_a(x), relu(conv_b(x))], 1)``: two producers feeding one consumer through a channel concat."""

    def __init__(self, cin: int, a: int, b: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(cin, a, 3, padding=1), nn.Conv2d(cin, b, 1)

    def forward(self, x):
        return torch.cat([self.a(x), torch.relu(self.b(x))], 1)


class Halves(nn.Module):
    """``a, b = chunk(x, 2, 1); cat([conv(a), maxpool(b)], 1)``: a producer's channels split between readers."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c // 2, c // 2, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 1, 1)

    def forward(self, x):
        a, b = torch.chunk(x, 2, 1)
        return torch.cat([self.conv(a), self.pool(b)], 1)


def build(spec: list, cin: int = 3, classes: int = 5) -> nn.Module:
    """A conv net from a drawn spec: conv (grouped, depthwise), BN, ReLU / LeakyReLU, max / avg pool, fork."""
    layers, c = [nn.Conv2d(cin, 8, 3, padding=1)], 8
    for op in spec:
        kind = op[0]
        if kind == "conv":
            out, k, depthwise, groups = op[1:]
            if depthwise:
                layers.append(nn.Conv2d(c, c, k, padding=k // 2, groups=c))
                continue
            g = groups if c % groups == 0 and out % groups == 0 else 1
            layers.append(nn.Conv2d(c, out, k, padding=k // 2, groups=g))
            c = out
        elif kind == "bn":
            layers.append(nn.BatchNorm2d(c))
        elif kind == "relu":
            layers.append(nn.ReLU())
        elif kind == "leaky":
            layers.append(nn.LeakyReLU(op[1]))
        elif kind == "maxpool":
            layers.append(nn.MaxPool2d(3, 1, 1))
        elif kind == "avgpool":
            layers.append(nn.AvgPool2d(3, 1, 1))
        elif kind == "fork":
            layers.append(Fork(c, op[1], op[2]))
            c = op[1] + op[2]
        elif kind == "halves" and c % 2 == 0:
            layers.append(Halves(c))
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c, classes)]
    return nn.Sequential(*layers)


OPS = st.one_of(
    st.tuples(
        st.just("conv"), st.sampled_from([4, 8, 12]), st.sampled_from([1, 3]), st.booleans(), st.sampled_from([1, 2, 4])
    ),
    st.tuples(st.just("bn")),
    st.tuples(st.just("relu")),
    st.tuples(st.just("leaky"), st.floats(0.0, 0.5)),
    st.tuples(st.just("maxpool")),
    st.tuples(st.just("avgpool")),
    st.tuples(st.just("fork"), st.sampled_from([2, 4]), st.sampled_from([2, 6])),
    st.tuples(st.just("halves")),
)


@core_settings(60)
@given(spec=st.lists(OPS, min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_equalization_is_exact_on_random_graphs(spec, seed):
    torch.manual_seed(seed)
    model = randomize_bn(build(spec), seed).eval().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, (x,), equalize=True)
    eq = fused.reparam_report.equalization
    refused = [r for r in fused.reparam_report.refusals if "equalization" in r.reason]
    assert eq.links >= 1 or refused  # the last conv -> pool -> flatten -> linear pair, unless e.g. a BN is left
    with torch.no_grad():
        assert rel(fused(x), model(x)) <= EXACT
    assert eq.max_rel_error is not None and eq.max_rel_error <= EXACT


def test_ranges_balanced_after_convergence():
    torch.manual_seed(0)
    model = randomize_bn(
        build(
            [
                ("bn",),
                ("relu",),
                ("conv", 8, 3, False, 2),
                ("bn",),
                ("relu",),
                ("conv", 8, 3, True, 1),
                ("relu",),
                ("conv", 12, 1, False, 1),
            ]
        )
    ).eval()
    fused = reparam.fuse(model, (torch.randn(1, 3, 6, 6),))
    gm = reparam.equalize(fused)
    for link in E.find_links(gm, lambda *_: None):
        r1 = E._producer_range(link.module)
        r2 = torch.stack([E._input_ranges(use, len(r1)) for use in link.uses]).amax(0)
        assert torch.allclose(r1, r2, rtol=1e-2), link.producer.name


def test_split_channels_reach_both_readers():
    """relu(conv) -> chunk -> (conv | maxpool) -> cat -> conv: the stem's halves feed two different layers."""
    torch.manual_seed(0)
    model = randomize_bn(build([("bn",), ("relu",), ("halves",), ("relu",), ("conv", 8, 1, False, 1)])).eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model.double(), (x,), equalize=True)
    spans = [sorted((u.span.lo, u.span.hi) for u in link.uses) for link in E.find_links(fused, lambda *_: None)]
    assert [(0, 4), (4, 8)] in spans, spans  # the stem's 8 channels: half to the conv, half via pool + cat
    with torch.no_grad():
        assert rel(fused(x), model(x)) <= EXACT


def test_wrong_scale_is_caught():
    """The float64 check would catch a non-exact rewrite: scaling a producer without its consumer."""
    fused = reparam.fuse(
        randomize_bn(build([("bn",), ("relu",), ("conv", 8, 3, False, 1)])).eval(), (torch.randn(1, 3, 6, 6),)
    )
    with mock_step_without_consumer():
        with pytest.raises(reparam.EquivalenceError):
            reparam.equalize(fused, (torch.randn(1, 3, 6, 6),))


class mock_step_without_consumer:
    def __enter__(self):
        self.saved = E._scale_inputs
        E._scale_inputs = lambda use, s: None

    def __exit__(self, *exc):
        E._scale_inputs = self.saved


@pytest.mark.parametrize("arch", ["repvgg_a0", "mobileone_s0"])
def test_zoo_models_exact_and_worst_snr_rises(arch):
    torch.manual_seed(0)
    model = randomize_bn(zoo.create(arch)).eval().double()  # float64 model: the fused one stays float64
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    plain = reparam.fuse(model, (x,))
    fused = reparam.fuse(model, (x,), equalize=True)
    eq = fused.reparam_report.equalization
    with torch.no_grad():
        assert rel(fused(x), model(x)) <= EXACT
    assert eq.max_rel_error <= EXACT
    worst = lambda m: min(layer.per_tensor_snr_db for layer in quant.analyze_model(m).layers)  # noqa: E731
    assert worst(fused) > worst(plain) + 3.0, (worst(plain), worst(fused))
    assert eq.worst_after_db > eq.worst_before_db
    assert fused.reparam_report.counts()["equalize"] == len(eq.layers) > 0


def test_equalize_keeps_dtype_and_input_model():
    model = randomize_bn(build([("bn",), ("relu",), ("conv", 8, 3, False, 1)])).eval()
    fused = reparam.fuse(model, (torch.randn(1, 3, 6, 6),))
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    out = reparam.equalize(fused, (torch.randn(1, 3, 6, 6),))
    assert all(torch.equal(before[k], v) for k, v in fused.state_dict().items())  # input untouched
    assert {v.dtype for v in out.state_dict().values() if v.is_floating_point()} == {torch.float32}


class DataDependent(nn.Module):
    """Does not trace as a whole (a branch on the input's values): fused part by part."""

    def __init__(self):
        super().__init__()
        self.body = randomize_bn(build([("bn",), ("relu",), ("conv", 8, 3, False, 2), ("bn",), ("relu",)]))

    def forward(self, x):
        return self.body(x) if x.sum() > 0 else -self.body(x)


def test_equalization_of_fused_parts():
    model = DataDependent().eval().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64).abs()
    fused = reparam.fuse(model, (x,), equalize=True)
    eq = fused.reparam_report.equalization
    assert eq.links >= 2 and eq.max_rel_error <= EXACT
    with torch.no_grad():
        assert rel(fused(x), model(x)) <= EXACT


class Between(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.conv1, self.act, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), act, nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(torch.relu(self.conv(h) + h))


@pytest.mark.parametrize(
    "act, name", [(nn.SiLU(), "SiLU"), (nn.ReLU6(), "ReLU6"), (nn.Hardswish(), "Hardswish"), (nn.GELU(), "GELU")]
)
def test_refused_between_non_homogeneous_activations(act, name):
    model = Between(act).eval()
    out = reparam.equalize(model, (torch.randn(1, 3, 6, 6),))
    reasons = [r.reason for r in out.reparam_report.refusals if r.where == "conv1"]
    assert reasons and name in reasons[0] and "not positively homogeneous" in reasons[0], reasons
    assert torch.equal(out.conv1.weight, model.conv1.weight) and out.reparam_report.equalization.links == 0


def test_residual_add_rescaled_consistently():
    """head(relu(conv(h) + h)), h = relu(stem(x)): stem and conv share one scale, conv and head read it."""
    model = randomize_bn(Residual()).eval().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    out = reparam.equalize(model, (x,))
    links = E.find_links(out, lambda *_: None)
    assert [sorted(n.target for n, _ in link.producers) for link in links] == [["conv", "stem"]]
    assert sorted(u.node.target for u in links[0].uses) == ["conv", "head"]
    assert not torch.equal(out.stem.weight, model.stem.weight)
    with torch.no_grad():
        assert rel(out(x), model(x)) <= EXACT


class InputResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x) + x))


def test_refused_when_a_residual_operand_cannot_be_rescaled():
    model = InputResidual().eval()
    out = reparam.equalize(model, (torch.randn(1, 3, 6, 6),))
    refused = {r.where: r.reason for r in out.reparam_report.refusals}
    assert "model input" in refused.get("conv", ""), refused
    assert torch.equal(out.conv.weight, model.conv.weight)


def test_torchvision_resnet_residual_streams_equalized_exactly():
    """torchvision's ResNet-18: residual streams (shared self.relu, += shortcut) are rescaled as groups."""
    torchvision = pytest.importorskip("torchvision", reason="torchvision is in the test extra")
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval().double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    fused = reparam.fuse(model, (x,), equalize=True)
    eq = fused.reparam_report.equalization
    assert eq.links == 12 and not [r for r in fused.reparam_report.refusals if "equalization" in r.reason]
    groups = [link for link in E.find_links(fused, lambda *_: None) if len(link.producers) > 1]
    assert len(groups) == 4  # one residual stream per stage
    with torch.no_grad():
        assert rel(fused(x), model(x)) <= EXACT
