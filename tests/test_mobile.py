"""Mobile deployment (.pte / .mlpackage), low-precision folding and the int8 weight-quantization report.

- ExecuTorch and Core ML runs happen in one child process (`mobile_run` fixture): importing executorch registers
  pytree constants and native loggers process-wide, which the rest of the suite should not inherit.  Those tests
  skip, with the reason, when `pip install 'reparam[mobile]'` has not been run (or the package cannot be imported).
- The missing-package error paths run everywhere: the packages are hidden from the import system.
- Precision: float16 / bfloat16 nets of the zoo's branch blocks fold in float64, keep their dtype and are no less
  accurate than the unfused low-precision net (vs a float64 reference of the same rounded weights).
- Quantization: reparam.quant's math, and a planted outlier weight found and flagged through `inspect --quant`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from unittest import mock

import pytest
import torch
from torch import nn

import reparam
import reparam.models as zoo
from conftest import tmpfs
from reparam import cli, errors, mobile, quant

ARCH = "repvgg_digits"
MOBILE_HINT = "pip install 'reparam[mobile]'"


def run(*argv) -> tuple[int, str, str]:
    """``reparam *argv`` in-process: (exit code, stdout, stderr)."""
    out, err = StringIO(), StringIO()
    with (
        mock.patch.dict(os.environ, {"COLUMNS": "220"}),
        redirect_stdout(out),
        redirect_stderr(err),
        mock.patch.multiple(cli, LATENCY_WARMUP=0, LATENCY_REPEATS=1),
    ):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return zoo.create(ARCH).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("ckpt") / "digits.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def no_fuse(monkeypatch):
    """Fail the test if the command gets as far as fusing."""
    monkeypatch.setattr(reparam, "fuse", lambda *a, **k: pytest.fail("fused before refusing"))


# -------------------------------------------------------------------------------- ExecuTorch and Core ML

_CHILD = textwrap.dedent(r"""
    import json, sys, torch
    from pathlib import Path
    torch.set_num_threads(1)
    import reparam, reparam.models as zoo
    from reparam import cli, errors, mobile, modules

    out, ckpt, full = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    result = {"executorch_installed": mobile.package_version("executorch") is not None,
              "coreml_installed": mobile.package_version("coremltools") is not None}
    ok, why = mobile.executorch_status()
    result["executorch"] = why if ok else None
    result["executorch_reason"] = None if ok else why
    ok, why = mobile.coreml_status()
    result["coreml"] = why if ok else None
    result["coreml_reason"] = None if ok else why

    def rel(a, b):
        a, b = a.double(), b.double()
        return ((a - b).norm() / b.norm()).item()

    torch.manual_seed(0)
    model = zoo.create("repvgg_digits").eval()
    model.load_state_dict(torch.load(ckpt))
    if result["executorch"]:
        from executorch.runtime import Runtime
        try:  # time only: XNNPACK builds reference graphs of bilinear upsampling once per process (~15 s on a
            # loaded 2-core machine) to match them; these models have no upsampling, so no pattern could match
            from executorch.backends.xnnpack.partition.graphs import bilinear_2d
            bilinear_2d.get_graphs_dict = lambda: {}
        except Exception:
            pass
        argv = ["convert", ckpt, "--arch", "repvgg_digits", "--pte", str(out / "d.pte"), "--input-shape", "1,1,8,8"]
        result["cli_code"] = cli.main(argv)
        result["files"] = sorted(p.name for p in out.iterdir())
        # an independent check of the written file: load it afresh and run it on a new input
        method = Runtime.get().load_program(out / "d.pte").load_method("forward")
        x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(7))
        result["reload_error"] = rel(method.execute([x])[0], model(x))

        # float16 deploy model, compared with the float32 original
        x = torch.randn(1, 1, 8, 8)
        half = reparam.fuse(model, (x,), dtype=torch.float16)
        r = mobile.export_pte(half, (x.half(),), out / "h.pte", original=modules.CastInputs(model, torch.float32))
        result["half"] = {"errors": r.errors, "delegated": r.delegated, "total": r.total_ops,
                          "precision": r.precision,
                          "out_dtype": str(Runtime.get().load_program(out / "h.pte").load_method("forward")
                                           .execute([x.half()])[0].dtype)}

        # a program that disagrees with its reference is refused and leaves nothing behind
        tiny = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU()).eval()
        wrong = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU()).eval()
        try:
            mobile.export_pte(tiny, (x,), out / "bad.pte", original=wrong)
            result["mismatch"] = "no error"
        except errors.ExportMismatchError as exc:
            result["mismatch"] = str(exc)
        result["bad_exists"] = (out / "bad.pte").exists()
        result["leftovers"] = sorted(p.name for p in out.iterdir() if p.name.startswith("."))

        # write errors: a failing write call, and (when the parent could mount one) a full 64 kB tmpfs
        import contextlib, errno, io, os
        from unittest import mock

        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def convert_pte(target):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = cli.main(["convert", ckpt, "--arch", "repvgg_digits", "--pte", str(target)])
            return [code] + [line for line in err.getvalue().splitlines() if line.startswith("error:")]

        before = sorted(p.name for p in out.iterdir())
        with mock.patch("pathlib.Path.write_bytes", no_space):
            result["write_error"] = convert_pte(out / "full.pte")
        result["write_error_files"] = sorted(p.name for p in out.iterdir() if p.name not in before)
        if full:
            result["full_disk"] = convert_pte(Path(full) / "d.pte")
            result["full_disk_files"] = sorted(os.listdir(full))
    if result["coreml"]:
        x = torch.randn(1, 1, 8, 8)
        fused = reparam.fuse(model, (x,))
        r32 = mobile.export_coreml(fused, (x,), out / "m.mlpackage")
        (out / "m.mlpackage" / "stale").write_text("from an earlier run")
        r16 = mobile.export_coreml(fused, (x,), out / "m.mlpackage", precision=torch.float16)
        result["coreml_sizes"] = [r32.size, r16.size]
        result["coreml_manifest"] = (out / "m.mlpackage" / "Manifest.json").is_file()
        result["coreml_stale"] = (out / "m.mlpackage" / "stale").exists()
        result["coreml_leftovers"] = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    print("RESULT " + json.dumps(result))
