"""The first hour with the command line: fast start, output that reads at 80 columns and in a pipe, plain words,
an honest speed figure, --json against its schema, several checkpoints in one call, --device.

The model is the zoo's tiny `repvgg_digits`; helpers and fixtures come from test_cli.
"""

import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import jsonschema
import pytest
import torch
import torch.nn as nn

import reparam
from reparam import catalog, cli, glossary, terminal, timing
from reparam.report import Report, Rewrite

from test_cli import ARCH, ckpt, model, run  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "report-schema.json").read_text())
HEAVY = ("torch", "timm", "torchvision", "onnx", "onnxruntime", "executorch", "coremltools", "reparam.pipeline")
SPEED = re.compile(r"\d+\.\d\d× (faster|slower) \(\d+\.\d\d–\d+\.\d\d×, \d+ runs\)")


def run80(*argv, **patches) -> SimpleNamespace:
    """``reparam *argv`` in-process at 80 columns with stdout a pipe (a StringIO), one quick timing round."""
    out, err = StringIO(), StringIO()
    with (
        mock.patch.dict(os.environ, {"COLUMNS": "80"}),
        redirect_stdout(out),
        redirect_stderr(err),
        mock.patch.multiple(cli, LATENCY_WARMUP=0, LATENCY_REPEATS=3, LATENCY_BUDGET_S=0.05, **patches),
    ):
        code = cli.main([str(a) for a in argv])
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue())


def assert_fits_80(text: str) -> None:
    """No line wider than 80 columns and nothing cut with an ellipsis."""
    for line in text.splitlines():
        assert len(line) <= 80, f"{len(line)} columns: {line!r}"
    assert "…" not in text, text


def validate(doc: dict) -> None:
    jsonschema.validate(doc, SCHEMA)


