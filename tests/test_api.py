"""The public surface of reparam: fuse / fuse_with_report / explain, Report, errors and warnings; training mode,
dtype and device handling, output structures, serialisation of fused models, and the self-check.

The blocks (RepVGG, MobileOne, ...) and ``check_fuse`` are test_passes.py's, where each rewrite is tested.

(``remove_residuals`` is deliberately not tested here: its behaviour is still being decided.)
"""

from __future__ import annotations

import collections
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reparam
from conftest import count_ops, random_bn, rel_err
from test_passes import (
    F32_TOL,
    F64_TOL,
    ACNet,
    LayerScale,
    LoneBNBranches,
    MobileOne,
    RepVGG,
    assert_untouched,
    bn,
    check_fuse,
    no_bn_no_add,
    outputs_close,
    snapshot,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def conv_bn(cin, cout, k, stride=1, padding=0, **kw):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, bias=False, **kw), random_bn(nn.BatchNorm2d(cout)))


class Block(nn.Module):
    """A RepVGG block plus a refused DBB-style branch (1x1 with BN, then a zero-padded 3x3)."""

    def __init__(self, c=4):
        super().__init__()
        self.dense = conv_bn(c, c, 3, 1, 1)
        self.one = conv_bn(c, c, 1)
        self.identity = random_bn(nn.BatchNorm2d(c))
        self.seq = nn.Sequential(conv_bn(c, c, 1), conv_bn(c, c, 3, 1, 1))

    def forward(self, x):
        y = F.relu(self.dense(x) + self.one(x) + self.identity(x))
        return self.seq(y)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Block().eval()


@pytest.fixture
def x():
    return torch.randn(2, 4, 7, 6)


# ============================================================================================
# exports


def test_public_names():
    for name in (
        "fuse",
        "fuse_with_report",
        "explain",
        "Report",
        "ReparamError",
        "EquivalenceError",
        "TrainingModeWarning",
        "VerificationSkippedWarning",
    ):
        assert hasattr(reparam, name), name
        assert name in reparam.__all__
    assert issubclass(reparam.EquivalenceError, reparam.ReparamError)
    assert issubclass(reparam.ReparamError, Exception)
    assert issubclass(reparam.TrainingModeWarning, UserWarning)
    assert issubclass(reparam.VerificationSkippedWarning, UserWarning)
    assert isinstance(reparam.__version__, str)


# ============================================================================================
# errors on bad arguments


@pytest.mark.parametrize("bad", [lambda t: t * 2, "resnet18", 3, None, [nn.Conv2d(1, 1, 1)]])
@pytest.mark.parametrize("entry", ["fuse", "fuse_with_report", "explain"])
def test_non_module_argument_raises_reparam_error(bad, entry):
    with pytest.raises(reparam.ReparamError, match="nn.Module"):
        getattr(reparam, entry)(bad)


def test_bad_example_inputs_raise_reparam_error(model):
    with pytest.raises(reparam.ReparamError, match="example_inputs"):
        reparam.fuse(model, {"x": torch.randn(1, 4, 5, 5)})


@pytest.mark.parametrize("form", ["tensor", "tuple", "list"])
def test_example_inputs_forms(model, x, form):
    inputs = {"tensor": x, "tuple": (x,), "list": [x]}[form]
    fused = reparam.fuse(model, inputs)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-5


# ============================================================================================
# fuse / fuse_with_report


def test_fuse_attaches_the_report(model, x):
    fused, report = reparam.fuse_with_report(model, (x,))
    assert fused.reparam_report is report
    assert isinstance(report, reparam.Report)
    assert reparam.fuse(model, (x,)).reparam_report.counts() == report.counts()


def test_fuse_returns_a_new_module(model, x):
    fused = reparam.fuse(model, (x,))
    assert fused is not model
    assert not any(p is q for p in fused.parameters() for q in model.parameters())
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(1.0)  # mutating the fused model leaves the original alone
    fresh = reparam.fuse(model, (x,))
    with torch.no_grad():
        assert rel_err(fresh(x), model(x)) <= 1e-5


def test_check_false_skips_verification(model, x):
    fused, report = reparam.fuse_with_report(model, (x,), check=False)
    assert report.max_rel_error is None
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-5


