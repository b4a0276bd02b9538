"""int8 deployment (reparam.int8, reparam.calib, ``convert --int8``): calibration sources and their warnings, the
option checks, and int8 programs that load and run in ONNX Runtime and ExecuTorch, with the trained digits
model's held-out int8 accuracy within one point of float.

ExecuTorch runs in a child process (as in test_mobile.py: importing it registers process-wide state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from reparam import calib, cli, int8, mobile

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "examples" / "checkpoints" / "repvgg_digits.pt"
ARCH = "repvgg_digits"


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    with (
        mock.patch.dict(os.environ, {"COLUMNS": "220"}),
        redirect_stdout(out),
        redirect_stderr(err),
        mock.patch.multiple(cli, LATENCY_WARMUP=0, LATENCY_REPEATS=1),
    ):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def digits_split():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from train_digits import load_digits_split
    finally:
        sys.path.pop(0)
    return load_digits_split(0)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(train .npy path, held-out images, held-out labels)."""
    pytest.importorskip("sklearn", reason="the digits data ship with scikit-learn")
    train_x, _, test_x, test_y = digits_split()
    path = tmp_path_factory.mktemp("calib") / "train.npy"
    np.save(path, train_x[:256].numpy())
    return path, test_x, test_y


# ------------------------------------------------------------------------------------------ calibration inputs


def test_random_calibration_is_labelled_and_small_sets_warned():
    c = calib.from_random(8, (1, 3, 16, 16))
    assert c.random and c.shape == (1, 3, 16, 16) and len(c.samples) == 8
    assert any("smoke test, not an accuracy measurement" in w for w in c.warnings)
    assert any("8 calibration samples (< 32)" in w for w in c.warnings)
    assert not calib.from_random(calib.MIN_SAMPLES, (1, 3, 4, 4)).warnings[1:]  # only the random label


def test_npy_calibration_shapes(tmp_path):
    good = tmp_path / "x.npy"
    np.save(good, np.random.rand(40, 3, 8, 8).astype(np.float64))
    c = calib.from_npy(good, (1, 3, 8, 8))
    assert len(c.samples) == 40 and c.samples[0].dtype == torch.float32 and not c.warnings
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 1, 8, 8)))
    with pytest.raises(calib.InputError, match=r"shape \(4, 1, 8, 8\); the model takes N,3,H,W"):
        calib.from_npy(bad, (1, 3, 8, 8))


def test_image_folder_preprocessing(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 60 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    prep = calib.Preprocessing(size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    c = calib.from_images(tmp_path, 3, prep)
    assert c.shape == (1, 3, 8, 8) and len(c.samples) == 3
    for i, x in enumerate(c.samples):  # a constant image: ((60 i / 255) - 0.5) / 0.25 everywhere
        assert torch.allclose(x, torch.full_like(x, (60 * i / 255 - 0.5) / 0.25), atol=1e-5)
    assert any("fewer" in w or "< 32" in w for w in c.warnings)
    unnormalized = calib.from_images(tmp_path, 1, calib.Preprocessing(size=(4, 6), mean=None, std=None))
    assert unnormalized.shape == (1, 1, 4, 6) and any("no mean/std" in w for w in unnormalized.warnings)


def test_preprocessing_from_timm_cfg():
    model = torch.nn.Conv2d(3, 3, 1)
    model.pretrained_cfg = {"input_size": (3, 224, 224), "mean": (0.1, 0.2, 0.3), "std": (1, 2, 3), "crop_pct": 0.9}
    prep = calib.preprocessing(model, (1, 3, 64, 64))
    assert prep == calib.Preprocessing((224, 224), (0.1, 0.2, 0.3), (1, 2, 3), 0.9)
    assert calib.preprocessing(model, (1, 3, 64, 64), mean=[0.0], input_size=[32]).size == (32, 32)


def test_agreement_math():
    want = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = torch.tensor([[1.0, 0.1], [0.1, 0.9]])  # noise power 0.03, signal 2 -> 18.2 dB; argmax same
    a = int8.agreement(got, want)
    assert a.top1 == 1.0 and a.samples == 2 and abs(a.max_abs - 0.1) < 1e-6
    assert abs(a.snr_db - 10 * np.log10(2 / 0.03)) < 1e-4
    assert int8.agreement(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])).top1 == 0.0


# ------------------------------------------------------------------------------------------------ CLI checks


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--int8", "--onnx", "{d}/x.onnx"], "--int8 needs calibration inputs"),
        (["--int8", "--calib-random", "4", "-o", "{d}/x.pt2"], "Add --pte OUT.pte or --onnx OUT.onnx"),
        (["--calib-random", "4", "--onnx", "{d}/x.onnx"], "--calib-random only applies to int8 output"),
        (["--int8", "--calib", "{d}/missing", "--onnx", "{d}/x.onnx"], "does not exist"),
        (["--int8", "--calib-random", "4", "--dtype", "float16", "--onnx", "{d}/x.onnx"], "Leave out --dtype"),
    ],
)
def test_int8_option_errors(tmp_path, argv, message):
    code, _, err = run_cli("convert", CKPT, "--arch", ARCH, *[a.format(d=tmp_path) for a in argv])
    assert code == 2 and message in err, err
    assert not any(tmp_path.iterdir())