""")


@pytest.fixture(scope="module")
def mobile_run(tmp_path_factory, ckpt):
    """Run the ExecuTorch / Core ML checks in a child process; returns its results (and the CLI's output).

    A 64 kB tmpfs (a full disk) is mounted for the child's write-error check when this process may mount one.
    """
    out, full = tmp_path_factory.mktemp("mobile"), tmp_path_factory.mktemp("full")
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(tmpfs(full, "size=64k"))
            result = {"full_disk_reason": None}
        except pytest.skip.Exception as skipped:
            full, result = "", {"full_disk_reason": str(skipped)}
        result.update(_run_child(out, ckpt, full))
    return result


def _run_child(out, ckpt, full) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "220"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(out), str(ckpt), str(full)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    result["stdout"], result["stderr"] = done.stdout, done.stderr
    return result


def need(result: dict, package: str) -> None:
    """Skip when ``package`` is not installed (``pip install -e '.[test]'`` installs it); fail when it is installed
    but unusable: a broken install must not pass as a skip."""
    if result[package]:
        return
    if result[package + "_installed"]:
        pytest.fail(f"{package} is installed but unusable: {result[package + '_reason']}")
    pytest.skip(f"{package} not installed (`pip install -e '.[test]'` installs it): {result[package + '_reason']}")


def test_pte_round_trip(mobile_run):
    need(mobile_run, "executorch")
    assert mobile_run["cli_code"] == 0, mobile_run["stderr"][-3000:]
    assert mobile_run["files"] == ["d.pte"]  # --pte alone: no default .pt2 next to it
    assert mobile_run["reload_error"] < 1e-4
    report = mobile_run["stdout"]
    error = re.search(r"rel\. error, \.pte in ExecuTorch\s*│\s*│\s*([0-9.e+-]+)", report)
    assert error and float(error.group(1)) < 1e-4, report
    assert re.search(
        r"wrote \S+d\.pte \(.*static batch, float32, XNNPACK runs (\d+) of \1 ops|"
        r"wrote \S+d\.pte \(.*XNNPACK runs \d+ of \d+ ops, verified in ExecuTorch",
        report,
    ), report
    assert "✓ Lowering to ExecuTorch (XNNPACK), writing and verifying d.pte" in mobile_run["stderr"]


def test_pte_float16(mobile_run):
    need(mobile_run, "executorch")
    half = mobile_run["half"]
    assert half["precision"] == "float16" and half["out_dtype"] == "torch.float16"
    assert half["errors"]["fused"] < 1e-2 and half["errors"]["original"] < 1e-2
    assert half["delegated"] and half["delegated"] >= half["total"] - 2  # the convs and the linear run in XNNPACK


def test_pte_mismatch_writes_nothing(mobile_run):
    need(mobile_run, "executorch")
    assert "disagrees" in mobile_run["mismatch"] and "original" in mobile_run["mismatch"]
    assert not mobile_run["bad_exists"] and mobile_run["leftovers"] == []


def test_pte_write_errors_exit_2_and_leave_nothing(mobile_run):
    need(mobile_run, "executorch")
    code, *lines = mobile_run["write_error"]
    assert code == 2 and len(lines) == 1, mobile_run["write_error"]
    assert re.fullmatch(
        r"error: cannot write \S+full\.pte \(No space left on device\)\. Free some space or choose "
        r"another output path",
        lines[0],
    ), lines
    assert mobile_run["write_error_files"] == []
    if mobile_run["full_disk_reason"]:
        pytest.skip(f"full-disk half: {mobile_run['full_disk_reason']}")
    code, *lines = mobile_run["full_disk"]
    assert code == 2 and len(lines) == 1 and "(No space left on device)" in lines[0], mobile_run["full_disk"]
    assert mobile_run["full_disk_files"] == []


def test_coreml_conversion(mobile_run):
    need(mobile_run, "coreml")
    assert mobile_run["coreml_manifest"]
    assert not mobile_run["coreml_stale"]  # the second conversion replaced the first package whole
    size32, size16 = mobile_run["coreml_sizes"]
    assert size16 < 0.7 * size32  # float16 weights
    assert mobile_run["coreml_leftovers"] == []


# ------------------------------------------------------------------------------------ missing packages


def hide(monkeypatch, *packages: str) -> None:
    """Make ``packages`` unimportable and not installed, as in an environment without them."""
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in packages):
            monkeypatch.setitem(sys.modules, name, None)
    for p in packages:
        monkeypatch.setitem(sys.modules, p, None)
    real = mobile.package_version
    monkeypatch.setattr(mobile, "package_version", lambda name: None if name in packages else real(name))


@pytest.mark.parametrize(
    "flag, package, suffix", [("--pte", "executorch", "pte"), ("--coreml", "coremltools", "mlpackage")]
)
def test_missing_package_is_a_one_line_usage_error(flag, package, suffix, ckpt, tmp_path, monkeypatch, no_fuse):
    hide(monkeypatch, package)
    code, out, err = run("convert", ckpt, "--arch", ARCH, flag, tmp_path / f"x.{suffix}")
    assert code == 2, err
    line = error_line(err)
    assert MOBILE_HINT in line and ("ExecuTorch" in line if package == "executorch" else "coremltools" in line)
    assert list(tmp_path.iterdir()) == []
    assert mobile.executorch_status()[0] is False if package == "executorch" else mobile.coreml_status()[0] is False


def test_installed_but_broken_package(ckpt, tmp_path, monkeypatch, no_fuse):
    hide(monkeypatch, "executorch")
    monkeypatch.setattr(mobile, "package_version", lambda name: "1.5.1")
    code, _, err = run("convert", ckpt, "--arch", ARCH, "--pte", tmp_path / "x.pte")
    assert code == 2
    line = error_line(err)
    assert "executorch 1.5.1 is installed but cannot be imported beside torch" in line and MOBILE_HINT in line


def test_mobile_functions_raise_without_package(monkeypatch, model, tmp_path):
    hide(monkeypatch, "executorch", "coremltools")
    with pytest.raises(errors.MissingPackageError, match=re.escape(MOBILE_HINT)):
        mobile.export_pte(model, torch.randn(1, 1, 8, 8), tmp_path / "x.pte")
    with pytest.raises(errors.MissingPackageError, match=re.escape(MOBILE_HINT)):
        mobile.export_coreml(model, torch.randn(1, 1, 8, 8), tmp_path / "x.mlpackage")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--dtype", "bfloat16", "--onnx", "{tmp}/x.onnx"], "ONNX has no bfloat16"),
        (["--dtype", "bfloat16", "--pte", "{tmp}/x.pte"], "would not run on XNNPACK"),
        (["--dtype", "bfloat16", "--coreml", "{tmp}/x.mlpackage"], "Core ML computes in float32 or float16"),
        (["--dtype", "float8"], "invalid choice: 'float8'"),
        (["--pte", "{tmp}/x.bin"], "Name it x.pte"),
        (["--coreml", "{tmp}/x.mlmodel"], "Name it x.mlpackage"),
        (["-o", "{tmp}/x.pte"], "Use --pte"),
        (["--onnx", "{tmp}/x.pte", "--pte", "{tmp}/x.pte"], "--onnx and --pte name the same file"),
    ],
)
def test_bad_mobile_options_exit_2(argv, pattern, ckpt, tmp_path, no_fuse):
    code, _, err = run("convert", ckpt, "--arch", ARCH, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2, err
    assert re.search(pattern, error_line(err))
    assert list(tmp_path.iterdir()) == []


def test_coreml_refuses_to_replace_a_foreign_directory(ckpt, tmp_path, no_fuse):
    (tmp_path / "x.mlpackage").mkdir()
    code, _, err = run("convert", ckpt, "--arch", ARCH, "--coreml", tmp_path / "x.mlpackage")
    assert code == 2 and "not a Core ML package" in error_line(err)


# ------------------------------------------------------------------------------------------- precision


def branch_net(seed: int = 0) -> nn.Module:
    """The zoo's branch blocks in a row, with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        zoo.RepVGGBlock(3, 16, stride=2),
        zoo.MobileOneBlock(16, 16, groups=16, num_conv_branches=3),
        zoo.MobileOneBlock(16, 32, kernel_size=1, num_conv_branches=3),
        zoo.ACBlock(32, 32),
        zoo.DiverseBranchBlock(32, 32),
        zoo.RepVGGBlock(32, 32),
        zoo.QARepVGGBlock(32, 32),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in net.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return net.eval()


INPUTS = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(100 + i)) for i in range(4)]


