"""The region-by-region whole-model check (reparam.regions): a model that runs only at its input size is checked
by its trace, bit for bit in float32, and its rewritten regions, in float64, instead of two float64 runs at full
size; anything that path cannot conclude falls back to the float64 check, which names what is wrong."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from conftest import randomised
from test_fuzz_verify import _WrongWeight

import reparam
import reparam.pipeline as pipeline
from reparam import trace as T
from reparam.proofs import pristine_copy, tag_origins
from reparam.regions import checked_by_regions, plan

REGIONS = "the inputs: the unfused trace bit for bit in float32"


class FixedGrid(nn.Module):
    """A tiny transformer with a position table (it runs only on 16x16 inputs): a patch embedding with BatchNorm, a
    layer-scaled MLP with dropout, a token-mixing product, a head; ``container`` wraps the output in an OrderedDict."""

    def __init__(self, dim: int = 8, container: bool = False):
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(3, dim, 4, 4), nn.BatchNorm2d(dim))
        self.pos = nn.Parameter(torch.randn(1, 16, dim))
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(0.1)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.head = nn.Linear(dim, 5)
        self.container = container

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        x = x + self.drop(self.fc2(self.act(self.fc1(self.norm(x))))) * self.gamma
        x = x + (x @ x.transpose(1, 2)).softmax(-1) @ x
        y = self.head(x.mean(1))
        return OrderedDict(logits=y) if self.container else y


def _model(**kwargs) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return randomised(FixedGrid(**kwargs)), torch.randn(1, 3, 16, 16)


def _no_float64_check(monkeypatch) -> list:
    """Records every float64 check at full size (``check_fused``) the pipeline starts."""
    calls, real = [], pipeline.check_fused
    monkeypatch.setattr(pipeline, "check_fused", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    return calls


def test_a_model_that_runs_only_at_its_input_is_checked_region_by_region(monkeypatch):
    model, x = _model()
    calls = _no_float64_check(monkeypatch)
    fused, report = reparam.fuse_with_report(model, x)
    assert report.verified_on.startswith(REGIONS) and report.verified_on.endswith("on the activations it receives")
    assert report.rewrites and 0.0 <= report.max_rel_error < 1e-13
    assert calls == []  # no float64 run of the whole model at full size
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)


def test_check_full_and_a_float64_model_keep_the_float64_check(monkeypatch):
    model, x = _model()
    calls = _no_float64_check(monkeypatch)
    _, full = reparam.fuse_with_report(model, x, check="full")
    assert full.verified_on == "the inputs" and len(calls) == 1
    _, double = reparam.fuse_with_report(copy.deepcopy(model).double(), x.double())
    assert double.verified_on == "the inputs" and len(calls) == 2  # float32 bits say nothing of a float64 model


def test_the_output_containers_are_the_eager_models():
    model, x = _model(container=True)
    fused, report = reparam.fuse_with_report(model, x)
    assert report.verified_on.startswith(REGIONS)
    with torch.no_grad():
        out = fused(x)
    assert type(out) is OrderedDict and list(out) == ["logits"]


@pytest.mark.parametrize("delta", [1e-3, 1e-9])
def test_a_wrong_weight_is_not_accepted_by_regions_and_is_named_by_the_float64_check(monkeypatch, delta):
    model, x = _model()
    concluded, real = [], pipeline.checked_by_regions
    monkeypatch.setattr(pipeline, "checked_by_regions", lambda *a: concluded.append(real(*a)) or concluded[-1])
    with _WrongWeight(index=1, delta=delta) as wrong, pytest.raises(reparam.EquivalenceError, match="region"):
        reparam.fuse(model, x)
    assert wrong.applied and concluded == [None]


def _fused_and_twin(model: nn.Module, x: torch.Tensor):
    """``model``'s trace fused as the pipeline fuses it (float64), and its unfused twin."""
    work = copy.deepcopy(model).double().eval()
    gm = T.symbolic_trace(work)
    pristine = pipeline._fuse_graph(gm, (x.double(),), reparam.Report(), {}, torch.float32)
    return work, gm, pristine


def test_a_trace_that_computes_other_bits_than_the_model_concludes_nothing():
    model, x = _model()
    work, gm, pristine = _fused_and_twin(model, x)
    undone = pipeline.contextlib.nullcontext
    assert checked_by_regions(gm, pristine, work, (x.double(),), undone) is not None
    other = copy.deepcopy(work)
    with torch.no_grad():
        other.head.bias[0] += 1e-3  # as if the eager model took another path than its trace
    assert checked_by_regions(gm, pristine, other, (x.double(),), undone) is None
    assert work.head.bias.dtype == torch.float64  # the float32 run put every weight back


def test_only_the_rewritten_regions_are_evaluated_and_only_what_they_read_is_recorded():
    model, x = _model()
    _, gm, pristine = _fused_and_twin(model, x)
    regions = plan(gm, pristine.module())
    assert regions is not None
    twin_names = {n.name for n in regions.closure}
    assert "softmax" not in twin_names and "matmul" not in twin_names  # the untouched token mixing is not rerun
    assert {"fc2", "mul"} <= twin_names  # the layer scale folded into fc2: the twin's subgraph is evaluated
    assert len(regions.recorded) < 6 and 0 < regions.share < pipeline_share_limit()


def pipeline_share_limit() -> float:
    from reparam.regions import MOST_REWRITTEN

    return MOST_REWRITTEN


class InPlace(nn.Module):
    def __init__(self, shared: bool):
        super().__init__()
        self.conv, self.shared = nn.Conv2d(3, 3, 1), shared

    def forward(self, x):
        y = self.conv(x)
        z = torch.relu_(y)
        return z + y if self.shared else z  # shared: y is read after the update too


@pytest.mark.parametrize("shared", [False, True])
def test_an_in_place_update_is_allowed_only_where_nothing_else_reads_the_value(shared):
    gm = T.symbolic_trace(InPlace(shared))
    tag_origins(gm)
    twin = pristine_copy(gm).module()
    assert (plan(gm, twin) is None) == shared
