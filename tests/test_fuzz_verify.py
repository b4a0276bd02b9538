"""Fuzzing the self-check: no false alarm on ill-conditioned graphs, no missed mismatch.

- Ill-conditioned nets: deep chains of RepVGG-style blocks (3x3 + 1x1 + BN identity) whose BatchNorms have
  large scales, tiny variances and large shifts, so the original itself amplifies rounding by many orders
  of magnitude.  ``reparam.fuse`` (verification on) must never raise on them.
- Injected mismatches: one fused kernel of a random graph (the fuzzer's generator) or of an ill-conditioned net
  gets one wrong weight.  Whenever that makes the fused model differ from the original on the inputs it is
  checked on by more than ``NOISE_FACTOR`` times fusion's own rounding, ``reparam.fuse`` must raise
  :class:`reparam.EquivalenceError` naming the region, or return a model without the wrong weight.

Default (CI) run: ``REPARAM_VERIFY_EXAMPLES`` examples per test (25 unless set); the slow profile draws
``max(REPARAM_FUZZ_EXAMPLES, 10_000)``:

    REPARAM_FUZZ_EXAMPLES=10000 pytest tests/test_fuzz_verify.py -m slow
"""

from __future__ import annotations

import os
import re
import warnings
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, note, settings
from hypothesis import strategies as st
from test_fuzz import FUZZ_SETTINGS, fuzz_case

import reparam
import reparam.passes.collapse as collapse
from reparam.proofs import PROOF_TRIGGER
from reparam.verify import NOISE_FACTOR, relative_error

pytestmark = pytest.mark.usefixtures("single_thread")

EXAMPLES = int(os.environ.get("REPARAM_VERIFY_EXAMPLES", "25"))
SLOW_EXAMPLES = max(int(os.environ.get("REPARAM_FUZZ_EXAMPLES", "0")), 10_000)
F64 = torch.float64


class WildBlock(nn.Module):
    def __init__(self, c: int, g: torch.Generator, scale: float):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c, momentum=None))
        self.pointwise = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c, momentum=None))
        self.identity = nn.BatchNorm2d(c, momentum=None)
        with torch.no_grad():
            for bn in (self.dense[1], self.pointwise[1], self.identity):
                bn.weight.copy_(torch.randn(c, generator=g))
                bn.bias.copy_(scale * (1 + torch.rand(c, generator=g)))  # large shifts: big means downstream

    def forward(self, x):
        return F.relu(self.dense(x) + self.pointwise(x) + self.identity(x))


class IllConditioned(nn.Module):
    """A deep chain of :class:`WildBlock` s and a centred linear head, built so the original cancels: every
    block shifts its output by ~``scale`` and the next BatchNorms subtract the resulting large means again
    (running statistics calibrated on the example batch), so each block loses ``log10(scale)`` digits."""

    def __init__(self, c: int, depth: int, scale: float, seed: int, x: torch.Tensor):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():  # the convs' default initialisation too: the same net for the same seed
            torch.manual_seed(seed)
            self.blocks = nn.Sequential(*[WildBlock(c, g, scale) for _ in range(depth)])
            self.head = nn.Sequential(nn.Conv2d(c, 3, 1), nn.BatchNorm2d(3, momentum=None))  # centred output
        self.double().train()
        with torch.no_grad():
            self(x)  # momentum=None: the running statistics become those of this batch
        self.eval()

    def forward(self, x):
        return self.head(self.blocks(x))


@st.composite
def ill_conditioned(draw):
    seed = draw(st.integers(0, 2**31))
    c, depth = draw(st.integers(2, 8)), draw(st.integers(2, 8))
    scale = 10.0 ** draw(st.integers(0, 7))
    size = draw(st.integers(4, 10))
    x = torch.randn((2, c, size, size), generator=torch.Generator().manual_seed(seed), dtype=F64)
    return IllConditioned(c, depth, scale, seed, x), x