def test_int8_onnx_digits_accuracy_within_one_point(digits, tmp_path):
    """convert --int8 --equalize --onnx: the QDQ file runs in ONNX Runtime; held-out accuracy within 1 point."""
    import onnx
    import onnxruntime

    calib_path, test_x, test_y = digits
    out = tmp_path / "digits_int8.onnx"
    code, stdout, err = run_cli(
        "convert", CKPT, "--arch", ARCH, "--int8", "--equalize", "--calib", calib_path, "--onnx", out
    )
    assert code == 0, err
    assert "int8 onnx (per-channel weights, ONNX Runtime" in stdout and "equalization:" in stdout
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ int8, not the float model
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: test_x.numpy()})[0])
    float_acc = float_accuracy(test_x, test_y)
    int8_acc = (logits.argmax(1) == test_y).double().mean().item()
    assert int8_acc >= float_acc - 0.01, (int8_acc, float_acc)


def float_accuracy(x, y) -> float:
    import reparam.models as zoo

    model = zoo.create(ARCH)
    model.load_state_dict(torch.load(CKPT, weights_only=True))
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).double().mean().item()


def test_per_tensor_onnx_has_one_weight_scale(tmp_path):
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "pt.onnx"
    code, stdout, err = run_cli(
        "convert", CKPT, "--arch", ARCH, "--int8", "--per-tensor", "--calib-random", "40", "--onnx", out
    )
    assert code == 0, err
    assert "per-tensor weights" in stdout and "smoke test, not an accuracy measurement" in err
    graph = onnx.load(str(out)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    weight_scales = [
        inits[n.input[1]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None and inits[n.input[0]].dtype == np.int8
    ]
    assert weight_scales and all(s.size == 1 for s in weight_scales)


# ------------------------------------------------------------------------------------------------ ExecuTorch

PTE_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from reparam import cli
    argv, out, test = sys.argv[1], sys.argv[2], sys.argv[3]
    code = cli.main(json.loads(argv))
    from executorch.runtime import Runtime
    data = torch.load(test)
    method = Runtime.get().load_program(out).load_method("forward")
    logits = torch.cat([method.execute([x.contiguous()])[0] for x in data["x"].split(1)])
    print("RESULT", json.dumps({"code": code, "acc": (logits.argmax(1) == data["y"]).double().mean().item()}))
""")


def run_pte(tmp_path: Path, extra: list, test_x, test_y) -> tuple[dict, str]:
    ok, why = mobile.executorch_status()
    if not ok:
        pytest.skip(why)
    out, test = tmp_path / "d.pte", tmp_path / "test.pt"
    torch.save({"x": test_x, "y": test_y}, test)
    argv = ["convert", str(CKPT), "--arch", ARCH, "--int8", "--pte", str(out), *map(str, extra)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "COLUMNS": "220"}
    proc = subprocess.run(
        [sys.executable, "-c", PTE_SCRIPT, json.dumps(argv), str(out), str(test)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :]), proc.stdout + proc.stderr


def test_int8_pte_loads_and_runs_in_executorch(tmp_path):
    x = torch.rand(16, 1, 8, 8)
    result, text = run_pte(tmp_path, ["--calib-random", "4"], x, torch.zeros(16, dtype=torch.long))
    assert result["code"] == 0
    assert "int8 pte (per-channel weights, ExecuTorch" in text and "XNNPACK runs" in text
    assert "smoke test, not an accuracy measurement" in text and "(< 32)" in text


def test_int8_pte_digits_accuracy_within_one_point(digits, tmp_path):
    calib_path, test_x, test_y = digits
    result, _ = run_pte(tmp_path, ["--calib", calib_path, "--equalize"], test_x, test_y)
    assert result["code"] == 0 and result["acc"] >= float_accuracy(test_x, test_y) - 0.01, result


@pytest.mark.slow  # ~20 s
def test_benchmark_script_writes_its_table(tmp_path):
    """benchmarks/int8.py (the docs table's generator) in a tiny mode: one zoo model at 16x16."""
    out = tmp_path / "int8.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "int8.py"), "--zoo", "repvgg_a0", "--size", "16", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| repvgg_a0")]
    assert [r[2].strip() for r in rows] == ["no", "yes"] and rows[1][3].strip().startswith("22 (0)"), rows
    assert float(rows[1][4]) > float(rows[0][4])  # the worst layer's per-tensor weight SNR rises
