"""Every way `reparam convert` can fail, and what it leaves: one line on stderr, the exit code, no partial files.

Exit codes: 2 for bad input or an output that cannot be written (full disk, read-only directory, existing file
without --force), 1 only when verification fails, 128 + N for signal N.  On any failure the output directory is
as it was: no output, no hidden temporary, an existing output unchanged.

The model is the zoo's tiny `repvgg_digits`; helpers and fixtures come from test_cli.
"""

from __future__ import annotations

import copy
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from unittest import mock

import onnxruntime
import pytest
import torch
from torch import nn

import reparam
from reparam import errors, io, precision, shapes, staging
from test_cli import ARCH, ckpt, copy_fuse, model, run  # noqa: F401  (fixtures)


def listing(directory: Path) -> list[str]:
    """Every entry of ``directory``, hidden ones included."""
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------------------------------------------ signals

_SLOW_CHILD = textwrap.dedent(r"""
    import copy, sys, time
    from pathlib import Path
    import torch, reparam
    from reparam import cli

    out, ckpt, ready = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    reparam.fuse = lambda model, example_inputs=None, **kw: copy.deepcopy(model)
    def slow_load(path, *args, **kwargs):  # the .pt2 is written under its temporary name: stop there
        ready.write_text(str(path))
        time.sleep(300)
    torch.export.load = slow_load
    sys.exit(cli.main(["convert", ckpt, "--arch", "repvgg_digits", "-o", str(out / "d.pt2"), "--onnx",
                       str(out / "d.onnx")]))
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_signal_mid_write_leaves_nothing(signum, ckpt, tmp_path):
    out, ready = tmp_path / "out", tmp_path / "ready"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CHILD, str(out), str(ckpt), str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 240
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), child.communicate(timeout=60)
        assert Path(ready.read_text()).exists() and listing(out) != []  # a temporary is there when the signal comes
        child.send_signal(signum)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signum, err
    assert f"error: interrupted by {signum.name}" in err and "Traceback" not in err
    assert listing(out) == []


def test_signal_handlers_are_restored(ckpt, tmp_path, copy_fuse):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    assert run("convert", ckpt, "--arch", ARCH, "-o", tmp_path / "x.pt2").code == 0
    assert {s: signal.getsignal(s) for s in before} == before


# ----------------------------------------------------------------------------------- full disk, read-only


@pytest.mark.parametrize("flag, name", [("-o", "d.pt2"), ("--onnx", "d.onnx")])
def test_full_disk(flag, name, ckpt, full_dir):
    """A real full file system (a 64 kB tmpfs): one line, exit 2, nothing left (it used to abort in C++)."""
    result = run("convert", ckpt, "--arch", ARCH, flag, full_dir / name)
    assert result.code == 2, result.err
    assert result.error_line == (
        f"error: cannot write {full_dir / name} (No space left on device). "
        "Free some space or choose another output path"
    )
    assert listing(full_dir) == []


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    "flag, name, target",
    [
        ("-o", "d.pt2", "pathlib.Path.write_bytes"),
        ("--onnx", "d.onnx", "torch.onnx._internal.exporter._onnx_program.ONNXProgram.save"),
    ],
)
def test_write_error(flag, name, target, ckpt, tmp_path, copy_fuse):
    """The same through a failing write call, wherever tmpfs cannot be mounted; a second output is not kept."""
    other = ["--onnx", tmp_path / "other.onnx"] if flag == "-o" else ["-o", tmp_path / "other.pt2"]
    with mock.patch(target, _no_space):
        result = run("convert", ckpt, "--arch", ARCH, flag, tmp_path / name, *other)
    assert result.code == 2, result.err
    assert f"cannot write {tmp_path / name} (No space left on device). Free some space" in result.error_line
    assert listing(tmp_path) == []


def test_read_only_directory_found_late(ckpt, read_only_dir, copy_fuse, monkeypatch):
    """A directory that turns read-only after the up-front check: still exit 2 and one line."""
    monkeypatch.setattr(io, "check_output_path", lambda path, inputs=(): Path(path))
    result = run("convert", ckpt, "--arch", ARCH, "-o", read_only_dir / "x.pt2")
    assert result.code == 2, result.err
    assert (
        f"cannot write {read_only_dir} (Read-only file system)" in result.error_line
        or f"cannot write {read_only_dir} (Permission denied)" in result.error_line
    ), result.error_line
    assert listing(read_only_dir) == []


# ----------------------------------------------------------------------------------------- existing files


def test_existing_output_needs_force(ckpt, model, tmp_path, copy_fuse):
    target = tmp_path / "d.pt2"
    target.write_bytes(b"an earlier file")
    result = run("convert", ckpt, "--arch", ARCH, "-o", target, "--onnx", tmp_path / "d.onnx")
    assert result.code == 2
    assert result.error_line == (
        f"error: -o {target} exists already. Pass --force to replace it (replaced only once "
        "every output is written and verified), or choose another path"
    )
    assert target.read_bytes() == b"an earlier file" and listing(tmp_path) == ["d.pt2"] and copy_fuse == []

    result = run("convert", ckpt, "--arch", ARCH, "-o", target, "--onnx", tmp_path / "d.onnx", "--force")
    assert result.code == 0, result.err
    assert f"note: --force: replaced the existing {target}" in result.err
    assert listing(tmp_path) == ["d.onnx", "d.pt2"]
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(torch.export.load(target).module()(x), model(x), atol=1e-5)


def test_rerunning_without_outputs_named_replaces_the_default_one(ckpt, model, tmp_path):
    """The default ``<checkpoint>_deploy.pt2`` is reparam's own name: the same command twice works, with a note."""
    local = tmp_path / "run.pt"
    local.write_bytes(ckpt.read_bytes())
    first = run("convert", local, "--arch", ARCH, "--no-bench")
    assert first.code == 0, first.err
    target = tmp_path / "run_deploy.pt2"
    target.write_bytes(b"stale")  # what the first run wrote, changed since
    second = run("convert", local, "--arch", ARCH, "--no-bench")
    assert second.code == 0, second.err
    assert f"note: the default output (name one with -o to keep both): replaced the existing {target}" in second.err
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(torch.export.load(target).module()(x), model(x), atol=1e-5)


def test_inspect_graph_needs_force(tmp_path):
    graph = tmp_path / "g.dot"
    graph.write_text("mine")
    result = run("inspect", "--arch", ARCH, "--graph", graph)
    assert result.code == 2 and "--graph" in result.error_line and "--force" in result.error_line
    assert graph.read_text() == "mine"
    assert run("inspect", "--arch", ARCH, "--graph", graph, "--force").code == 0
    assert graph.read_text().startswith("digraph")


# ------------------------------------------------------------------------------------------ all or nothing


def _failing_ort(monkeypatch):
    """ONNX Runtime that computes something else: the ONNX file fails its check."""
    real = onnxruntime.InferenceSession.run
    monkeypatch.setattr(onnxruntime.InferenceSession, "run", lambda self, *a, **k: [y + 1 for y in real(self, *a, **k)])


def test_failing_output_leaves_no_other_output(ckpt, tmp_path, copy_fuse, monkeypatch):
    _failing_ort(monkeypatch)
    result = run("convert", ckpt, "--arch", ARCH, "-o", tmp_path / "a.pt2", "--onnx", tmp_path / "a.onnx")
    assert result.code == 1, result.err  # a verification failure
    assert "ONNX file (run in ONNX Runtime) disagrees" in result.error_line
    assert listing(tmp_path) == []  # the .pt2 passed its own check, but is not kept alone


def test_failing_run_keeps_the_existing_outputs(ckpt, tmp_path, copy_fuse, monkeypatch):
    (tmp_path / "a.pt2").write_bytes(b"old pt2")
    (tmp_path / "a.onnx").write_bytes(b"old onnx")
    _failing_ort(monkeypatch)
    result = run("convert", ckpt, "--arch", ARCH, "-o", tmp_path / "a.pt2", "--onnx", tmp_path / "a.onnx", "--force")
    assert result.code == 1
    assert (tmp_path / "a.pt2").read_bytes() == b"old pt2" and (tmp_path / "a.onnx").read_bytes() == b"old onnx"
    assert listing(tmp_path) == ["a.onnx", "a.pt2"]


def test_staging_commit_rolls_back(tmp_path, monkeypatch):
    """A move that fails half-way through the commit puts back what was there."""
    (tmp_path / "b.txt").write_text("old b")
    real_replace = os.replace
    with staging.Staging() as stage:
        for name in ("a.txt", "b.txt", "c.txt"):
            stage.path(tmp_path / name).write_text(f"new {name}")

        def replace(src, dst):
            if Path(dst).name == "c.txt":
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(
            errors.OutputPathError,
            match=r"cannot move c.txt into place \(Input/output error\), so no output was written",
        ):
            stage.commit()
        monkeypatch.setattr(os, "replace", real_replace)
    assert listing(tmp_path) == ["b.txt"] and (tmp_path / "b.txt").read_text() == "old b"


def test_staging_commit_reports_replaced(tmp_path):
    (tmp_path / "b.txt").write_text("old")
    with staging.Staging() as stage:
        stage.path(tmp_path / "a.txt").write_text("A")
        stage.path(tmp_path / "b.txt").write_text("B")
        assert stage.commit() == [tmp_path / "b.txt"]
    assert listing(tmp_path) == ["a.txt", "b.txt"] and (tmp_path / "b.txt").read_text() == "B"


# ------------------------------------------------------------------------------------------- determinism


def test_same_input_same_bytes(ckpt, tmp_path):
    """Two conversions (real fusion) give byte-identical files, whatever the file name."""
    first, second = tmp_path / "1", tmp_path / "2"
    first.mkdir()
    second.mkdir()
    assert run("convert", ckpt, "--arch", ARCH, "-o", first / "d.pt2", "--onnx", first / "d.onnx").code == 0
    assert run("convert", ckpt, "--arch", ARCH, "-o", second / "other.pt2", "--onnx", second / "other.onnx").code == 0
    assert (first / "d.pt2").read_bytes() == (second / "other.pt2").read_bytes()
    assert (first / "d.onnx").read_bytes() == (second / "other.onnx").read_bytes()


# --------------------------------------------------------------------------------------------- precision


def overflowing_checkpoint(model, path: Path) -> Path:
    """`repvgg_digits` with its second stage scaled up 1e5: activations reach ~1e6, beyond float16's 65504."""
    big = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in big.named_parameters():
            if name.startswith("stage1.0.") and name.endswith("conv.weight"):
                p.mul_(1e5)
    torch.save(big.state_dict(), path)
    return path


def test_cli_float16_overflow_is_named_before_fusing(model, tmp_path, monkeypatch):
    ckpt = overflowing_checkpoint(model, tmp_path / "big.pth")
    monkeypatch.setattr(reparam, "fuse", lambda *a, **k: pytest.fail("fused a model that cannot run in float16"))
    start = time.perf_counter()
    result = run("convert", ckpt, "--arch", ARCH, "--dtype", "float16", "-o", tmp_path / "h.pt2")
    assert time.perf_counter() - start < 30
    assert result.code == 2, result.err
    line = result.error_line
    assert "beyond float16's largest finite value 65504" in line and "in stage1." in line, line
    assert "bfloat16" in line and "report" not in line
    assert listing(tmp_path) == ["big.pth"]


def test_check_precision_names_the_overflowing_module():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.fill_(1e4)
            layer.bias.zero_()
    x = torch.ones(2, 4)  # net[0] gives 4e4 (fits float16), net[2] 8 * 4e4 * 1e4
    with pytest.raises(errors.PrecisionError) as info:
        precision.check_precision(net, x, torch.float16)
    message = str(info.value)
    assert message.startswith(
        "the model's activations reach 3.2e+09 in 2 (Linear), beyond float16's largest finite "
        "value 65504: in float16 they overflow to inf."
    ), message
    assert "\n" not in message
    net[0].weight.data.fill_(1e5)  # now net[0] overflows first; ReLU passes the same values on: named by producer
    with pytest.raises(errors.PrecisionError, match=r"reach 3.2e\+10 in 2 \(Linear\), .* first exceeded in 0:"):
        precision.check_precision(net, x, torch.float16)
    assert net[0].weight.dtype == torch.float32  # the model is not touched
    precision.check_precision(net, x, torch.bfloat16)  # bfloat16 has float32's range


class Cancels(nn.Module):
    """(x + 1000) - 1000: exact in float64, a 0.5-step grid in float16 (no module output is out of range)."""

    def forward(self, x):
        return (x + 1000.0) - 1000.0


def test_check_precision_accuracy_fault():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(
        errors.PrecisionError,
        match=r"loses too much accuracy in float16: .* relative error "
        r"0\.\d+ \(limit 0\.01\)",
    ):
        precision.check_precision(Cancels(), x, torch.float16)
    precision.check_precision(Cancels(), x, torch.float32)  # float32 rounds 1000 + x to 6e-5: within 1e-4


def test_check_precision_passes_a_healthy_model(model):
    x = torch.randn(2, 1, 8, 8)
    assert precision.check_precision(model, x, torch.float16) is None
    assert precision.check_precision(model, (x,), torch.bfloat16) is None
    peak = precision.activation_peak(copy.deepcopy(model).double(), x.double())
    assert 0 < peak.value < 1e3 and peak.first_beyond is None and peak.output.shape == (2, 10)


# ------------------------------------------------------------------------------------ example input shapes


@pytest.mark.parametrize(
    "shape, reason",
    [
        ((1, 3, 8, 8), "takes 1 input channel, not 3"),
        ((8, 8), "takes inputs of rank 4 (batched) or 3, not 2"),
        ((1, 1, 1, 8, 8), "takes inputs of rank 4 (batched) or 3, not 5"),
    ],
)
def test_fuse_with_wrong_input_names_the_expected_shape(model, shape, reason):
    with pytest.raises(shapes.InputShapeError) as info:
        reparam.fuse(model, (torch.randn(shape),))
    assert str(info.value) == (
        f"the example input of shape {tuple(shape)} does not fit the model: its first layer "
        f"stage0.rbr_dense.conv (Conv2d) {reason}, so it expects (N, 1, H, W). "
        "Pass inputs of that shape"
    )


def test_input_check_blames_only_a_failing_model():
    """The first *registered* layer is a guess: a model that runs on the inputs is never refused."""

    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 2)  # registered first, applied last
            self.body = nn.Conv2d(3, 8, 1)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3)))

    net = HeadFirst().eval()
    x = torch.randn(1, 3, 4, 4)
    assert shapes.shape_mismatch(net, x) is not None  # the guess is wrong ...
    shapes.check_example_inputs(net, x)  # ... but the model runs: no error
    assert reparam.fuse(net, (x,)).reparam_report.max_rel_error <= 1e-8
    with pytest.raises(
        shapes.InputShapeError,
        match=r"input of shape \(1, 5, 4, 4\) does not fit the model: its "
        r"first layer body \(Conv2d\) takes 3 input channels, not 5, so it expects \(N, 3, H, W\)",
    ):
        reparam.fuse(net, (torch.randn(1, 5, 4, 4),))  # blamed on the layer the run reached first