def pooled_error(model: nn.Module, reference: nn.Module, dtype: torch.dtype) -> float:
    """Relative L2 error of ``model`` (fed ``dtype`` inputs) vs ``reference`` (float64), pooled over INPUTS."""
    num = den = 0.0
    with torch.no_grad():
        for x in INPUTS:
            want = reference(x.double())
            got = model(x.to(dtype)).double()
            num += (got - want).pow(2).sum().item()
            den += want.pow(2).sum().item()
    return math.sqrt(num / den)


def floating_dtypes(model: nn.Module) -> set:
    return {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_fold_keeps_dtype_and_accuracy(dtype):
    low = branch_net().to(dtype)
    reference = copy.deepcopy(low).double()  # the same rounded weights, evaluated exactly
    fused = reparam.fuse(low, (INPUTS[0].to(dtype),))
    assert floating_dtypes(fused) == {dtype}
    assert floating_dtypes(low) == {dtype}  # the input model is untouched
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == 0
    unfused_error = pooled_error(low, reference, dtype)
    fused_error = pooled_error(fused, reference, dtype)
    assert fused_error <= 1.5 * unfused_error, (fused_error, unfused_error)

    # the bound bites: folding with a coarser rounding (float16 folded through bfloat16) fails it
    if dtype == torch.float16:
        coarse = copy.deepcopy(fused)
        with torch.no_grad():
            for p in coarse.parameters():
                p.copy_(p.to(torch.bfloat16).to(dtype))
        assert pooled_error(coarse, reference, dtype) > 1.5 * unfused_error


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_option_makes_a_low_precision_deploy_model(dtype):
    net = branch_net(1)
    reference = copy.deepcopy(net).double()
    fused = reparam.fuse(net, (INPUTS[0],), dtype=dtype)
    assert floating_dtypes(fused) == {dtype}
    assert floating_dtypes(net) == {torch.float32}
    cast_error = pooled_error(copy.deepcopy(net).to(dtype), reference, dtype)  # just casting the training net
    assert pooled_error(fused, reference, dtype) <= 1.5 * cast_error


def test_cli_dtype_float16(ckpt, model, tmp_path):
    import onnxruntime

    code, out, err = run(
        "convert", ckpt, "--arch", ARCH, "--dtype", "float16", "-o", tmp_path / "h.pt2", "--onnx", tmp_path / "h.onnx"
    )
    assert code == 0, err
    assert "precision: float16" in out
    program = torch.export.load(tmp_path / "h.pt2")
    assert {p.dtype for p in program.state_dict.values() if p.is_floating_point()} == {torch.float16}
    x = torch.randn(3, 1, 8, 8)
    assert rel(program.module()(x.half()), model(x)) < 1e-2
    session = onnxruntime.InferenceSession(str(tmp_path / "h.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float16)"
    (y,) = session.run(None, {"input": x.half().numpy()})
    assert rel(torch.from_numpy(y), model(x)) < 1e-2


def test_cli_dtype_bfloat16_pt2(ckpt, model, tmp_path):
    code, out, err = run("convert", ckpt, "--arch", ARCH, "--dtype", "bfloat16", "-o", tmp_path / "b.pt2")
    assert code == 0, err
    x = torch.randn(2, 1, 8, 8)
    y = torch.export.load(tmp_path / "b.pt2").module()(x.bfloat16())
    assert y.dtype == torch.bfloat16 and rel(y, model(x)) < 5e-2


# ---------------------------------------------------------------------------------------- quantization


def test_quantize_symmetric_and_snr():
    levels = torch.arange(-127, 128, dtype=torch.float64) / 128  # the int8 grid of scale 1/128: exact
    assert torch.equal(quant.quantize_symmetric(levels), levels)
    assert quant.snr_db(levels, quant.quantize_symmetric(levels)) == math.inf
    assert torch.equal(quant.quantize_symmetric(torch.zeros(4, 3)), torch.zeros(4, 3, dtype=torch.float64))
    w = torch.randn(64, 64, 3, 3, generator=torch.Generator().manual_seed(0))
    layer = quant.analyze_weight(w)
    predicted = 10 * math.log10(12 * 127**2) - 20 * math.log10(layer.outlier_ratio)  # uniform rounding noise
    assert abs(layer.per_tensor_snr_db - predicted) < 1.0
    assert not layer.flagged and layer.advice == ""
    # per-channel scales: a channel ten times larger than the others ruins per-tensor quantization only
    w[0] *= 30
    layer = quant.analyze_weight(w)
    assert layer.channel_spread > 20 and layer.per_channel_snr_db > layer.per_tensor_snr_db + 3
    q = quant.quantize_symmetric(w, per_channel=True)
    scales = w.abs().amax(dim=(1, 2, 3)) / 127
    assert torch.all((q - w.double()).abs().amax(dim=(1, 2, 3)) <= scales.double() / 2 + 1e-12)


def outlier_net() -> nn.Module:
    """Branch blocks without identity branches (those put a 1 on the kernel centre, an outlier of its own)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        zoo.RepVGGBlock(3, 16, stride=2),
        zoo.RepVGGBlock(16, 32, stride=2),
        zoo.ACBlock(32, 48),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(48, 10),
    )
    return net.eval()


def test_planted_outlier_is_flagged():
    net = outlier_net()
    x = torch.randn(1, 3, 16, 16)
    clean = quant.analyze_model(reparam.fuse(net, (x,)))
    assert [layer.kind for layer in clean.layers] == ["conv 3×3", "conv 3×3", "conv 3×3", "linear"]
    assert clean.flagged == []
    with torch.no_grad():
        weight = net[1].rbr_dense.conv.weight
        weight[5, 3, 1, 1] = 200 * weight.std()  # one huge weight in the second block's 3×3 branch
    report = quant.analyze_model(reparam.fuse(net, (x,)))
    assert [layer.name for layer in report.flagged] == ["1_reparam"]  # the fused model's flat name (reparam.flatten)
    bad = report.flagged[0]
    assert bad.per_tensor_snr_db < quant.SNR_THRESHOLD_DB and bad.outlier_ratio > quant.OUTLIER_THRESHOLD
    assert len(bad.flags) == 3 and bad.per_tensor_worst_channel_snr_db < quant.CHANNEL_SNR_THRESHOLD_DB
    assert bad.advice == "per-channel"  # the outlier's channel is dominated by it; the others get their own scales
    assert report.worst(1) == [bad]

    # a BatchNorm with a tiny running variance blows up one whole output channel: per-channel scales fix it
    net = outlier_net()
    with torch.no_grad():
        net[2].square_bn.running_var[7] = 1e-6
    report = quant.analyze_model(reparam.fuse(net, (x,)))
    assert [layer.name for layer in report.flagged] == ["2_reparam"]
    assert report.flagged[0].advice == "per-channel" and report.flagged[0].channel_spread > 20


def test_inspect_quant_reports_the_planted_layer(tmp_path, model):
    planted = copy.deepcopy(model)
    with torch.no_grad():
        w = planted.stage1[0].rbr_dense.conv.weight
        w[0, 0, 0, 0] = 300 * w.std()
    torch.save(planted.state_dict(), tmp_path / "planted.pth")
    code, out, err = run("inspect", tmp_path / "planted.pth", "--arch", ARCH, "--quant")
    assert code == 0, err
    assert "int8 weight quantization of the fused model (6 conv/linear layers;" in out
    flagged = dict(re.findall(r"^  (\S+): (.*)$", out, flags=re.M))
    assert "per-tensor SNR" in flagged["stage1_0_reparam"] and "max|w|/std" in flagged["stage1_0_reparam"], out
    assert "docs/quantization.md" in out
    code, out, _ = run("inspect", "--arch", ARCH)
    assert code == 0 and "weight quantization" not in out  # only with --quant
