"""The `reparam` command line, run in-process through reparam.cli.main(argv) (and once as a console script).

The model is the zoo's tiny `repvgg_digits` (1x8x8 inputs, 10 classes).  Tests of flags whose effect lies before or
after fusion replace `reparam.fuse` with a stand-in (a copy of the model) to stay fast; the real compiler runs in
the end-to-end conversion, in `inspect` and in the console-script run.
"""

import copy
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from safetensors.torch import save_file

import reparam
import reparam.models as zoo
from reparam import cli
from reparam.errors import EquivalenceError
from reparam.report import Refusal, Report

from conftest import report_row as row
from conftest import run_cli as run

ARCH = "repvgg_digits"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return zoo.create(ARCH).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model):
    """A training checkpoint as DataParallel training scripts write it."""
    path = tmp_path_factory.mktemp("ckpt") / "digits.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 90}, path)
    return path


@pytest.fixture
def copy_fuse(monkeypatch):
    """Replace reparam.fuse by a copy of the model; records the keyword arguments it was given."""
    calls = []

    def fake(model, example_inputs=None, **kwargs):
        calls.append(kwargs)
        return copy.deepcopy(model)

    monkeypatch.setattr(reparam, "fuse", fake)
    return calls


def outputs_match(pt2_path, reference, shape=(3, 1, 8, 8)):
    x = torch.randn(shape)
    y = torch.export.load(pt2_path).module()(x)
    expected = reference(x)
    return ((y - expected).norm() / expected.norm()).item() < 1e-4


# ------------------------------------------------------------------------------------------- conversions


@pytest.fixture(scope="module")
def converted(tmp_path_factory, ckpt):
    """One real end-to-end conversion with every output option."""
    out = tmp_path_factory.mktemp("out")
    result = run(
        "convert",
        ckpt,
        "--arch",
        ARCH,
        "-o",
        out / "d.pt2",
        "--onnx",
        out / "d.onnx",
        "--opset",
        "18",
        "--input-shape",
        "2x1x8x8",
    )
    return result, out


