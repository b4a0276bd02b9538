"""``reparam convert`` on ultralytics YOLO: a training checkpoint (``yolov8n.pt``), a model yaml,
``--arch ultralytics:``.

The checkpoint is written here as ultralytics' trainer writes it: a dict whose ``ema`` entry is the pickled model in
float16 (its hyperparameters attached as an ``IterableSimpleNamespace``), ``model`` None, ``train_args`` a dict.
It must load without ``weights_only=False``: only the allow-list of :mod:`reparam.yolo` is unpickled.  Inputs are
64x64 to keep the conversions at a few seconds.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import report_row, run_cli

os.environ.setdefault("YOLO_OFFLINE", "1")
pytest.importorskip("ultralytics", reason="ultralytics is not installed (pip install ultralytics)")

from reparam import errors, yolo  # noqa: E402

SHAPE = "1,3,64,64"
TOL = 1e-4


@pytest.fixture(scope="module")
def trained():
    """yolov8n with random weights and BN statistics, as a trainer leaves it (hyperparameters attached)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", verbose=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.copy_(0.1 * torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(0.5 + 1.5 * torch.rand(bn.num_features, generator=g))
    model.args = get_cfg(overrides={"imgsz": 64})
    return model.eval()


def _save_checkpoint(model, path: Path, **extra) -> Path:
    """``torch.save`` like ultralytics' trainer: the EMA copy in float16 under ``ema``."""
    torch.save(
        {
            "epoch": -1,
            "best_fitness": None,
            "model": None,
            "ema": copy.deepcopy(model).half(),
            "updates": 10,
            "optimizer": None,
            "train_args": dict(vars(model.args)),
            "train_metrics": {"fitness": 0.0},
            "date": "2026-12-01T00:00:00",
            "version": "8.4.0",
            **extra,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, trained):
    return _save_checkpoint(trained, tmp_path_factory.mktemp("yolo") / "best.pt")


def _reference(checkpoint: Path):
    """What ``yolo export`` would export: the checkpoint's model in float32, heads in export mode (trusted here:
    the test wrote the file)."""
    model = torch.load(checkpoint, map_location="cpu", weights_only=False)["ema"]
    return yolo.prepare(model)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("out")
    result = run_cli("convert", checkpoint, "--input-shape", SHAPE, "-o", out / "best.pt2", "--onnx", out / "best.onnx")
    return result, out


def test_convert_checkpoint_without_arch(converted):
    result, out = converted
    assert result.code == 0, result.err
    assert (out / "best.pt2").is_file() and (out / "best.onnx").is_file()
    assert "weights: checkpoint['ema'] (a pickled DetectionModel, float16 → float32); classes: 80" in result.out
    assert "ultralytics:yolov8n.yaml: best.pt → deploy" in result.out


def test_convert_folds_every_batch_norm(converted):
    """As ultralytics' own ``fuse()`` does: 57 batch norms before, none after, no more convolutions."""
    result, _ = converted
    assert result.code == 0, result.err
    assert report_row(result.out, "batch norms run")[:2] == ["57", "0"]
    before, after = (int(c) for c in report_row(result.out, "convolutions run")[:2])
    assert after <= before == 64


def test_exported_files_match_the_checkpoint(converted, checkpoint):
    import onnxruntime

    result, out = converted
    assert result.code == 0, result.err
    reference = _reference(checkpoint)
    x = torch.randn(2, 3, 64, 64)  # another batch size: the batch axis is dynamic
    with torch.no_grad():
        want = reference(x)
        got = torch.export.load(out / "best.pt2").module()(x)
    assert isinstance(want, torch.Tensor) and want.shape == (2, 84, 84)  # export mode: predictions only
    assert got.dtype == torch.float32 and _rel(got, want) <= TOL
    session = onnxruntime.InferenceSession(str(out / "best.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert _rel(torch.from_numpy(np.asarray(onnx_out)), want) <= TOL


def test_convert_yaml_with_random_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("convert", "yolov8n.yaml", "--input-shape", SHAPE)
    assert result.code == 0, result.err
    assert (tmp_path / "yolov8n_deploy.pt2").is_file()  # next to nothing: in the working directory
    assert "ultralytics:yolov8n.yaml: random weights → deploy" in result.out
    assert "weights: random weights (no checkpoint)" in result.out
    assert report_row(result.out, "batch norms run")[1] == "0"


def test_arch_ultralytics_without_checkpoint(tmp_path):
    result = run_cli(
        "convert", "--arch", "ultralytics:yolov8n-seg.yaml", "--input-shape", SHAPE, "-o", tmp_path / "s.pt2"
    )
    assert result.code == 0, result.err
    assert (tmp_path / "s.pt2").is_file()
    assert report_row(result.out, "batch norms run")[1] == "0"


@pytest.mark.parametrize("kind", ["ultralytics checkpoint", "state dict"])
def test_arch_ultralytics_loads_weights_strictly(kind, tmp_path, checkpoint, trained, monkeypatch):
    """With --arch the weights (of an ultralytics checkpoint, or a plain state dict) go into that architecture,
    key for key."""
    import reparam

    if kind == "state dict":
        checkpoint = tmp_path / "weights.pth"
        torch.save({"state_dict": trained.state_dict()}, checkpoint)
    monkeypatch.setattr(reparam, "fuse", lambda model, *a, **k: copy.deepcopy(model))  # loading is under test
    ok = run_cli(
        "convert",
        checkpoint,
        "--arch",
        "ultralytics:yolov8n.yaml",
        "--input-shape",
        SHAPE,
        "-o",
        tmp_path / "n.pt2",
        "--no-check",
    )
    assert ok.code == 0, ok.err
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        reference = yolo.prepare(copy.deepcopy(trained)) if kind == "state dict" else _reference(checkpoint)
        want = reference(x)
        assert _rel(torch.export.load(tmp_path / "n.pt2").module()(x), want) <= TOL
    wrong = run_cli(
        "convert", checkpoint, "--arch", "ultralytics:yolov8s.yaml", "--input-shape", SHAPE, "-o", tmp_path / "s.pt2"
    )
    assert wrong.code == 2 and "does not match the model" in wrong.error_line


def test_inspect_ultralytics_checkpoint(checkpoint):
    result = run_cli("inspect", checkpoint, "--input-shape", SHAPE)
    assert result.code == 0, result.err
    assert "ultralytics:yolov8n.yaml" in result.out and "executes: 64 convolutions, 57 batch norms" in result.out


# ---------------------------------------------------------------------------------------------- safety


def test_allow_list():
    """nn.Module classes defined in ultralytics.nn / torch.nn.modules and a few data types; nothing else."""
    allowed = yolo.allowed_globals(
        [
            "ultralytics.nn.modules.conv.Conv",
            "ultralytics.nn.tasks.DetectionModel",
            "torch.nn.modules.conv.Conv2d",
            "ultralytics.utils.IterableSimpleNamespace",
        ],
        Path("x.pt"),
    )
    from ultralytics.nn.modules.conv import Conv

    assert Conv in allowed and torch.nn.Conv2d in allowed
    for name in (
        "ultralytics.nn.tasks.torch_safe_load",  # a function of an allowed module
        "ultralytics.nn.tasks.nn",  # a module re-exported there
        "ultralytics.nn.modules.conv.torch",
        "ultralytics.nn.tasks.Conv",  # a class re-exported there, not defined there
        "ultralytics.utils.loss.v8DetectionLoss",  # outside ultralytics.nn
        "builtins.eval",
        "os.system",
        "torch.nn.modules.module.warnings",
    ):
        with pytest.raises(errors.UnsafeCheckpointError, match="--trust-checkpoint") as refused:
            yolo.allowed_globals(["ultralytics.nn.modules.conv.Conv", name], Path("x.pt"))
        assert refused.value.globals == [name]


def test_payload_in_an_ultralytics_checkpoint_never_runs(tmp_path, trained):
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = _save_checkpoint(trained, tmp_path / "evil.pt", hook=Payload())
    for command in ("convert", "inspect"):
        result = run_cli(command, evil, "--input-shape", SHAPE)
        assert result.code == 2
        assert "open" in result.error_line and "--trust-checkpoint" in result.error_line
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]


def test_not_an_ultralytics_checkpoint(tmp_path, trained):
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": trained.state_dict()}, plain)
    result = run_cli("convert", plain, "--input-shape", SHAPE)
    assert result.code == 2
    assert "plain.pt is not an ultralytics checkpoint" in result.error_line and "--arch" in result.error_line
    with pytest.raises(errors.CheckpointError, match="not an ultralytics checkpoint"):
        yolo.load_checkpoint(plain)


def test_unknown_config(tmp_path):
    result = run_cli("convert", "yolov99z.yaml", "-o", tmp_path / "x.pt2")
    assert result.code == 2 and "cannot read the ultralytics config 'yolov99z.yaml'" in result.error_line
    assert list(tmp_path.iterdir()) == []


def test_config_and_arch_together(tmp_path):
    result = run_cli("convert", "yolov8n.yaml", "--arch", "ultralytics:yolov8n.yaml", "-o", tmp_path / "x.pt2")
    assert result.code == 2 and "replaces --arch" in result.error_line


@pytest.mark.parametrize("how", ["checkpoint", "yaml", "arch"])
def test_ultralytics_not_installed(how, tmp_path, checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # import ultralytics now raises ImportError
    argv = {"checkpoint": [checkpoint], "yaml": ["yolov8n.yaml"], "arch": ["--arch", "ultralytics:yolov8n.yaml"]}[how]
    result = run_cli("convert", *argv, "--input-shape", SHAPE, "-o", tmp_path / "x.pt2")
    assert result.code == 2
    assert "ultralytics is not installed" in result.error_line and "pip install ultralytics" in result.error_line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # lowering yolov8n to XNNPACK takes ~45 s on two cores
def test_convert_checkpoint_to_pte(tmp_path, checkpoint):
    """ExecuTorch (XNNPACK) like any other model; the CLI runs the .pte in ExecuTorch's runtime to verify it."""
    pytest.importorskip("executorch", reason="executorch is not installed (pip install 'reparam[mobile]')")
    result = run_cli("convert", checkpoint, "--input-shape", SHAPE, "--pte", tmp_path / "best.pte")
    assert result.code == 0, result.err
    assert (tmp_path / "best.pte").is_file() and "verified in" in result.out
