"""Cost models (reparam.cost): which doubtful merges happen, why the report says so, and the latency cache.

No test times anything for real: ``LatencyCost`` takes the timer as a parameter, and these tests inject fake ones.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn

import reparam
from conftest import bn2d, count_ops, run_cli
from reparam import cost as C
from reparam.models.blocks import InceptionConcat
from reparam.latency_cache import LatencyCache, LatencyCacheWarning, default_path
from reparam.stats import count_macs


class ConvBN(nn.Module):
    """A merge whose profit is certain (two kernels -> one, same MACs)."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), bn2d(c)

    def forward(self, x):
        return self.bn(self.conv(x))


X = torch.randn(1, 8, 12, 12)


class FakeTimer:
    """``measure(before, after, inputs)`` answering fixed times; records what it was asked to time."""

    def __init__(self, before_s: float, after_s: float):
        self.times = (before_s, after_s)
        self.calls: list = []

    def __call__(self, before, after, inputs):
        self.calls.append((before, after, inputs))
        return self.times


def _fuse(model, x=X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", reparam.TrainingModeWarning)
        return reparam.fuse_with_report(model.eval(), (x,), **kw)


def _latency(tmp_path, timer, name="latency.json"):
    return C.LatencyCost("cpu", torch.float32, LatencyCache(tmp_path / name), measure=timer)


# ------------------------------------------------------------------------------------------------ cost="macs"


def test_macs_keeps_the_inception_block_and_says_why():
    model = InceptionConcat(8)
    fused, report = _fuse(model)
    assert count_ops(fused, X)["conv"] == 3
    assert count_macs(fused, X) <= count_macs(model, X)
    reasons = {r.reason for r in report.refusals}
    assert reasons == {"kept 4 kernels: merging would cost more MACs than it saves (120k -> 249k)"}, report
    (decision,) = report.decisions
    assert (decision.kind, decision.merged, decision.before_kernels, decision.after_kernels) == (
        "merge_concat",
        False,
        4,
        1,
    )
    assert decision.before_macs == count_macs(model, X) and decision.after_macs == 8 * 24 * 9 * 144
    assert decision.before_s is None and "cost decisions (1)" in str(report)


def test_macs_is_the_default_and_certain_merges_are_not_listed():
    fused, report = _fuse(ConvBN(), torch.randn(1, 4, 6, 6))
    assert report.counts()["fold_bn"] == 1 and report.decisions == [] and report.refusals == []
    _, again = _fuse(ConvBN(), torch.randn(1, 4, 6, 6), cost="macs")
    assert again.counts() == report.counts()


def test_bad_cost_or_device_is_one_line_naming_the_choices():
    with pytest.raises(reparam.ReparamError, match=r"cost must be one of 'macs', 'latency' .*got 'fast'") as err:
        reparam.fuse(InceptionConcat(8).eval(), (X,), cost="fast")
    assert "\n" not in str(err.value)
    with pytest.raises(reparam.ReparamError, match="device must be a torch device"):
        reparam.fuse(InceptionConcat(8).eval(), (X,), cost="latency", device="abacus")
    with pytest.raises(reparam.ReparamError, match="cost must be"):
        reparam.explain(InceptionConcat(8).eval(), (X,), cost=3)


def test_a_cost_model_instance_is_asked():
    class Always:
        def __init__(self):
            self.asked = []

        def decide(self, candidate):
            self.asked.append(candidate)
            return C.Decision(True, "always")

    model = Always()
    fused, report = _fuse(InceptionConcat(8), cost=model)
    assert count_ops(fused, X)["conv"] == 1
    (candidate,) = {c.where: c for c in model.asked}.values()
    assert candidate.input_shapes == (torch.Size([1, 8, 12, 12]),) and not candidate.certain
    assert report.decisions[0].merged and report.decisions[0].reason == "always"


# ------------------------------------------------------------------------------------------------ cost="latency"


@pytest.mark.parametrize("merged_faster", [True, False])
def test_latency_follows_the_timer(tmp_path, merged_faster):
    timer = FakeTimer(2e-3, 1e-3) if merged_faster else FakeTimer(1e-3, 2e-3)
    model = InceptionConcat(8)
    fused, report = _fuse(model, cost=_latency(tmp_path, timer))
    with torch.no_grad():
        assert torch.allclose(fused(X), model(X), atol=1e-5)
    assert count_ops(fused, X)["conv"] == (1 if merged_faster else 3)
    ((before, after, inputs),) = timer.calls
    assert [t.shape for t in inputs] == [X.shape] and inputs[0].dtype == torch.float32
    assert all(p.dtype == torch.float32 for m in (before, after) for p in m.parameters())
    with torch.no_grad():  # the timed forms: the region as it is, and one conv of the merged shape (stand-in weights)
        assert torch.allclose(before(X), model(X), atol=1e-5) and after(X).shape == model(X).shape
    assert [type(m) for m in after.modules()] == [nn.Conv2d] and after.weight.shape == (24, 8, 3, 3)
    (decision,) = report.decisions
    assert decision.merged == merged_faster and (decision.before_s, decision.after_s) == timer.times
    if not merged_faster:
        assert any("measured slower (1 ms -> 2 ms on cpu float32)" in r.reason for r in report.refusals), report


@pytest.mark.parametrize("after_s", [1.02e-3, 0.98e-3])
def test_latency_tie_goes_as_the_mac_rule(tmp_path, after_s):
    """Within measurement noise there is no measured reason to depart from cost="macs" (which keeps three convs)."""
    fused, report = _fuse(InceptionConcat(8), cost=_latency(tmp_path, FakeTimer(1.00e-3, after_s)))
    assert count_ops(fused, X)["conv"] == 3 and not report.decisions[0].merged
    assert "a tie within 3%, and merging costs more MACs" in report.decisions[0].reason


def test_latency_does_not_time_a_certain_profit(tmp_path):
    timer = FakeTimer(1.0, 2.0)
    fused, report = _fuse(ConvBN(), torch.randn(1, 4, 6, 6), cost=_latency(tmp_path, timer))
    assert timer.calls == [] and report.counts()["fold_bn"] == 1 and report.decisions == []


def test_latency_times_in_the_deploy_dtype(tmp_path):
    timer = FakeTimer(2e-3, 1e-3)
    _fuse(
        InceptionConcat(8), cost=C.LatencyCost("cpu", torch.float64, LatencyCache(tmp_path / "c.json"), measure=timer)
    )
    ((before, _, inputs),) = timer.calls
    assert inputs[0].dtype == torch.float64 and next(before.parameters()).dtype == torch.float64


# ------------------------------------------------------------------------------------------------ the cache


def test_second_fuse_reads_the_cache_and_times_nothing(tmp_path):
    first_timer = FakeTimer(2e-3, 1e-3)
    first = _latency(tmp_path, first_timer)
    _, report = _fuse(InceptionConcat(8), cost=first)
    assert first.measured == 1 and len(first_timer.calls) == 1
    data = json.loads((tmp_path / "latency.json").read_text())
    (entry,) = data["entries"].values()
    assert entry == {"before_s": 2e-3, "after_s": 1e-3, "merge": True}

    second_timer = FakeTimer(1e-3, 9.0)  # would refuse: never asked, the cached decision is reused verbatim
    second = _latency(tmp_path, second_timer)  # a fresh cache object: reads the file
    fused, again = _fuse(InceptionConcat(8), cost=second)
    assert second.measured == 0 and second_timer.calls == []
    assert count_ops(fused, X)["conv"] == 1 and again.decisions == report.decisions


def test_cache_key_separates_devices_dtypes_and_shapes(tmp_path):
    cost = _latency(tmp_path, FakeTimer(2e-3, 1e-3))
    _fuse(InceptionConcat(8), cost=cost)
    _fuse(InceptionConcat(8), torch.randn(1, 8, 10, 10), cost=cost)
    _fuse(InceptionConcat(8), cost=C.LatencyCost("cpu", torch.float64, cost.cache, measure=cost.measure))
    assert len(cost.cache) == 3


def test_cache_round_trip(tmp_path):
    path = tmp_path / "sub" / "latency.json"
    cache = LatencyCache(path)
    assert cache.get("k") is None
    cache.put("k", {"before_s": 1.0, "after_s": 0.5, "merge": True})
    assert LatencyCache(path).get("k") == {"before_s": 1.0, "after_s": 0.5, "merge": True}
    other = LatencyCache(path)  # another process wrote meanwhile: both entries are kept
    other.put("j", {"before_s": 1.0, "after_s": 2.0, "merge": False})
    cache.put("i", {"before_s": 3.0, "after_s": 2.0, "merge": True})
    assert set(json.loads(path.read_text())["entries"]) == {"i", "j", "k"}
    assert list(path.parent.iterdir()) == [path]  # no temporary files left behind


@pytest.mark.parametrize(
    "content", ["{not json", json.dumps({"version": 99, "entries": {}}), json.dumps([1, 2]), "\udcff"]
)
def test_corrupt_cache_is_ignored_with_a_warning(tmp_path, content):
    path = tmp_path / "latency.json"
    path.write_text(content, errors="surrogateescape")
    timer = FakeTimer(2e-3, 1e-3)
    with pytest.warns(LatencyCacheWarning, match="ignoring the latency cache"):
        fused, _ = _fuse(InceptionConcat(8), cost=_latency(tmp_path, timer))
    assert count_ops(fused, X)["conv"] == 1 and len(timer.calls) == 1
    assert len(json.loads(path.read_text())["entries"]) == 1  # replaced by a valid file


def test_invalid_entries_are_dropped(tmp_path):
    path = tmp_path / "latency.json"
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "entries": {"a": {"merge": "yes"}, "b": 3, "c": {"before_s": 1, "after_s": 2, "merge": False}},
            }
        )
    )
    cache = LatencyCache(path)
    assert cache.get("a") is None and cache.get("b") is None and cache.get("c")["merge"] is False