def test_convert_writes_verified_pt2_and_onnx(converted, model):
    result, out = converted
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.iterdir()) == ["d.onnx", "d.pt2"]
    assert outputs_match(out / "d.pt2", model)
    session = onnxruntime.InferenceSession(str(out / "d.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 8, 8)
    (y,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(y, model(x).detach().numpy(), rtol=1e-3, atol=1e-4)


def test_convert_report(converted):
    result, _ = converted
    assert row(result.out, "convolutions run")[:2] == ["10", "5"]
    assert row(result.out, "batch norms run")[:2] == ["12", "0"]
    assert row(result.out, "tensor adds run")[:2] == ["7", "0"]
    assert row(result.out, "linears run")[:2] == ["1", "1"]
    for label in ("parameters", "MACs", "file size (.pt2)", "file size (.onnx)", "latency, input 2,1,8,8"):
        assert len(row(result.out, label)) >= 2
    for label in ("rel. error, fused model", "rel. error, .pt2 reloaded", "rel. error, .onnx in ORT"):
        assert float(row(result.out, label)[0]) < 1e-4
    assert re.search(r"wrote \S+d\.onnx \(.* kB, dynamic batch, opset 18\)", result.out)
    assert "weights: checkpoint['state_dict'] (removed the 'module.' prefix); classes: 10" in result.out
    assert "merge_parallel" in result.out and "fold_bn" in result.out
    for step in ("Reading digits.pth", "Fusing", "Writing and verifying d.pt2", "Writing and verifying d.onnx"):
        assert f"✓ {step}" in result.err


def test_convert_default_output_next_to_checkpoint(tmp_path, model, copy_fuse):
    ckpt = tmp_path / "run7.pth"
    torch.save(model.state_dict(), ckpt)
    result = run("convert", ckpt, "--arch", ARCH)
    assert result.code == 0, result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run7.pth", "run7_deploy.pt2"]
    assert outputs_match(tmp_path / "run7_deploy.pt2", model)
    assert copy_fuse == [{"check": True, "remove_residuals": False}]
    assert "input 1,1,8,8" in result.out  # the zoo's input size by default


def test_convert_safetensors(tmp_path, model, copy_fuse):
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    result = run("convert", tmp_path / "w.safetensors", "--arch", ARCH, "-o", tmp_path / "w.pt2")
    assert result.code == 0, result.err
    assert "weights: safetensors" in result.out
    assert outputs_match(tmp_path / "w.pt2", model)


def test_convert_ema_weights(tmp_path, model, copy_fuse):
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": ema.state_dict()}, tmp_path / "both.pth")
    result = run("convert", tmp_path / "both.pth", "--arch", ARCH, "--ema", "-o", tmp_path / "ema.pt2")
    assert result.code == 0, result.err
    assert "checkpoint['state_dict_ema']" in result.out
    assert outputs_match(tmp_path / "ema.pt2", ema)


def test_convert_num_classes(tmp_path, ckpt, copy_fuse):
    small = zoo.create(ARCH, num_classes=3).eval()
    torch.save({"model": small.state_dict()}, tmp_path / "three.pth")
    result = run("convert", tmp_path / "three.pth", "--arch", ARCH, "-o", tmp_path / "a.pt2")
    assert result.code == 0 and "classes: 3" in result.out  # inferred from linear.weight
    result = run("convert", ckpt, "--arch", ARCH, "--num-classes", "5", "-o", tmp_path / "b.pt2")
    assert result.code == 2
    assert (
        "2 keys of the wrong shape (linear.weight: checkpoint [10, 64] vs model [5, 64], linear.bias: "
        "checkpoint [10] vs model [5])"
    ) in result.error_line
    assert not (tmp_path / "b.pt2").exists()


def test_no_check_and_remove_residuals_reach_fuse(tmp_path, ckpt, model, monkeypatch):
    """A fused model that is wrong: refused by default (exit 1, no file); written under --no-check."""
    calls = []

    def wrong_fuse(m, example_inputs=None, **kwargs):
        calls.append(kwargs)
        bad = copy.deepcopy(m)
        with torch.no_grad():
            bad.linear.bias.add_(1.0)
        return bad

    monkeypatch.setattr(reparam, "fuse", wrong_fuse)
    result = run("convert", ckpt, "--arch", ARCH, "-o", tmp_path / "x.pt2")
    assert result.code == 1
    assert "disagrees" in result.error_line and "--no-check" in result.error_line
    assert list(tmp_path.iterdir()) == []
    result = run("convert", ckpt, "--arch", ARCH, "-o", tmp_path / "x.pt2", "--no-check", "--remove-residuals")
    assert result.code == 0, result.err
    assert (tmp_path / "x.pt2").exists()
    assert float(row(result.out, "rel. error, fused model")[0]) > 1e-4
    assert "--no-check: differences were reported, not enforced" in result.out
    assert calls == [{"check": True, "remove_residuals": False}, {"check": False, "remove_residuals": True}]


def test_equivalence_error_exits_1(tmp_path, ckpt, monkeypatch):
    def failing(*args, **kwargs):
        raise EquivalenceError("output: fused model disagrees with the original, relative error 3e-2; please report")

    monkeypatch.setattr(reparam, "fuse", failing)
    result = run("convert", ckpt, "--arch", ARCH, "-o", tmp_path / "x.pt2")
    assert result.code == 1
    assert result.error_line == (
        "error: output: fused model disagrees with the original, relative error 3e-2; please report"
    )
    result = run("convert", ckpt, "--arch", ARCH, "-o", tmp_path / "x.pt2", "--debug")
    assert result.code == 1 and "Traceback" in result.err and "EquivalenceError" in result.err
    assert list(tmp_path.iterdir()) == []


def test_unexpected_errors_are_one_line(tmp_path, ckpt, monkeypatch):
    def crashing(*args, **kwargs):
        raise RuntimeError("something broke\nwith detail")

    monkeypatch.setattr(reparam, "fuse", crashing)
    result = run("convert", ckpt, "--arch", ARCH, "-o", tmp_path / "x.pt2")
    assert result.code == 1
    assert result.error_line.startswith("error: unexpected RuntimeError: something broke (more with --debug)")
    assert "--debug" in result.error_line


def test_unimplemented_option_is_a_usage_error(tmp_path, ckpt, monkeypatch):
    def unimplemented(*args, **kwargs):
        raise NotImplementedError("remove_residuals=True is not implemented yet")

    monkeypatch.setattr(reparam, "fuse", unimplemented)
    result = run("convert", ckpt, "--arch", ARCH, "-o", tmp_path / "x.pt2", "--remove-residuals")
    assert result.code == 2 and "not implemented" in result.error_line


# ---------------------------------------------------------------------------------------------- safety


def test_pickle_payload_never_runs(tmp_path, model):
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": model.state_dict(), "hook": Payload()}, tmp_path / "evil.pth")
    for command in ("convert", "inspect"):
        result = run(command, tmp_path / "evil.pth", "--arch", ARCH)
        assert result.code == 2
        assert "open" in result.error_line and "--trust-checkpoint" in result.error_line
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pth"]


def test_trust_checkpoint_loads_a_pickled_model(tmp_path, model, copy_fuse):
    torch.save(model, tmp_path / "full.pt")
    result = run("convert", tmp_path / "full.pt", "--arch", ARCH, "-o", tmp_path / "full.pt2")
    assert result.code == 2 and "reparam.models.repvgg.RepVGG" in result.error_line
    result = run("convert", tmp_path / "full.pt", "--arch", ARCH, "-o", tmp_path / "full.pt2", "--trust-checkpoint")
    assert result.code == 0, result.err
    assert outputs_match(tmp_path / "full.pt2", model)


# ---------------------------------------------------------------------------------------- failure paths


def failure_cases(ckpt, tmp):
    corrupt = tmp / "corrupt.pth"
    corrupt.write_bytes(ckpt.read_bytes()[:300])
    a_file = tmp / "a_file"
    a_file.write_text("x")
    base = ["convert", ckpt, "--arch", ARCH]
    return {
        "missing file": (["convert", tmp / "nope.pth", "--arch", ARCH], "checkpoint not found"),
        "corrupt file": (["convert", corrupt, "--arch", ARCH], "cannot read .* as a PyTorch checkpoint"),
        "wrong arch": (
            ["convert", ckpt, "--arch", "repvgg_a0"],
            r"does not match the model: \d+ missing keys .*wrong shape",
        ),
        "unknown arch": (
            ["convert", ckpt, "--arch", "repvgg_digit"],
            "unknown architecture 'repvgg_digit'. Did you mean repvgg_digits",
        ),
        "unknown timm arch": (
            ["convert", ckpt, "--arch", "timm:no_such_model"],
            "unknown architecture 'timm:no_such_model'",
        ),
        "unknown source": (["convert", ckpt, "--arch", "keras:vgg"], "unknown architecture source 'keras'"),
        "output = input": (base + ["-o", ckpt], "is the input file"),
        "onnx output = input": (base + ["--onnx", ckpt], "is the input file"),
        "output dir missing": (base + ["-o", tmp / "missing" / "x.pt2"], "does not exist"),
        "output dir is a file": (base + ["-o", a_file / "x.pt2"], "is not a directory"),
        "output is a directory": (base + ["-o", tmp], "is a directory"),
        "same -o and --onnx": (base + ["-o", tmp / "x.pt2", "--onnx", tmp / "x.pt2"], "name the same file"),
        "onnx suffix on -o": (base + ["-o", tmp / "x.onnx"], "Use --onnx"),
        "old opset": (base + ["--onnx", tmp / "x.onnx", "--opset", "16"], "opset 16 is too old"),
        "opset without onnx": (base + ["--opset", "18"], "--opset only applies to ONNX output"),
        "shape not numbers": (base + ["--input-shape", "1,a,8,8"], "invalid shape '1,a,8,8'"),
        "shape with zero": (base + ["--input-shape", "0,1,8,8"], "invalid shape '0,1,8,8'"),
        "shape negative": (base + ["--input-shape=-1,1,8,8"], "invalid shape '-1,1,8,8'"),
        "shape too short": (base + ["--input-shape", "8"], "invalid shape '8'"),
        "shape empty field": (base + ["--input-shape", "1,,8"], "invalid shape '1,,8'"),
        "shape the model rejects": (base + ["--input-shape", "1,3,8,8"], "cannot run on an input of shape 1,3,8,8"),
        "zero classes": (base + ["--num-classes", "0"], "must be positive"),
        "missing --arch": (["convert", ckpt], "the following arguments are required: --arch"),
        "unknown option": (base + ["--fast"], "unrecognized arguments: --fast"),
        "unknown command": (["compile", ckpt], "invalid choice: 'compile'"),
        "inspect --block without --graph": (["inspect", "--arch", ARCH, "--block", "stage0"], "Add --graph"),
        "inspect unknown block": (
            ["inspect", "--arch", ARCH, "--block", "nope", "--graph", tmp / "g.dot"],
            "no submodule 'nope'",
        ),
        "inspect graph type": (["inspect", "--arch", ARCH, "--graph", tmp / "g.txt"], "unknown file type"),
        "inspect graph = input": (["inspect", ckpt, "--arch", ARCH, "--graph", ckpt], "is the input file"),
    }


CASE_IDS = [
    "missing file",
    "corrupt file",
    "wrong arch",
    "unknown arch",
    "unknown timm arch",
    "unknown source",
    "output = input",
    "onnx output = input",
    "output dir missing",
    "output dir is a file",
    "output is a directory",
    "same -o and --onnx",
    "onnx suffix on -o",
    "old opset",
    "opset without onnx",
    "shape not numbers",
    "shape with zero",
    "shape negative",
    "shape too short",
    "shape empty field",
    "shape the model rejects",
    "zero classes",
    "missing --arch",
    "unknown option",
    "unknown command",
    "inspect --block without --graph",
    "inspect unknown block",
    "inspect graph type",
    "inspect graph = input",
]


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_exits_2_with_one_line(case, ckpt, tmp_path, copy_fuse):
    argv, pattern = failure_cases(ckpt, tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    ckpt_bytes = ckpt.read_bytes()
    result = run(*argv)
    assert result.code == 2, (result.out, result.err)
    line = result.error_line
    assert re.search(pattern, line), line
    assert line.count(". ") >= 1 or line.endswith("usage"), line  # <problem>. <fix>
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert ckpt.read_bytes() == ckpt_bytes
    assert copy_fuse == []  # failed before any fusion


def test_case_table_is_complete(ckpt, tmp_path):
    assert sorted(failure_cases(ckpt, tmp_path)) == sorted(CASE_IDS)


def test_read_only_output_directory(ckpt, read_only_dir, copy_fuse):
    result = run("convert", ckpt, "--arch", ARCH, "-o", read_only_dir / "x.pt2")
    assert result.code == 2 and "not writable" in result.error_line
    assert list(read_only_dir.iterdir()) == [] and copy_fuse == []  # refused before any work


def test_debug_shows_the_traceback(tmp_path):
    result = run("convert", tmp_path / "nope.pth", "--arch", ARCH, "--debug")
    assert result.code == 2
    assert "Traceback" in result.err and "CheckpointError" in result.err
    assert result.err.rstrip().splitlines()[-1].startswith("error: checkpoint not found")
    assert run("--debug", "convert", tmp_path / "nope.pth", "--arch", ARCH).err.count("Traceback") == 1


# --------------------------------------------------------------------------------------- help and list


def test_help_version_and_no_command(capsys):
    for argv in (["--help"], ["convert", "--help"], ["inspect", "--help"], ["list", "--help"]):
        assert cli.main(argv) == 0
    text = capsys.readouterr().out
    for flag in (
        "--arch",
        "--onnx",
        "--input-shape",
        "--num-classes",
        "--trust-checkpoint",
        "--no-check",
        "--graph",
        "--ema",
        "--opset",
        "--remove-residuals",
        "--block",
        "--debug",
    ):
        assert flag in text
    assert cli.main(["--version"]) == 0
    assert reparam.__version__ in capsys.readouterr().out
    assert cli.main([]) == 2


def test_list():
    result = run("list")
    assert result.code == 0
    for name in zoo.names():
        assert name in result.out
    assert "timm:NAME" in result.out and "torchvision:NAME" in result.out


# ----------------------------------------------------------------------------------------------- inspect


def test_inspect_checkpoint(ckpt):
    result = run("inspect", ckpt, "--arch", ARCH)
    assert result.code == 0, result.err
    assert "executes: 10 convolutions, 12 batch norms, 7 tensor adds, 1 linear" in result.out
    assert "will merge (5 regions)" in result.out
    assert "stage1.1" in result.out and "merge_parallel" in result.out and "fold_bn" in result.out
    assert "nothing refused" in result.out


def test_inspect_draws_a_block(tmp_path):
    result = run("inspect", "--arch", ARCH, "--graph", tmp_path / "g.dot", "--block", "stage1.1")
    assert result.code == 0, result.err
    assert "drew stage1.1 before and after" in result.out
    dot = (tmp_path / "g.dot").read_text()
    assert "before: stage1.1 (RepVGGBlock)" in dot and "after reparam.fuse" in dot
    before, after = dot.split("subgraph cluster_1")
    assert "BatchNorm2d" in before and "BatchNorm2d" not in after


def test_inspect_graph_without_renderer_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(reparam, "explain", lambda *a, **k: pytest.fail("analysed before checking the renderer"))
    result = run("inspect", "--arch", ARCH, "--graph", tmp_path / "g.svg")
    assert result.code == 2
    assert "pip install matplotlib" in result.error_line and "graphviz" in result.error_line
    assert list(tmp_path.iterdir()) == []


def test_inspect_lists_refusals(monkeypatch):
    report = Report(refusals=[Refusal("stage0", "BatchNorm without running statistics uses batch statistics")])
    monkeypatch.setattr(reparam, "explain", lambda *a, **k: report)
    result = run("inspect", "--arch", ARCH, "--input-shape", "2,1,8,8")
    assert result.code == 0
    assert "will not merge (1)" in result.out
    assert "BatchNorm without running statistics" in result.out


def test_inspect_third_party_arch():
    pytest.importorskip("timm")
    result = run("inspect", "--arch", "timm:test_byobnet", "--input-shape", "1,3,32,32")
    assert result.code == 0, result.err
    assert "fold_bn" in result.out


# ----------------------------------------------------------------------------------------- console script


def test_console_script(ckpt, tmp_path, model):
    exe = shutil.which("reparam")
    if exe is None:
        pytest.skip("the reparam console script is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [exe, "convert", str(ckpt), "--arch", ARCH, "-o", str(tmp_path / "cs.pt2")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "convolutions run" in done.stdout
    assert outputs_match(tmp_path / "cs.pt2", model)
    assert all(line.startswith("✓ ") or line.startswith("W") for line in done.stderr.splitlines())  # progress only