def test_expected_layout():
    assert shapes.expected_layout(nn.Sequential(nn.Conv1d(6, 2, 1))) == ("N", "6", "L")
    assert shapes.expected_layout(nn.Sequential(nn.Conv3d(2, 2, 1))) == ("N", "2", "D", "H", "W")
    assert shapes.expected_layout(nn.Sequential(nn.Flatten(), nn.Linear(12, 2))) == ("N", "12")
    assert shapes.expected_layout(nn.ReLU()) is None


@pytest.mark.parametrize(
    "shape, reason, example",
    [
        ("1,3,8,8", "takes 1 input channel, not 3", "1,1,8,8"),
        ("2,8,8", "takes 1 input channel, not 2", "1,1,8,8"),
        ("4,1,1,8,8", "takes inputs of rank 4 (batched) or 3, not 5", "1,1,8,8"),
    ],
)
def test_cli_input_shape_names_the_expected_shape(shape, reason, example, ckpt, tmp_path, copy_fuse):
    result = run("convert", ckpt, "--arch", ARCH, "--input-shape", shape, "-o", tmp_path / "x.pt2")
    assert result.code == 2
    assert result.error_line == (
        f"error: {ARCH} cannot run on an input of shape {shape}: its first layer "
        f"stage0.rbr_dense.conv (Conv2d) {reason}. Pass --input-shape N,1,H,W with "
        f"numbers, e.g. {example}"
    )
    assert listing(tmp_path) == [] and copy_fuse == []


