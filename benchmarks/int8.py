"""int8 post-training quantization of fused models, without and with cross-layer equalization.

    python benchmarks/int8.py [--digits] [--zoo repvgg_a0,mobileone_s0,timm:repvgg_a0,timm:mobilenetv2_100]
                              [--size 64] [--threads 1] [--out docs/int8_results.md]

1. ``--digits``: the trained ``repvgg_digits`` checkpoint (examples/checkpoints/repvgg_digits.pt) on the
   held-out 20 % of scikit-learn's digits (``examples/train_digits.py``'s split, seed 0): float accuracy, then int8
   accuracy, top-1 agreement with float and output SNR in ONNX Runtime (QDQ) and ExecuTorch (XNNPACK), per-channel
   and per-tensor weights, without and with ``--equalize``.  Calibration: the first 256 training digits.
2. ``--zoo``: models with random weights and non-trivial BatchNorm statistics (:func:`realistic_bn`: γ =
   exp(N(0, 0.5²)), β ~ N(0, 0.3²), running statistics measured on random inputs in train mode, seed 0):
   the worst layer's per-tensor int8 weight SNR (:mod:`reparam.quant`), and the output SNR against the float model
   of weight-only per-tensor int8 fake quantization (float64, no runtime) and of ONNX Runtime QDQ int8 (per-tensor
   and per-channel weights, calibrated on 64 random inputs, measured on 32 others), without / with equalization.
   Random inputs on random weights: this compares the two fused models, it is not an accuracy measurement.

Prints markdown tables (and writes them to ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import reparam  # noqa: E402
import reparam.models as zoo  # noqa: E402
from reparam import calib, int8, quant  # noqa: E402
from reparam.packages import package_version  # noqa: E402


def realistic_bn(model: nn.Module, size: int, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics as training leaves them: γ = exp(N(0, 0.5²)), β ~ N(0, 0.3²), then running
    mean / variance measured on random inputs (two batches of 16 in train mode, cumulative average), so each
    channel's folded scale γ / σ follows its real activation spread and activations stay finite in float32."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        c = m.num_features
        if m.weight is not None:
            m.weight.data.copy_(torch.exp(0.5 * torch.randn(c, generator=g)))
            m.bias.data.copy_(0.3 * torch.randn(c, generator=g))
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, 3, size, size, generator=g))
    return model.eval()


def build(name: str) -> nn.Module:
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False)
    return zoo.create(name)


def weight_only_snr(fused: nn.Module, xs: torch.Tensor) -> float:
    """Output SNR of ``fused`` with every conv / linear weight fake-quantized to int8 per tensor (float64)."""
    ref = copy.deepcopy(fused).double().eval()
    q = copy.deepcopy(ref)
    for m in q.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            m.weight.data = quant.quantize_symmetric(m.weight.data)
    with torch.no_grad():
        return quant.snr_db(ref(xs.double()), q(xs.double()))


def digits_table(tmp: Path) -> list[str]:
    from train_digits import load_digits_split

    train_x, _, test_x, test_y = load_digits_split(0)
    model = zoo.create("repvgg_digits")
    model.load_state_dict(torch.load(ROOT / "examples/checkpoints/repvgg_digits.pt", weights_only=True))
    model.eval()
    with torch.no_grad():
        float_acc = (model(test_x).argmax(1) == test_y).double().mean().item()
    calibration = calib.Calibration(list(train_x[:256].split(1)), "first 256 training digits")
    held_out = list(test_x.split(1))
    rows = [f"| float32 (fused) | – | – | {float_acc:.2%} | – | – |"]
    for equalize in (False, True):
        fused = reparam.fuse(model, (test_x[:2],), equalize=equalize)
        for per_channel in (True, False):
            for runtime, fn, suffix in (
                ("ONNX Runtime (QDQ)", int8.quantize_onnx, "onnx"),
                ("ExecuTorch (XNNPACK)", int8.quantize_pte, "pte"),
            ):
                path = tmp / f"digits_{equalize}_{per_channel}.{suffix}"
                result = fn(fused, calibration, path, per_channel=per_channel, eval_samples=held_out)
                got = _run_file(path, suffix, held_out)
                acc = (got.argmax(1) == test_y).double().mean().item()
                a = result.agreement
                rows.append(
                    f"| int8, {'equalized' if equalize else 'not equalized'} | {runtime} | "
                    f"{result.granularity} | {acc:.2%} | {a.top1:.2%} | {a.snr_db:.1f} |"
                )
    head = [
        "| model | runtime | weights | held-out accuracy (360 digits) | top-1 agreement with float | "
        "output SNR vs float, dB |",
        "|---|---|---|---:|---:|---:|",
    ]
    return head + rows


def _run_file(path: Path, suffix: str, samples: list) -> torch.Tensor:
    """The written file run again in its runtime (independently of the result the export reported)."""
    if suffix == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = torch.cat(samples).numpy()
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x})[0])
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    return torch.cat([method.execute([x.contiguous()])[0] for x in samples])


def zoo_table(names: list[str], size: int, tmp: Path) -> list[str]:
    head = [
        "| model | equalized | layer pairs (refused) | worst layer per-tensor weight SNR, dB | "
        "output SNR, int8 weights only (per-tensor), dB | output SNR, ORT int8 per-tensor, dB | "
        "output SNR, ORT int8 per-channel, dB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    rows = []
    g = torch.Generator().manual_seed(0)
    for name in names:
        torch.manual_seed(0)  # weight init uses the global generator: same weights whatever ran before
        model = realistic_bn(build(name), size)
        x = torch.randn(96, 3, size, size, generator=g)
        calibration = calib.Calibration(list(x[:64].split(1)), "64 random inputs")
        evaluate = list(x[64:].split(1))
        for equalize in (False, True):
            try:
                rows.append(_zoo_row(name, model, equalize, x, calibration, evaluate, tmp))
            except Exception as exc:  # noqa: BLE001  one model's failure is a row (with its reason), not the end
                rows.append(
                    f"| {name} | {'yes' if equalize else 'no'} | failed: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:120]} | | | | |"
                )
            print(rows[-1], file=sys.stderr, flush=True)
    return head + rows


def _zoo_row(
    name: str,
    model: nn.Module,
    equalize: bool,
    x: torch.Tensor,
    calibration: calib.Calibration,
    evaluate: list,
    tmp: Path,
) -> str:
    """One row of the zoo table: ``model`` fused without or with equalization, then measured."""
    fused = reparam.fuse(model, (x[:2],), equalize=equalize)
    worst = min(layer.per_tensor_snr_db for layer in quant.analyze_model(fused).layers)
    eq = fused.reparam_report.equalization
    refused = sum("equalization" in r.reason for r in fused.reparam_report.refusals)
    pairs = f"{eq.links} ({refused})" if eq is not None else "–"
    snrs = [
        int8.quantize_onnx(
            fused, calibration, tmp / f"{name.replace(':', '_')}.onnx", per_channel=pc, eval_samples=evaluate
        ).agreement.snr_db
        for pc in (False, True)
    ]
    return (
        f"| {name} | {'yes' if equalize else 'no'} | {pairs} | {worst:.1f} | "
        f"{weight_only_snr(fused, x[64:]):.1f} | {snrs[0]:.1f} | {snrs[1]:.1f} |"
    )


def versions() -> str:
    import onnxruntime

    parts = [f"torch {torch.__version__}", f"onnxruntime {onnxruntime.__version__}"]
    for package in ("executorch", "timm"):
        version = package_version(package)
        if version is not None:
            parts.append(f"{package} {version}")
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} thread(s), Python {platform.python_version()}; " + ", ".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", action="store_true")
    parser.add_argument("--zoo", default="")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import tempfile

    lines = [
        f"Measured with `python benchmarks/int8.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
        f"({versions()}).",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if args.digits:
            lines += digits_table(Path(tmp)) + [""]
        if args.zoo:
            lines += zoo_table(args.zoo.split(","), args.size, Path(tmp)) + [""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
