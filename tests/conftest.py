"""Shared helpers for the core tests (test_affine, test_passes, test_fuzz, test_api), the command-line tests
(test_cli, test_cli_ultralytics), and file-system failure fixtures for the CLI / output tests (``full_dir``: a
full disk; ``read_only_dir``; ``tmpfs``).

Import them as ``from conftest import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from io import StringIO
from unittest import mock

import pytest
import torch
import torch.nn as nn
from hypothesis import settings
from torch.utils._python_dispatch import TorchDispatchMode


def core_settings(max_examples: int, **kw) -> settings:
    """Hypothesis settings of the core property tests: no deadline (float64 convolutions on a shared
    machine are slow and noisy), failing examples printed as a reproducible blob."""
    return settings(max_examples=max_examples, deadline=None, print_blob=True, **kw)


def kernel_of_shape(shape: str, k: int, nd: int) -> tuple:
    """Kernel size for a drawn shape: "kxk" (k in every axis), "1xk" / "kx1" (k in the last / first axis)."""
    if shape == "kxk":
        return (k,) * nd
    if shape == "1xk":
        return (1,) * (nd - 1) + (k,)
    if shape == "kx1":
        return (k,) + (1,) * (nd - 1)
    raise ValueError(f"unknown kernel shape {shape!r}")


def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """``||got - want|| / max(||want||, floor)`` in float64 (absolute when both are zero).

    ``floor``: the norm below which ``want`` counts as cancellation noise (``x - (x - y + y)`` is
    rounding error only, and two different roundings of it differ by 100 %)."""
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    diff = (got.double() - want.double()).norm().item()
    scale = max(want.double().norm().item(), floor)
    return diff / scale if scale > 0 else diff


def random_bn(bn: nn.modules.batchnorm._BatchNorm, generator: torch.Generator | None = None):
    """Non-trivial BN statistics: mean ~ N(0,1), var ~ U(0.5, 2), affine weight/bias ~ N(0,1)."""
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=generator))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=generator) * 1.5 + 0.5)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.weight.shape, generator=generator))
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=generator))
    return bn


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode, every BatchNorm2d's statistics and affine parameters random (so folding is not the
    identity), tame enough for deep nets: mean, bias ~ N(0, 0.1); var, weight ~ U(0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def bn2d(c: int) -> nn.BatchNorm2d:
    return random_bn(nn.BatchNorm2d(c))


_BN_OPS = ("batch_norm",)
_POINTWISE = {
    f"{op}{suffix}"
    for op in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "neg_", "addcmul", "addcmul_")
    for suffix in ("", ".Tensor", ".Scalar", ".default")
}


class OpCounter(TorchDispatchMode):
    """Counts what actually runs: convolutions, batch norms, additions of equal-size tensors, ...

    ``conv``: aten.convolution; ``bn``: any aten op whose name contains ``batch_norm``;
    ``add``: aten.add/sub of two tensors with the same number of elements (a branch sum, not a
    bias broadcast); ``pointwise``: every add/sub/mul/div/neg/addcmul; ``mul``: multiplies;
    ``cat``: aten.cat; ``addcmul``: a fused channel affine; ``pad``: an explicit constant pad;
    ``pool``: an average pool; ``maxpool``; ``dropout``; ``linear``: a matrix product (aten.addmm / mm).
    """

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()  # e.g. "aten::convolution" / "aten::add.Tensor"
        base = name.split("::")[-1]
        if base in ("convolution", "_convolution", "mkldnn_convolution", "cudnn_convolution"):
            self.counts["conv"] += 1
        elif any(k in base for k in _BN_OPS):
            self.counts["bn"] += 1
        elif base in _POINTWISE:
            self.counts["pointwise"] += 1
            if base in ("add.Tensor", "add_.Tensor", "sub.Tensor", "sub_.Tensor"):
                a, b = args[0], args[1]
                if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.numel() == b.numel():
                    self.counts["add"] += 1
            if base == "addcmul":
                self.counts["addcmul"] += 1
            if base.startswith("mul"):
                self.counts["mul"] += 1
        elif base in ("addmm", "mm", "linear"):
            self.counts["linear"] += 1
        elif func is torch.ops.aten.cat.default:
            self.counts["cat"] += 1
        elif func is torch.ops.aten.constant_pad_nd.default:
            self.counts["pad"] += 1
        elif "avg_pool" in base:
            self.counts["pool"] += 1
        elif "max_pool" in base:
            self.counts["maxpool"] += 1
        elif "dropout" in base or "bernoulli" in base:
            self.counts["dropout"] += 1
        return func(*args, **kwargs)


def count_ops(model: nn.Module, *inputs) -> Counter:
    """Run ``model(*inputs)`` without grad under :class:`OpCounter` and return the counts."""
    counter = OpCounter()
    with torch.no_grad(), counter:
        model(*inputs)
    return counter.counts


def graph_counts(gm) -> Counter:
    """Static counts over an fx GraphModule: conv / bn / linear modules and add / cat calls."""
    import operator

    import torch.nn.functional as F

    modules = dict(gm.named_modules())
    out: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = modules[node.target]
            for sub in m.modules():  # Sequential(pad, conv) counts its conv
                if isinstance(sub, nn.modules.conv._ConvNd):
                    out["conv"] += 1
                elif isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    out["bn"] += 1
                elif isinstance(sub, nn.Linear):
                    out["linear"] += 1
        elif node.op == "call_function":
            if node.target in (F.conv1d, F.conv2d, F.conv3d, torch.conv2d):
                out["conv"] += 1
            elif node.target in (F.batch_norm, torch.batch_norm):
                out["bn"] += 1
            elif node.target in (operator.add, torch.add, operator.iadd):
                out["add"] += 1
            elif node.target in (torch.cat, torch.concat):
                out["cat"] += 1
    return out


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests with one intra-op thread (restored after).

    The tensors in the core tests are tiny; on a busy 2-core machine, intra-op threading makes
    small float64 (grouped / dilated) convolutions 10-30x slower than running them on one thread.
    Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a busy machine two OpenMP threads can be 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ file-system failure fixtures


@contextlib.contextmanager
def tmpfs(path, options: str):
    """Mount a tmpfs with ``options`` (e.g. ``"size=64k"``, ``"ro"``) on ``path`` for the block; skip if we cannot.

    Only root with CAP_SYS_ADMIN can mount (CI runs as root); elsewhere the test is skipped with the reason.
    """
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs on {path} ({done.stderr.strip() or 'mount failed'}): needs root with CAP_SYS_ADMIN"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def full_dir(tmp_path):
    """A directory on a 64 kB file system: writing any model file there fails with ENOSPC (a full disk)."""
    path = tmp_path / "full"
    path.mkdir()
    with tmpfs(path, "size=64k"):
        yield path


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no file can be created in: mode 0o500 for a normal user; a read-only tmpfs for root, whom
    permission bits do not stop."""
    path = tmp_path / "locked"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        try:
            yield path
        finally:
            path.chmod(0o700)
        return
    with tmpfs(path, "ro,size=64k"):
        yield path


# ------------------------------------------------------------------------------------------- command line


@dataclass
class CliRun:
    """Exit code, stdout and stderr of one ``reparam`` command (:func:`run_cli`)."""

    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        """The stderr line starting with `error:` (asserting there is exactly one, and no traceback)."""
        lines = [line for line in self.err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, self.err
        assert "Traceback" not in self.err
        return lines[0]


def run_cli(*argv) -> CliRun:
    """``reparam *argv`` in-process, with a wide console and a one-pass latency measurement."""
    from reparam import cli

    out, err = StringIO(), StringIO()
    with (
        mock.patch.dict(os.environ, {"COLUMNS": "200"}),
        redirect_stdout(out),
        redirect_stderr(err),
        mock.patch.multiple(cli, LATENCY_WARMUP=0, LATENCY_REPEATS=1),
    ):
        code = cli.main([str(a) for a in argv])
    return CliRun(code, out.getvalue(), err.getvalue())


def report_row(text: str, label: str) -> list[str]:
    """The cells of the report-table row starting with ``label``."""
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        if cells and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in:\n{text}")