def test_unwritable_cache_stays_in_memory(tmp_path, read_only_dir):
    cache = LatencyCache(read_only_dir / "latency.json")
    with pytest.warns(LatencyCacheWarning, match="kept in memory only"):
        cache.put("k", {"before_s": 1.0, "after_s": 0.5, "merge": True})
    assert cache.get("k")["merge"] is True


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("REPARAM_CACHE_DIR", str(tmp_path / "cache"))
    assert default_path() == tmp_path / "cache" / "latency.json"
    cost = C.resolve_cost("latency", "cpu", torch.float32)
    assert cost.cache.path == tmp_path / "cache" / "latency.json" and cost.cache is LatencyCache.at()
    monkeypatch.delenv("REPARAM_CACHE_DIR")
    assert default_path().parts[-3:] == (".cache", "reparam", "latency.json")


def test_signature_ignores_names_and_weights():
    one, two = InceptionConcat(8), InceptionConcat(8)
    gm1, gm2 = torch.fx.symbolic_trace(one), torch.fx.symbolic_trace(two)
    assert C.signature(gm1) == C.signature(gm2)
    assert C.signature(gm1) != C.signature(torch.fx.symbolic_trace(InceptionConcat(4)))
    assert "Conv2d(8, 8, kernel_size=(3, 3)" in C.signature(gm1)