def _no_false_alarm(net: nn.Module, x: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = reparam.fuse(net, (x,))  # raises EquivalenceError on a false alarm
    note(str(fused.reparam_report))


class _WrongWeight:
    """Patches the collapse pass so the ``index``-th fused kernel it emits gets one wrong weight
    (``applied``: whether there was such a kernel)."""

    def __init__(self, index: int, delta: float):
        self.index, self.delta, self.applied = index, delta, False

    def __enter__(self):
        real, emitted = collapse.to_module, []

        def corrupted(*args, **kwargs):
            module = real(*args, **kwargs)
            weight = getattr(module, "weight", None)
            if weight is not None:
                emitted.append(module)
                if len(emitted) - 1 == self.index:  # a wrong copy: an emitted weight may share the original's storage
                    wrong = weight.detach().clone()
                    wrong.view(-1)[0] += self.delta * (1 + wrong.abs().max())
                    module.weight = nn.Parameter(wrong, requires_grad=False)
                    self.applied = True
            return module

        self.patch = mock.patch.object(collapse, "to_module", corrupted)
        self.patch.__enter__()
        return self

    def __exit__(self, *exc):
        return self.patch.__exit__(*exc)


def _outputs(module: nn.Module, x: torch.Tensor) -> tuple:
    with torch.no_grad():
        y = module(x)
    return (y,) if isinstance(y, torch.Tensor) else tuple(y)


def _error(a: tuple, b: tuple) -> float:
    return max(relative_error(p, q) for p, q in zip(a, b, strict=False))


def _caught_and_named(net: nn.Module, x: torch.Tensor, index: int, delta: float) -> None:
    """Never silently wrong: if the wrong weight moves the fused model's outputs on ``x`` clearly past what
    fusing itself does (``NOISE_FACTOR`` times the clean fused model's error, and past the proof trigger),
    ``reparam.fuse`` either raises naming the region, or returns a model without the wrong weight (it found
    the mismatch and fused another way, e.g. part by part)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, clean = _outputs(net, x), _outputs(reparam.fuse(net, (x,), check=False), x)
        allowed = NOISE_FACTOR * max(_error(clean, want), PROOF_TRIGGER)
        with _WrongWeight(index, delta) as wrong:
            corrupted = _outputs(reparam.fuse(net, (x,), check=False), x)
        observable = wrong.applied and _error(corrupted, want) > allowed
        note(f"corrupted kernel {index}: applied={wrong.applied}, observable={observable}")
        if not observable:  # no kernel of that index, or the wrong weight is masked on these inputs
            return
        with _WrongWeight(index, delta):
            try:
                fused = reparam.fuse(net, (x,))
            except reparam.EquivalenceError as err:
                assert re.search(r"region \S+( \(.+\))?: the fused", str(err)), str(err)
                return
        assert _error(_outputs(fused, x), want) <= allowed, "a wrong weight was returned unnoticed"


@given(case=ill_conditioned())
@settings(max_examples=EXAMPLES, derandomize=True, **FUZZ_SETTINGS)
def test_no_false_alarm_on_ill_conditioned_nets(case):
    _no_false_alarm(*case)


@given(case=ill_conditioned(), index=st.integers(0, 6), delta=st.sampled_from([1e-6, 1e-3, 1.0]))
@settings(max_examples=EXAMPLES, derandomize=True, **FUZZ_SETTINGS)
def test_a_wrong_weight_in_an_ill_conditioned_net_is_caught(case, index, delta):
    _caught_and_named(*case, index, delta)


@given(case=fuzz_case(), index=st.integers(0, 4), delta=st.sampled_from([1e-6, 1e-2, 1.0]))
@settings(max_examples=EXAMPLES, derandomize=True, **FUZZ_SETTINGS)
def test_a_wrong_weight_in_a_random_graph_is_caught(case, index, delta):
    _caught_and_named(*case, index, delta)


@pytest.mark.slow
@given(case=ill_conditioned())
@settings(max_examples=SLOW_EXAMPLES, **FUZZ_SETTINGS)
def test_no_false_alarm_on_ill_conditioned_nets_large(case):
    _no_false_alarm(*case)


@pytest.mark.slow
@given(case=fuzz_case(), index=st.integers(0, 4), delta=st.sampled_from([1e-6, 1e-2, 1.0]))
@settings(max_examples=SLOW_EXAMPLES, **FUZZ_SETTINGS)
def test_a_wrong_weight_in_a_random_graph_is_caught_large(case, index, delta):
    _caught_and_named(*case, index, delta)


def test_ill_conditioned_nets_are_ill_conditioned():
    """Not vacuous: the drawn nets amplify float32 rounding past 1e-4 (the original against itself)."""
    x = torch.randn(2, 4, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    net = IllConditioned(4, 4, 1e4, 1, x)
    with torch.no_grad():
        drift = relative_error(net.float()(x.float()).double(), net.double()(x))
    assert drift > 1e-3