def test_check_true_records_the_error(model, x):
    _, report = reparam.fuse_with_report(model, (x,))
    assert report.max_rel_error is not None and 0 <= report.max_rel_error <= 1e-8


def test_nothing_to_fuse():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2)).eval()
    x = torch.randn(1, 3, 8, 8)
    fused, report = reparam.fuse_with_report(model, (x,))
    assert report.rewrites == [] and report.counts() == collections.Counter()
    assert str(report).startswith("reparam: 0 regions rewritten")
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))


class DataDependent(nn.Module):
    """Does not trace as a whole (Python control flow on tensor values); its children do."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(conv_bn(3, 4, 3, 1, 1))
        self.b = nn.Sequential(conv_bn(4, 4, 3, 1, 1))

    def forward(self, x):
        y = self.a(x)
        if y.sum() > 0:
            y = -y
        return self.b(y)


def test_untraceable_model_fuses_its_traceable_parts():
    torch.manual_seed(0)
    model = DataDependent().eval()
    x = torch.randn(2, 3, 6, 6)
    fused, report = reparam.fuse_with_report(model, (x,))
    assert report.counts()["fold_bn"] == 2
    assert any("trace" in note for note in report.notes), report.notes
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-5
    assert count_ops(fused, x)["bn"] == 0


# ============================================================================================
# explain and the Report


def test_explain_lists_rewrites_and_refusals_with_readable_reasons(model, x):
    snap = copy.deepcopy(model.state_dict())
    report = reparam.explain(model, (x,))
    assert isinstance(report, reparam.Report)
    assert report.max_rel_error is None  # explain does not verify
    counts = report.counts()
    assert counts["fold_bn"] >= 3 and counts["merge_parallel"] == 2
    for r in report.rewrites:
        assert r.where and r.before and r.after and isinstance(r.events, tuple)
        assert set(r.events) <= {"fold_bn", "merge_parallel", "merge_concat", "compose", "skip", "scale", "pad", "pool"}
    assert report.refusals, "the 1x1(+BN) -> zero-padded 3x3 composition must be refused"
    for r in report.refusals:
        assert isinstance(r.where, str) and r.where
        assert isinstance(r.reason, str) and 10 < len(r.reason) < 300
        assert "\n" not in r.reason and "Traceback" not in r.reason
    assert any("seq" in r.where and "bias" in r.reason and "pads with zeros" in r.reason for r in report.refusals), (
        report.refusals
    )
    # the model is untouched
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_explain_matches_fuse(model, x):
    report = reparam.explain(model, (x,))
    _, fused_report = reparam.fuse_with_report(model, (x,))
    assert report.counts() == fused_report.counts()
    assert [(r.where, r.reason) for r in report.refusals] == [(r.where, r.reason) for r in fused_report.refusals]


def test_explain_without_inputs(model):
    report = reparam.explain(model)
    assert report.counts()["merge_parallel"] == 2


def test_report_str(model, x):
    _, report = reparam.fuse_with_report(model, (x,))
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == f"reparam: {len(report.rewrites)} regions rewritten"
    for kind, n in report.counts().items():
        assert f"{kind} x{n}" in lines[1]
    for r in report.rewrites:
        assert f"{r.where}: {r.before} -> {r.after}" in text
    assert f"refused ({len(report.refusals)}):" in text
    for r in report.refusals:
        assert f"{r.where}: {r.reason}" in text
    assert lines[-1].startswith("verified: max relative error")


def test_report_refusals_are_deduplicated():
    report = reparam.Report()
    report.refuse("a", "why")
    report.refuse("a", "why")
    report.refuse("b", "why")
    assert [(r.where, r.reason) for r in report.refusals] == [("a", "why"), ("b", "why")]


def test_report_counts_is_a_counter(model, x):
    report = reparam.explain(model, (x,))
    counts = report.counts()
    assert isinstance(counts, collections.Counter)
    assert sum(counts.values()) == sum(len(r.events) for r in report.rewrites)


# ============================================================================================
# warnings


def test_training_mode_warning_is_raised_once(model, x):
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reparam.fuse(model, (x,))
    assert sum(issubclass(w.category, reparam.TrainingModeWarning) for w in caught) == 1
    assert model.training


class NoShapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = random_bn(nn.BatchNorm2d(3))

    def forward(self, x):
        return self.bn(x) + 1.0


def test_verification_skipped_warning():
    with pytest.warns(reparam.VerificationSkippedWarning, match="example_inputs"):
        reparam.fuse(NoShapes().eval())
    with warnings.catch_warnings():  # no warning with check=False: nothing was promised
        warnings.simplefilter("error", reparam.VerificationSkippedWarning)
        reparam.fuse(NoShapes().eval(), check=False)


# ============================================================================================
# mode, dtype, outputs, serialisation


def test_training_mode_model_warns_once_and_is_left_alone():
    model = RepVGG(4, 4).double().train()
    snap = snapshot(model)
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = reparam.fuse(model, (x,))
    training = [w for w in caught if issubclass(w.category, reparam.TrainingModeWarning)]
    assert len(training) == 1, [str(w.message) for w in caught]
    assert model.training and all(m.training for m in model.modules())
    assert_untouched(model, snap)
    with torch.no_grad():
        outputs_close(fused.eval()(x), copy.deepcopy(model).eval()(x), F64_TOL)
    assert_untouched(model, snap)


def test_eval_model_gives_no_training_warning_and_is_left_alone():
    model = MobileOne().double().eval()
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reparam.fuse(model, (torch.randn(1, 4, 5, 5, dtype=torch.float64),))
    assert_untouched(model, snap)
    assert not model.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_preserved(dtype):
    model = RepVGG(4, 4).to(dtype).eval()
    x = torch.randn(2, 4, 6, 5, dtype=dtype)
    fused = reparam.fuse(model, (x,))
    assert {p.dtype for p in fused.parameters()} == {dtype}
    with torch.no_grad():
        y = fused(x)
        assert y.dtype == dtype
        assert rel_err(y, model(x)) <= (F32_TOL if dtype == torch.float32 else F64_TOL)
    # .double() / .float() convert the fused weights too (they are registered parameters)
    other = torch.float64 if dtype == torch.float32 else torch.float32
    assert fused.to(other)(x.to(other)).dtype == other


def test_device_preserved():
    model = RepVGG(4, 4).eval()
    fused = reparam.fuse(model, (torch.randn(1, 4, 5, 5),))
    assert {p.device for p in fused.parameters()} == {torch.device("cpu")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_preserved():
    model = nn.Sequential(RepVGG(4, 4), LayerScale(4)).double().cuda().eval()
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, device="cuda")
    fused = reparam.fuse(model, (x,))
    assert {p.device.type for p in fused.parameters()} == {"cuda"}
    assert {b.device.type for b in fused.buffers()} <= {"cuda"}
    with torch.no_grad():
        y = fused(x)
        assert y.device.type == "cuda" and y.dtype == torch.float64
        assert rel_err(y, model(x)) <= F64_TOL


class StructuredOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = RepVGG(4, 4)
        self.head = conv_bn(4, 2, 1)

    def forward(self, x):
        y = self.block(x)
        return y, {"head": self.head(y), "pair": (y.sum(), x.shape[-1])}


def test_tuple_and_dict_outputs_preserved():
    model = StructuredOutputs()
    fused, _ = check_fuse(model, torch.randn(2, 4, 6, 5), ops=no_bn_no_add(2))
    out = fused(torch.randn(2, 4, 6, 5, dtype=torch.float64))
    assert isinstance(out, tuple) and isinstance(out[1], dict) and set(out[1]) == {"head", "pair"}
    assert out[1]["pair"][1] == 5


def _serialisable_model():
    model = nn.Sequential(RepVGG(3, 4, 2), LayerScale(4), LoneBNBranches(4)).eval()
    x = torch.randn(2, 3, 9, 8)
    return reparam.fuse(model, (x,)), x


def test_deepcopy_round_trip():
    fused, x = _serialisable_model()
    clone = copy.deepcopy(fused)
    with torch.no_grad():
        assert torch.equal(clone(x), fused(x))
    assert clone.state_dict().keys() == fused.state_dict().keys()


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_round_trip(how):
    """fx's unpickler re-traces with ``graph._tracer_cls()`` (no arguments): reparam's tracer must allow it."""
    fused, x = _serialisable_model()
    if how == "pickle":
        clone = pickle.loads(pickle.dumps(fused))
    else:
        buf = io.BytesIO()
        torch.save(fused, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(clone(x), fused(x))


def test_torch_export_of_fused_model():
    model = nn.Sequential(RepVGG(3, 4, 2), ACNet(4), LoneBNBranches(4)).eval()
    x = torch.randn(2, 3, 9, 8)
    fused = reparam.fuse(model, (x,))
    program = torch.export.export(fused, (x,))
    with torch.no_grad():
        assert rel_err(program.module()(x), model(x)) <= F32_TOL
        assert torch.allclose(program.module()(x), fused(x))


# ============================================================================================
# self-check


def test_check_raises_equivalence_error_on_a_wrong_fold(monkeypatch):
    import reparam.affine as A

    real = A.batchnorm

    def wrong(mean, var, weight, bias, eps, layout):
        good = real(mean, var, weight, bias, eps, layout)
        return A.channelwise(good.weight.reshape(-1), good.bias + 0.5, layout)

    monkeypatch.setattr(A, "batchnorm", wrong)
    model = nn.Sequential(conv_bn(3, 4, 3, padding=1), nn.ReLU()).double().eval()
    with pytest.raises(reparam.EquivalenceError, match=r"region 0\.\S+ .*relative error.*output is off by"):
        reparam.fuse(model, (torch.randn(2, 3, 6, 5, dtype=torch.float64),))
    # check=False returns the (wrong) model without complaint: the BN shift is off by 0.5 after the ReLU's input
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    fused = reparam.fuse(model, (x,), check=False)
    assert fused.reparam_report.max_rel_error is None  # nothing was compared
    assert count_ops(fused, x)["bn"] == 0
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) > 1e-3


def test_equivalence_error_names_the_region_and_the_output(monkeypatch):
    import reparam.affine as A

    real = A.batchnorm
    monkeypatch.setattr(
        A,
        "batchnorm",
        lambda *a: A.compose(
            real(*a), A.channelwise(torch.full((a[0].numel(),), 2.0, dtype=torch.float64), None, a[-1])
        ),
    )
    model = StructuredOutputs().double().eval()
    with pytest.raises(reparam.EquivalenceError) as info:
        reparam.fuse(model, (torch.randn(2, 4, 6, 5, dtype=torch.float64),))
    assert "region block." in str(info.value) and "output[1]['head'] is off by" in str(info.value)


class NoConvInput(nn.Module):
    """Nothing tells reparam what shape the input has: no conv or linear reads it."""

    def __init__(self):
        super().__init__()
        self.bn = bn(4)

    def forward(self, x):
        return torch.relu(self.bn(x) * 2.0)


def test_no_inferable_inputs_warns_verification_skipped():
    with pytest.warns(reparam.VerificationSkippedWarning):
        fused, report = reparam.fuse_with_report(NoConvInput().eval())
    assert report.max_rel_error is None
    assert any("verification skipped" in n for n in report.notes)


def test_inputs_are_inferred_when_omitted():
    model = RepVGG(3, 4, 2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", reparam.VerificationSkippedWarning)
        fused, report = reparam.fuse_with_report(model)
    assert report.max_rel_error is not None and report.max_rel_error <= 1e-8
    assert count_ops(fused, torch.randn(1, 3, 8, 8))["conv"] == 1


# ============================================================================================
# dtype of a model without parameters


class ParameterFree(nn.Module):
    def forward(self, x):
        return x + x / -1.5


def test_parameterless_float64_model_stays_float64():
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    fused = reparam.fuse(ParameterFree().eval(), (x,))
    assert {p.dtype for p in fused.parameters()} <= {torch.float64}
    assert rel_err(fused(x), ParameterFree()(x)) <= F64_TOL


def test_tensor_constants_in_forward_trace_and_fold():
    """``x * torch.tensor([2.])`` is traced to a ``_tensor_constant`` the GraphModule keeps (the state restore after
    tracing used to delete it first, so such models were fused part by part, i.e. not at all); the user's model gains
    no attribute."""

    class Doubled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) * torch.tensor([2.0])

    model = Doubled().eval()
    x = torch.randn(1, 3, 8, 8)
    fused, report = reparam.fuse_with_report(model, x)
    assert report.counts()["fold_bn"] == 1 and not report.notes
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert not hasattr(model, "_tensor_constant0")
    torch.testing.assert_close(fused(x), model(x))