# ------------------------------------------------------------------------------------------------ report and CLI


def test_decisions_in_the_json_follow_the_schema(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from pathlib import Path

    schema = json.loads((Path(__file__).parent.parent / "docs" / "report-schema.json").read_text())
    _, report = _fuse(InceptionConcat(8), cost=_latency(tmp_path, FakeTimer(1e-3, 2e-3)))
    doc = report.to_dict()
    jsonschema.validate(doc, {"$defs": schema["$defs"], "$ref": "#/$defs/report"})
    (decision,) = doc["decisions"]
    assert decision["before_s"] == 1e-3 and decision["merged"] is False and decision["kind"] == "merge_concat"


class InceptionNet(nn.Module):
    """A tiny classifier around :class:`Inception`, for the command line."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = InceptionConcat(8)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.stem(x))).mean((2, 3)))


@pytest.fixture
def inception_arch(monkeypatch, tmp_path):
    from reparam.models import registry

    name = "test_inception_cost"
    monkeypatch.setitem(registry._REGISTRY, name, registry.ModelSpec(name, InceptionNet, (3, 12, 12), 10, 2))
    monkeypatch.setenv("REPARAM_CACHE_DIR", str(tmp_path / "cache"))
    return name


def test_inspect_lists_each_decision_with_both_times(inception_arch, monkeypatch):
    monkeypatch.setattr(C, "interleaved_seconds", FakeTimer(2e-3, 1e-3))
    result = run_cli("inspect", "--arch", inception_arch, "--cost", "latency")
    assert result.code == 0, result.err
    assert "cost decisions (1)" in result.out
    row = next(line for line in result.out.splitlines() if "merge_concat" in line and "4 -> 1" in line)
    assert "2 -> 1 ms" in row and "merged" in row


def test_inspect_with_macs_says_not_timed(inception_arch):
    result = run_cli("inspect", "--arch", inception_arch)
    assert result.code == 0, result.err
    row = next(line for line in result.out.splitlines() if "merge_concat" in line and "4 -> 1" in line)
    assert "not timed" in row and "kept" in row
    assert "merging would cost more MACs than it saves" in result.out


def test_convert_cost_latency(inception_arch, monkeypatch, tmp_path):
    monkeypatch.setattr(C, "interleaved_seconds", FakeTimer(2e-3, 1e-3))
    torch.save(InceptionNet().state_dict(), tmp_path / "w.pt")
    result = run_cli(
        "convert",
        tmp_path / "w.pt",
        "--arch",
        inception_arch,
        "--cost",
        "latency",
        "--no-bench",
        "-o",
        tmp_path / "d.pt2",
        "--json",
        tmp_path / "r.json",
    )
    assert result.code == 0, result.err
    (entry,) = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [d["merged"] for d in entry["report"]["decisions"]] == [True]
    assert "cost decisions: 1 doubtful merges weighed, 1 merged" in result.out
    bad = run_cli("convert", tmp_path / "w.pt", "--arch", inception_arch, "--cost", "fast")
    assert bad.code == 2 and "--cost" in bad.err and "'macs'" in bad.err


def test_benchmark_script_runs(capsys):
    """benchmarks/cost_decisions.py in a tiny mode (its verdicts are timings: not asserted here)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "cost_decisions.py"
    spec = importlib.util.spec_from_file_location("_bench_cost_decisions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        assert module.main(["--cases", "4x6", "--rounds", "2"]) in (0, 1)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| 4 ch / 6x6 | 3 |" in out and "latency <= macs" in out
