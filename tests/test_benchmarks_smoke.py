"""Smoke tests of the benchmark scripts: each runs in a tiny mode so it cannot rot.

Nothing here asserts on a timing: only that the scripts run, print their tables and write their JSON and PNG
(matplotlib, timm and onnxruntime come with `pip install -e '.[test]'`: a missing one fails, it is not skipped).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


def assert_png(path: Path) -> None:
    """``path`` is a PNG image with something drawn in it (not an empty canvas)."""
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000, (path, len(data))


@pytest.fixture(autouse=True)
def _keep_threads():
    """The scripts set torch's thread count (``--threads``, default 1); give the rest of the session its own back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_compile_time_tiny(tmp_path, capsys):
    compile_time = _load("compile_time")
    out = tmp_path / "ct.json"
    argv = [
        "--no-timm",
        "--chains",
        "2",
        "4",
        "--channels",
        "4",
        "--hw",
        "4",
        "--reps",
        "2",
        "--quiet",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "ct.png"),
    ]
    assert compile_time.main(argv) == 0
    text = capsys.readouterr().out
    assert "| blocks | fuse (s)" in text and "| 4 |" in text
    data = json.loads(out.read_text())
    assert [r["blocks"] for r in data["chains"]] == [2, 4]
    assert set(data["chains"][0]["phases"]) == set(compile_time.PHASES)
    assert all(len(r["runs"]) == 2 for r in data["chains"])
    assert_png(tmp_path / "ct.png")


def test_compile_time_phase_timer_restores_reparam():
    """The phase timer wraps reparam's functions only inside its ``with`` block."""
    compile_time = _load("compile_time")
    import reparam.pipeline as pipeline
    import reparam.trace as trace

    before = (trace.symbolic_trace, trace.propagate_shapes, pipeline.check_fused)
    with compile_time.PhaseTimer().installed():
        assert trace.symbolic_trace is not before[0]
    assert (trace.symbolic_trace, trace.propagate_shapes, pipeline.check_fused) == before


def test_latency_tiny(tmp_path, capsys):
    latency = _load("latency")
    out = tmp_path / "lat.json"
    variants = "train,fused,fused_flat,deploy,fx_fuse,ort_fused"
    argv = [
        "--models",
        "repghostnet_050",
        "--size",
        "32",
        "--reps",
        "2",
        "--warmup",
        "1",
        "--quiet",
        "--variants",
        variants,
        "--explain",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "lat.png"),
    ]
    assert latency.main(argv) == 0
    text = capsys.readouterr().out
    assert "#### Batch 1: median latency (ms)" in text and "repghostnet_050" in text
    assert "fused/deploy" in text and "What runs" in text and "what differs" in text
    data = json.loads(out.read_text())
    (result,) = data["results"]
    for v in variants.split(","):
        assert len(result["times_ms"][v]) == 2, (v, result["skipped"])
        assert result["errors"].get(v, 0.0) < 1e-3, v
    assert result["kernels"]["fused"]["batch_norm"] == 0
    assert_png(tmp_path / "lat.png")
    # re-rendering from the JSON measures nothing and prints the same table
    assert latency.main(["--from-json", str(out), "--quiet"]) == 0
    assert "repghostnet_050" in capsys.readouterr().out


def test_deploy_coverage_rewrites_its_section(tmp_path, capsys):
    """One smp case into a file's deploy section; coverage.py keeps that section when it rewrites the file."""
    pytest.importorskip("segmentation_models_pytorch")
    deploy = _load("deploy_coverage")
    doc = tmp_path / "coverage.md"
    doc.write_text(f"# timm table\n\n{deploy.START}\nSTALE ROWS\n{deploy.END}\n")
    deploy.main(["smp:Unet", "--out", str(doc)])
    text = doc.read_text()
    assert "STALE ROWS" not in text and "| smp:Unet | segmentation_models_pytorch |" in text
    assert text.startswith("# timm table") and "## Detection and segmentation models" in text
    assert _load("coverage").marked_sections(str(doc)) == [
        text[text.index(deploy.START) : text.index(deploy.END) + len(deploy.END)]
    ]


def test_latency_timm_deploy_rewrites_its_section(tmp_path, capsys):
    """``--timm-deploy --out``: the judged table replaces the marked section of a doc, the rest of it stays."""
    latency = _load("latency")
    start, end = latency._markers("timm-deploy")
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nkept above\n\n{start}\nSTALE ROWS\n{end}\n\nkept below\n")
    argv = [
        "--timm-deploy",
        "--models",
        "repghostnet_050",
        "--size",
        "32",
        "--reps",
        "2",
        "--warmup",
        "1",
        "--quiet",
        "--out",
        str(doc),
    ]
    assert latency.main(argv) == 0
    assert "| repghostnet_050 |" in capsys.readouterr().out
    text = doc.read_text()
    assert "STALE ROWS" not in text and "kept above" in text and "kept below" in text
    section = text[text.index(start) : text.index(end)]
    assert "| repghostnet_050 |" in section and "geometric mean" in section
    assert "python benchmarks/latency.py --timm-deploy" in section and "Measured on" in section


def test_fuse_time_tiny(tmp_path, capsys):
    fuse_time = _load("fuse_time")
    out = tmp_path / "ft.json"
    assert fuse_time.main(["--models", "repghostnet_050", "--quiet", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| repghostnet_050 |" in text and "median" in text and "within 1 s" in text
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "ok" and row["input"] == "224x224" and set(fuse_time.PHASES) <= set(row["phases"])
    assert row["checked"] == "crop 64"  # report.verified_on, short: centre crops of 64x64
    assert fuse_time.checked_on("the inputs in float32, bit for bit (nothing was rewritten)") == "bits, inputs"
    doc = tmp_path / "doc.md"
    doc.write_text("# kept\n")
    assert fuse_time.main(["--from-json", str(out), "--out", str(doc), "--section", "fuse-time-broad"]) == 0
    assert "| repghostnet_050 |" in capsys.readouterr().out  # re-rendered, nothing measured
    text = doc.read_text()
    assert text.startswith("# kept") and "section fuse-time-broad" in text and "| repghostnet_050 |" in text


def test_fuse_time_distribution():
    fuse_time = _load("fuse_time")
    rows = [
        {"model": f"m{i}", "status": "ok", "params": 1e6, "group": "sample", "seconds": s, "cpu_s": s}
        for i, s in enumerate([0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99, 1.0, 3.0, 6.0])
    ]
    d = fuse_time.distribution(rows)
    assert d["n"] == 10 and d["p90"] == 3.0 and d["max"] == 6.0 and d["slowest"] == "m9"
    assert d["within_target"] == 0.8 and d["over_limit"] == 1
    assert fuse_time.distribution(rows, max_params=1e5) is None
