"""reparam.export: verified .pt2 / .onnx files."""

import copy
import os
import subprocess
import sys
import textwrap

import onnx
import onnxruntime
import pytest
import torch
import torch.nn as nn

import reparam
import reparam.models as zoo
from reparam import export
from reparam import errors
from reparam.errors import EquivalenceError, InputError


@pytest.fixture(scope="module")
def digits():
    """A tiny zoo model, its fused form and an example input."""
    torch.manual_seed(0)
    model = zoo.create("repvgg_digits").eval()
    x = torch.randn(1, 1, 8, 8)
    return model, reparam.fuse(model, (x,)), x


@pytest.fixture(scope="module")
def program(digits):
    _, fused, x = digits
    return export.export_program(fused, x)


def perturbed(model):
    """A copy of ``model`` whose outputs are clearly different."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    return other


def test_export_program_has_a_dynamic_batch(program, digits):
    _, fused, _ = digits
    assert program.range_constraints  # batch is symbolic even though the example has batch 1
    out = program.module()(torch.randn(5, 1, 8, 8))
    assert out.shape == (5, 10)


def test_export_program_falls_back_to_a_static_batch():
    class FixedBatch(nn.Module):
        def forward(self, x):
            return x.view(1, 3) * 2  # only valid for batch 1

    program = export.export_program(FixedBatch(), torch.randn(1, 3))
    assert not program.range_constraints


def test_export_pt2_loads_without_reparam(tmp_path, digits, program):
    model, fused, x = digits
    result = export.export_pt2(fused, x, tmp_path / "m.pt2", original=model, program=program)
    assert result.path == tmp_path / "m.pt2" and result.format == "pt2" and result.dynamic_batch
    assert result.size == (tmp_path / "m.pt2").stat().st_size
    assert set(result.errors) == {"fused", "original"} and result.max_error <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]

    batch = torch.randn(3, 1, 8, 8)
    torch.save({"x": batch, "y": model(batch).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["reparam"] = None  # any import of reparam now fails
        import torch
        program = torch.export.load({str(tmp_path / "m.pt2")!r})
        data = torch.load({str(tmp_path / "io.pt")!r})
        y = program.module()(data["x"])
        err = ((y - data["y"]).norm() / data["y"].norm()).item()
        assert err < 1e-4, err
        assert not any(name == "reparam" or name.startswith("reparam.") for name in sys.modules if sys.modules[name])
        print("ok")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_export_pt2_mismatch_leaves_no_file(tmp_path, digits, program):
    model, fused, x = digits
    with pytest.raises(errors.ExportMismatchError, match="original model") as info:
        export.export_pt2(fused, x, tmp_path / "m.pt2", original=perturbed(model), program=program)
    assert isinstance(info.value, EquivalenceError)
    assert list(tmp_path.iterdir()) == []
    result = export.export_pt2(fused, x, tmp_path / "m.pt2", original=perturbed(model), program=program, check=False)
    assert result.errors["original"] > 1e-4 and result.errors["fused"] <= 1e-6
    assert (tmp_path / "m.pt2").exists()


def test_export_pt2_refuses_reparam_ops(tmp_path):
    @torch.library.custom_op("reparam::_test_only_double", mutates_args=())
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @double.register_fake
    def _(x):
        return torch.empty_like(x)

    class UsesReparamOp(nn.Module):
        def forward(self, x):
            return double(x)

    with pytest.raises(errors.ExportError, match="would not load without reparam"):
        export.export_pt2(UsesReparamOp(), torch.randn(2, 3), tmp_path / "m.pt2")
    assert list(tmp_path.iterdir()) == []


def test_export_onnx_verified_in_onnx_runtime(tmp_path, digits, program):
    model, fused, x = digits
    result = export.export_onnx(fused, x, tmp_path / "m.onnx", original=model, program=program)
    assert result.format == "onnx" and result.opset >= 17 and result.dynamic_batch
    assert result.max_error <= 1e-4
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["output"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    batch = torch.randn(4, 1, 8, 8)
    (y,) = session.run(None, {"input": batch.numpy()})
    expected = model(batch).detach()
    assert (torch.from_numpy(y) - expected).norm() / expected.norm() < 1e-4


def test_export_onnx_mismatch_and_opset(tmp_path, digits, program):
    model, fused, x = digits
    with pytest.raises(errors.ExportMismatchError, match="ONNX"):
        export.export_onnx(fused, x, tmp_path / "m.onnx", original=perturbed(model), program=program)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="opset 16 is too old"):
        export.export_onnx(fused, x, tmp_path / "m.onnx", opset=16)


def test_default_tolerance():
    assert export.default_tolerance(torch.float32) == 1e-4
    assert export.default_tolerance(torch.float16) > 1e-4 > export.default_tolerance(torch.float64)