# ------------------------------------------------------------------------------------------------ fast start


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["explain", "fold_bn"], ["convert", "--help"]])
def test_light_commands_import_no_heavy_module(argv):
    """--help, list and explain import neither torch nor timm/onnx/torchvision/the compiler."""
    code = (
        "import sys\nfrom reparam import cli\ntry:\n    cli.main(%r)\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in %r if m in sys.modules))" % (argv, HEAVY)
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "LOADED []", done.stdout


def test_import_reparam_is_lazy_but_complete():
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, reparam; print('torch' in sys.modules); reparam.fuse; print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.stdout.split() == ["False", "True"], done.stderr
    assert callable(reparam.fuse) and "fuse" in dir(reparam)


def test_catalog_matches_the_zoo():
    """`reparam list` reads a copy of the registry; it must say what the registry says."""
    assert catalog.ARCHITECTURES == catalog.from_registry()


# ------------------------------------------------------------------------------------------------ 80 columns


def test_list_is_plain_text_at_80_columns():
    result = run80("list")
    assert result.code == 0
    assert_fits_80(result.out)
    assert "``" not in result.out and "┃" not in result.out
    assert "(mobileone_s0_unfused.pth.tar keys)" in " ".join(result.out.split())  # wrapped between words only
    for arch in catalog.ARCHITECTURES:
        assert re.search(rf"^  {arch.name} ", result.out, re.M)


def test_wrap_keeps_words_and_paths_whole():
    path = "stages.0.blocks.1.token_mixer.mixer.reparam"
    lines = terminal.wrap(f"see {path} for the reason why it is refused", 50)
    assert lines == ["see stages.0.blocks.1.token_mixer.mixer.reparam", "  for the reason why it is refused"]
    long = "a" * 70
    lines = terminal.wrap(f"wrote {long} (1 kB)", 50)
    assert all(len(line) <= 50 for line in lines) and long in "".join(line.strip() for line in lines)


def _inspect_console(report: Report) -> str:
    out = StringIO()
    with mock.patch.dict(os.environ, {"COLUMNS": "80"}):
        ui = cli.Ui(out=terminal.make_console(out), err=terminal.make_console(StringIO()))
    loaded = SimpleNamespace(
        source="random weights (no checkpoint)", example=torch.zeros(1, 3, 224, 224), arch="timm:fastvit_t8"
    )
    kernels = {"conv": 1, "batch_norm": 2, "add": 3, "linear": 4}
    cli._print_inspect_report(ui, SimpleNamespace(arch="timm:fastvit_t8"), loaded, kernels, report)
    return out.getvalue()


def test_inspect_tables_fold_long_paths_at_80_columns():
    where = "stages.0.blocks.0.mlp.conv.conv"
    report = Report(
        rewrites=[
            Rewrite(
                "stages.2.blocks.3.token_mixer.mixer",
                "add x4, batchnorm x4, 3x3 conv 192->192 groups 192, 1x1 conv 192->192 groups 192",
                "3x3 conv 192->192 groups 192",
                ("merge_parallel",) * 4 + ("fold_bn",) * 4,
            )
        ]
    )
    report.refuse(
        where,
        "the 7x7 conv 48->48 groups 48 after 3x3 conv 48->48 groups 48 pads with zeros, but "
        "3x3 conv 48->48 groups 48 would not produce zeros there",
    )
    text = _inspect_console(report)
    assert_fits_80(text)
    cells = "".join(
        line.split("│")[1].strip()
        for line in text.splitlines()
        if line.startswith("│ stages")
        or (line.startswith("│") and "will not" not in line and line.split("│")[1].strip())
    )
    assert where in cells  # folded across lines, every character kept
    # the legend explains each kind used, once
    for kind in ("merge_parallel", "fold_bn", "zero-padding", "batchnorm", "add"):
        assert len(re.findall(rf"^  {kind}: ", text, re.M)) == 1, kind


def test_inspect_and_quant_at_80_columns_in_a_pipe(ckpt):
    result = run80("inspect", ckpt, "--arch", ARCH, "--quant")
    assert result.code == 0, result.err
    assert_fits_80(result.out)
    lines = result.out.splitlines()
    title = next(i for i, line in enumerate(lines) if "weight quantization of the fused model" in line)
    rule = next(i for i in range(title, len(lines)) if set(lines[i].strip()) == {"─"})
    words = {w for line in lines[title + 1 : rule] if "flagged)" not in line for w in line.split()}
    assert words == {
        "layer",
        "kind",
        "max",
        "|w|",
        "max|w|",
        "/std",
        "channel",
        "spread",
        "SNR",
        "per",
        "tensor",
        "worst",
    }, words  # every header whole, none folded mid-word
    assert "what the words mean" in result.out


def test_convert_report_at_80_columns(ckpt, tmp_path):
    result = run80("convert", ckpt, "--arch", ARCH, "-o", tmp_path / "d.pt2", "--onnx", tmp_path / "d.onnx")
    assert result.code == 0, result.err
    assert_fits_80(result.out)
    assert SPEED.search(" ".join(result.out.split())), result.out
    assert re.search(r"^  fold_bn: a BatchNorm", result.out, re.M) and "merge_parallel: " in result.out  # legend
    # sizes: the checkpoint before, each written file after, never a checkpoint size in an artifact's row
    size = re.compile(r"[\d.]+ k?B")
    checkpoint_row = next(line for line in result.out.splitlines() if "checkpoint file" in line)
    assert len(size.findall(checkpoint_row)) == 1
    for fmt in ("pt2", "onnx"):
        cells = [
            c.strip()
            for c in next(line for line in result.out.splitlines() if f"file size (.{fmt})" in line).split("│")
        ]
        assert cells[2] == "" and size.fullmatch(cells[3]), cells
    # per-step times in the progress display
    assert re.search(r"✓ Timing original vs fused .*\(\d+\.\ds\)", result.err)


# ------------------------------------------------------------------------------------------------ speed


def test_no_bench_skips_the_timing(ckpt, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("timed under --no-bench")

    with mock.patch.object(timing, "compare", refuse):
        result = run80("convert", ckpt, "--arch", ARCH, "-o", tmp_path / "d.pt2", "--no-bench")
    assert result.code == 0, result.err
    assert "speed:" not in result.out and "latency" not in result.out and "Timing" not in result.err


def test_speed_figure_uses_one_thread_and_interleaves():
    seen = []

    class Probe(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            seen.append((self.name, torch.get_num_threads()))
            return x

    threads = torch.get_num_threads()
    figure = timing.compare(Probe("a"), Probe("b"), torch.zeros(1), rounds=5, warmup=1, budget_s=0.0)
    assert torch.get_num_threads() == threads  # restored
    timed = seen[4:]  # after the sizing pass and the warm-up round
    assert {t for _, t in timed} == {1}
    assert [n for n, _ in timed] == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]  # alternating order
    assert figure.runs == 5 and figure.low <= figure.ratio <= figure.high
    assert SPEED.fullmatch(figure.text())


def test_wide_spread_is_flagged():
    figure = timing.SpeedFigure(
        ratio=5.45, low=1.93, high=17.74, runs=9, passes=1, threads=1, device="cpu", before_ms=10, after_ms=2, load=7.5
    )
    assert not figure.trustworthy and "load average 7.5" in figure.warning()
    steady = timing.SpeedFigure(
        ratio=5.2, low=4.9, high=5.6, runs=9, passes=1, threads=1, device="cpu", before_ms=10, after_ms=2, load=None
    )
    assert steady.trustworthy and steady.warning() is None
    assert steady.text() == "5.20× faster (4.90–5.60×, 9 runs)"


# ------------------------------------------------------------------------------------------------ plain words


class _Placeholders(nn.Module):
    """A conv + BN block whose optional parts are nn.Identity placeholders, and a no-op last stage."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.se, self.act_drop = (
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.Identity(),
            nn.Dropout(0.1),
        )
        self.final_conv = nn.Identity()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.final_conv(self.act_drop(self.se(self.bn(self.conv(x)))))))


class _Refused(nn.Module):
    """A biased 3x3 then a zero-padded 7x7 depthwise conv (each with BN): their composition is refused."""

    def __init__(self):
        super().__init__()
        self.mixer = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8))
        self.mlp = nn.Module()
        self.mlp.conv = nn.Sequential()
        self.mlp.conv.conv, self.mlp.conv.bn = nn.Conv2d(8, 8, 7, padding=3, groups=8, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.mlp.conv.bn(self.mlp.conv.conv(self.mixer(x))))


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    return model.eval()


def test_placeholders_are_not_branches_and_no_ops_are_not_rewrites():
    torch.manual_seed(0)
    report = reparam.explain(_randomise_bn(_Placeholders()), (torch.randn(1, 3, 8, 8),))
    assert report.rewrites, report
    for rewrite in report.rewrites:
        assert "identity" not in rewrite.before, rewrite
        assert rewrite.events or rewrite.before != rewrite.after, rewrite  # something was merged or folded
    (rewrite,) = report.rewrites  # conv + BN folded; the placeholders are neither branches nor rewrites
    assert rewrite.events == ("fold_bn",) and rewrite.before == "batchnorm, 3x3 conv 3->8", rewrite


def test_each_refused_site_is_listed_once():
    torch.manual_seed(0)
    report = reparam.explain(_randomise_bn(_Refused()), (torch.randn(1, 8, 16, 16),))
    reasons = [r.reason for r in report.refusals]
    assert reasons and len(reasons) == len(set(reasons)), report.refusals
    assert not any(r.where.endswith(".reparam") for r in report.refusals), report.refusals


def test_explain_kind():
    result = run80("explain", "shift")
    assert result.code == 0 and "shift (op): a constant added" in " ".join(result.out.split())
    everything = run80("explain")
    assert everything.code == 0
    for kind in glossary.GLOSSARY:
        assert f"  {kind}: " in everything.out
    assert_fits_80(everything.out)
    unknown = run80("explain", "frobnicate")
    assert unknown.code == 2 and "unknown kind 'frobnicate'" in unknown.err


def test_every_event_kind_is_in_the_glossary():
    """Each rewrite kind a pass can record has an explanation."""
    names = set()
    for path in (ROOT / "reparam" / "passes").glob("*.py"):
        names.update(re.findall(r'"(fold_bn|merge_\w+|compose|skip|remove_residual)"', path.read_text()))
    from reparam.passes import collapse

    names.update(collapse._EVENT.values())
    assert names and all(glossary.lookup(name) for name in names), names - set(glossary.GLOSSARY)


# ------------------------------------------------------------------------------------------------ --json


def test_convert_json_follows_the_schema(ckpt, tmp_path):
    result = run80("convert", ckpt, "--arch", ARCH, "-o", tmp_path / "d.pt2", "--json", tmp_path / "r.json")
    assert result.code == 0, result.err
    doc = json.loads((tmp_path / "r.json").read_text())
    validate(doc)
    (entry,) = doc["results"]
    assert entry["status"] == "ok" and entry["report"]["counts"]["fold_bn"] == 12
    assert entry["outputs"][0]["size"] == (tmp_path / "d.pt2").stat().st_size
    assert entry["checkpoint_size"] == ckpt.stat().st_size
    assert entry["speed"]["runs"] == 3 and entry["speed"]["threads"] == 1
    assert {s["name"] for s in entry["steps"]} >= {"Fusing", "Writing and verifying d.pt2"}
    assert entry["errors"]["fused"] < 1e-4 and entry["errors"][".pt2 reloaded"] < 1e-4


def test_report_to_dict_follows_the_schema(model):
    report = reparam.explain(model, (torch.randn(1, 1, 8, 8),))
    report.notes.append("a note")
    jsonschema.validate(report.to_dict(), {"$defs": SCHEMA["$defs"], "$ref": "#/$defs/report"})
    assert json.loads(report.to_json())["rewrites"][0]["events"]


def test_failed_convert_still_writes_json(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("garbage")
    result = run80("convert", bad, "--arch", ARCH, "-o", tmp_path / "d.pt2", "--json", tmp_path / "r.json")
    assert result.code == 2
    doc = json.loads((tmp_path / "r.json").read_text())
    validate(doc)
    assert doc["exit_code"] == 2 and doc["results"][0]["status"] == "failed"
    assert "cannot read" in doc["results"][0]["error"]


def test_inspect_json_to_stdout(ckpt):
    result = run80("inspect", ckpt, "--arch", ARCH, "--json", "-")
    assert result.code == 0, result.err
    doc = json.loads(result.out)  # stdout is the document alone; the report went to stderr
    validate(doc)
    assert "will merge" in result.err
    assert doc["command"] == "inspect" and doc["results"][0]["report"]["rewrites"]


# ------------------------------------------------------------------------------------------------ batches


def test_batch_continues_past_a_corrupt_file(ckpt, tmp_path):
    good2 = tmp_path / "second.pth"
    good2.write_bytes(ckpt.read_bytes())
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    out = tmp_path / "out"
    out.mkdir()
    result = run80(
        "convert",
        ckpt,
        bad,
        good2,
        "--arch",
        ARCH,
        "--out-dir",
        out,
        "--formats",
        "pt2,onnx",
        "--json",
        out / "r.json",
        "--no-bench",
    )
    assert result.code == 2, result.err
    assert sorted(p.name for p in out.iterdir()) == [
        "digits_deploy.onnx",
        "digits_deploy.pt2",
        "r.json",
        "second_deploy.onnx",
        "second_deploy.pt2",
    ]
    assert_fits_80(result.out)
    assert "converted 2 of 3 checkpoints" in result.out and "failed (2)" in result.out
    doc = json.loads((out / "r.json").read_text())
    validate(doc)
    assert [r["status"] for r in doc["results"]] == ["ok", "failed", "ok"]


def test_several_checkpoints_need_out_dir(ckpt, tmp_path):
    result = run80("convert", ckpt, ckpt, "--arch", ARCH)
    assert result.code == 2 and "Add --out-dir DIR" in result.err
    result = run80("convert", ckpt, "--arch", ARCH, "--out-dir", tmp_path, "-o", tmp_path / "x.pt2")
    assert result.code == 2 and "--formats" in result.err


# ------------------------------------------------------------------------------------------------ --device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_usage_error(ckpt, tmp_path):
    result = run80("convert", ckpt, "--arch", ARCH, "-o", tmp_path / "d.pt2", "--device", "cuda")
    assert result.code == 2
    assert "--device cuda: CUDA is not available on this machine" in result.err and "Use --device cpu" in result.err
    assert not (tmp_path / "d.pt2").exists()


def test_bad_device_name(ckpt):
    result = run80("convert", ckpt, "--arch", ARCH, "--device", "gpu0")
    assert result.code == 2 and "invalid device 'gpu0'" in result.err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_convert_on_cuda(ckpt, tmp_path):
    result = run80(
        "convert", ckpt, "--arch", ARCH, "-o", tmp_path / "d.pt2", "--device", "cuda:0", "--json", tmp_path / "r.json"
    )
    assert result.code == 0, result.err
    entry = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert entry["device"] == "cuda:0" and entry["speed"]["device"].startswith("cuda")
    program = torch.export.load(tmp_path / "d.pt2").module()
    assert next(program.parameters()).is_cuda
