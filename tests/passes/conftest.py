"""Shared setup of the per-pass unit tests: a small hand-built model traced as the pipeline traces it, and the
checks every test makes after running one pass on it.

:func:`traced` follows :func:`reparam.pipeline._fuse_graph`'s preconditions: the model in float64 and eval mode,
traced with :func:`reparam.trace.symbolic_trace`, shapes recorded (``meta['tensor_meta']``) and origins tagged.
:meth:`Case.assert_exact` compares the rewritten graph with a pristine deep copy of the model (float64, relative
L2 error below :data:`EXACT`) on the example inputs and on a fresh random twin of them (a constant input could hide
a wrong weight).  The graph, the report and the numbers are what a pass's test asserts on, never the pass's
return value beyond ``bool(result)``.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from conftest import random_bn, rel_err
from reparam import trace as T
from reparam.proofs import tag_origins
from reparam.report import Report

EXACT = 1e-12  # float64 relative L2 error of an exact rewrite on these small graphs

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BNS = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def conv(nd: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv{nd}d(*args, **kwargs)``."""
    return _CONVS[nd](*args, **kwargs)


def deconv(nd: int, *args, **kwargs) -> nn.Module:
    """``nn.ConvTranspose{nd}d(*args, **kwargs)``."""
    return _TRANSPOSED[nd](*args, **kwargs)


def bn(c: int, nd: int = 2, **kwargs) -> nn.Module:
    """A BatchNorm for ``nd`` spatial axes (0: over ``(N, C)``) with random, non-trivial statistics."""
    return random_bn(_BNS[nd](c, **kwargs))


def shape(nd: int, c: int, n: int = 2, size: int = 6) -> tuple:
    """``(n, c, size, size - 1, ...)``: ``nd`` spatial axes of different sizes (a transposed axis shows)."""
    return (n, c) + tuple(size - i for i in range(nd))


@dataclass
class Case:
    """A traced float64 model, the pristine copy it must stay equal to, its inputs and a fresh report."""

    gm: fx.GraphModule
    reference: nn.Module
    inputs: tuple
    report: Report = field(default_factory=Report)

    # -- running -----------------------------------------------------------------------------------------
    def run(self, rewrite, *args, **kwargs):
        """``rewrite(gm, report, *args, **kwargs)`` (a pass's entry point); returns what it returns."""
        return rewrite(self.gm, self.report, *args, **kwargs)

    def assert_exact(self, tolerance: float = EXACT) -> float:
        """The rewritten graph computes what the pristine model computes (example and random inputs)."""
        self.gm.graph.lint()
        self.gm.recompile()
        generator = torch.Generator().manual_seed(1)
        twin = tuple(
            torch.randn(x.shape, generator=generator, dtype=x.dtype) if isinstance(x, torch.Tensor) else x
            for x in self.inputs
        )
        worst = 0.0
        for xs in (self.inputs, twin):
            with torch.no_grad():
                got, _ = tree_flatten(self.gm(*_clones(xs)))
                want, _ = tree_flatten(self.reference(*_clones(xs)))
            for a, b in zip(got, want, strict=True):
                assert a.shape == b.shape and a.dtype == b.dtype == torch.float64
                worst = max(worst, rel_err(a, b))
        assert worst < tolerance, f"relative error {worst:.2e} >= {tolerance:.0e}\n{self.gm.code}"
        return worst

    # -- the graph ---------------------------------------------------------------------------------------
    def nodes(self, op: str) -> list:
        return [n for n in self.gm.graph.nodes if n.op == op]

    def modules(self) -> list:
        """The modules the graph calls, in graph order."""
        return [self.gm.get_submodule(n.target) for n in self.nodes("call_module")]

    def module_types(self) -> list:
        return [type(m) for m in self.modules()]

    def functions(self) -> list:
        """Targets of the graph's ``call_function`` nodes, in graph order."""
        return [n.target for n in self.nodes("call_function")]

    def methods(self) -> list:
        return [n.target for n in self.nodes("call_method")]

    # -- the report --------------------------------------------------------------------------------------
    @property
    def reasons(self) -> list:
        return [r.reason for r in self.report.refusals]

    @property
    def events(self) -> Counter:
        return self.report.counts()

    def refused(self, needle: str) -> bool:
        """Some refusal's reason contains ``needle``."""
        return any(needle in r for r in self.reasons)


def _clones(xs: tuple) -> tuple:
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in xs)


def traced(model: nn.Module, *inputs, shapes: bool = True) -> Case:
    """``model`` (float64, eval) traced as the pipeline traces it; ``shapes=False`` leaves shapes unrecorded."""
    model = model.double().eval()
    reference = copy.deepcopy(model)
    gm = T.symbolic_trace(model)
    xs = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
    if shapes:
        assert T.propagate_shapes(gm, xs) is not None, "the model does not run on its example inputs"
    tag_origins(gm)
    return Case(gm, reference, xs)


class Lambda(nn.Module):
    """A one-input model whose forward is ``fn(self, x)``, with ``modules`` registered as its children."""

    def __init__(self, fn, **modules: nn.Module):
        super().__init__()
        self.fn = fn
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, x):
        return self.fn(self, x)


class Lambda2(Lambda):
    """:class:`Lambda` with two inputs: ``fn(self, x, y)``."""

    def forward(self, x, y):
        return self.fn(self, x, y)


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws the same weights and inputs."""
    torch.manual_seed(0)