# ------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "content, what",
    [
        (
            bytes(range(7, 256)) * 4,
            r"it is neither a pickle, a zip archive nor safetensors: it starts with bytes 07 08",
        ),
        (b"epoch,loss\n1,0.53\n2,0.41\n", r"it is a text file, starting 'epoch,loss 1,0.53 2,0.41'"),
        (b"", "the file is empty"),
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "it is a PNG image"),
    ],
)
def test_not_a_checkpoint_is_named(content, what, tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    result = run("convert", path, "--arch", ARCH)
    assert result.code == 2
    line = result.error_line
    assert line.startswith(f"error: cannot read {path} as a PyTorch checkpoint ({what}")
    assert "weights_only" not in line and "trust" not in line  # no advice to load it unsafely
    assert listing(tmp_path) == ["weights.pt"] and path.read_bytes() == content


def test_ema_without_ema_weights_says_so(ckpt, tmp_path, copy_fuse):
    result = run("convert", ckpt, "--arch", ARCH, "--ema", "-o", tmp_path / "x.pt2")
    assert result.code == 0, result.err
    assert "note: --ema: digits.pth has no EMA weights" in result.err and "using the plain weights" in result.err
    assert "no EMA weights in it: used the plain weights" in result.out
    result = run("convert", ckpt, "--arch", ARCH, "-o", tmp_path / "y.pt2")
    assert "EMA" not in result.err + result.out  # only when --ema was asked for


def test_any_io_error_exits_2(ckpt, tmp_path, monkeypatch):
    """An OSError from a step that does not expect one is still an I/O error (2), never a verification failure (1)."""

    def unreadable(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(ckpt))

    monkeypatch.setattr(reparam, "fuse", unreadable)
    result = run("convert", ckpt, "--arch", ARCH, "-o", tmp_path / "x.pt2")
    assert result.code == 2
    assert result.error_line == (
        f"error: I/O error ({ckpt}): Permission denied. Check the path, the free space and "
        "the permissions, or re-run with --debug"
    )
    assert listing(tmp_path) == []
