"""How well a (fused) model's weights survive int8 quantization: per-layer ranges, outliers and quantization SNR.

Structural re-parameterization changes the weight distribution a quantizer sees.  Folding a BatchNorm scales each
output channel by ``gamma / sqrt(var + eps)``; summing a 3×3, a 1×1 and an identity branch concentrates mass at the
kernel centre; a BN whose running variance is tiny makes one channel's weights huge.  The training-time model
quantizes fine, the fused one may not (Chu et al., *Make RepVGG Greater Again: A Quantization-aware Approach*,
2022).  This module measures it on the weights alone — pure tensor math, no data, no quantization library.

Definitions (``w`` a layer's weight, ``C`` its output channels, i.e. ``w.shape[0]``; for a grouped conv still
the output channels):

- **symmetric int8 quantization** with ``b`` bits (default 8): ``scale = max|w| / (2^(b-1) − 1)``,
  ``q(w) = clamp(round(w / scale), −(2^(b-1) − 1), 2^(b-1) − 1) · scale`` (the restricted range [−127, 127],
  as PyTorch's, TensorRT's and XNNPACK's symmetric weight quantizers use).  *Per-tensor*: one scale for ``w``;
  *per-channel*: one scale per output channel (``max`` over that channel's weights).
- **SNR** (signal-to-quantization-noise ratio, dB) = ``10 · log10(Σ w² / Σ (w − q(w))²)``; ``inf`` when
  quantization is exact.  Uniform rounding noise has variance ``scale² / 12``, so for a weight tensor whose
  ``max|w| / std(w)`` is ``r`` the per-tensor SNR is about ``10 · log10(12 · 127²) − 20 · log10(r) ≈ 52.9 − 20 ·
  log10(r)`` dB: every doubling of the outlier ratio costs 6 dB, and 30 dB (noise at 3 % of the signal's RMS) is
  reached at ``r ≈ 14``.
- **worst-channel SNR**: the SNR of the output channel that fares worst, each channel ``w_c`` measured on its own
  (``10 · log10(Σ w_c² / Σ (w_c − q(w)_c)²)``).  The whole-tensor SNR weighs channels by their power, so one large
  channel hides small ones that a shared scale rounds to zero; every output channel is a feature the next layer
  needs, whatever its magnitude (the next BatchNorm-folded conv may scale it up again).
- **outlier ratio** = ``max|w| / std(w)``: 3–5 for a well-behaved Gaussian-like tensor of a few thousand weights.
- **channel spread** = ``max_c max|w_c| / median_c max|w_c|``: how much larger the widest output channel's range
  is than a typical channel's.  A large spread is what per-channel quantization fixes.

A layer is *flagged* when quantizing it per tensor will visibly hurt: per-tensor SNR below
:data:`SNR_THRESHOLD_DB` (30 dB), worst-channel SNR (per-tensor scale) below :data:`CHANNEL_SNR_THRESHOLD_DB`
(20 dB: a channel's noise at 10 % of its RMS), or outlier ratio above :data:`OUTLIER_THRESHOLD` (20).  Each flagged
layer gets an ``advice``: ``"per-channel"`` when per-channel scales bring both SNRs above their thresholds,
``"keep in higher precision"`` when even per-channel does not (the outliers live inside channels; clip them or
leave the layer in float16 / float32).  ``docs/quantization.md`` explains the remedies.

Public API: :func:`quantize_symmetric`, :func:`snr_db`, :func:`analyze_weight`, :func:`analyze_model`
(returning :class:`LayerQuant` / :class:`QuantReport`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "SNR_THRESHOLD_DB",
    "CHANNEL_SNR_THRESHOLD_DB",
    "OUTLIER_THRESHOLD",
    "LayerQuant",
    "QuantReport",
    "quantize_symmetric",
    "snr_db",
    "analyze_weight",
    "analyze_model",
]

#: Per-tensor int8 SNR (dB) below which a layer is flagged: quantization noise above ~3 % of the weights' RMS.
SNR_THRESHOLD_DB = 30.0
#: Worst single-output-channel SNR (dB) below which a layer is flagged: that channel's noise above 10 % of its RMS.
CHANNEL_SNR_THRESHOLD_DB = 20.0
#: ``max|w| / std(w)`` above which a layer is flagged (per-tensor SNR ≈ 27 dB at this ratio).
OUTLIER_THRESHOLD = 20.0

_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def quantize_symmetric(weight: torch.Tensor, bits: int = 8, per_channel: bool = False, axis: int = 0) -> torch.Tensor:
    """Symmetric uniform quantization of ``weight`` to ``bits`` bits and back (fake quantization), in float64.

    ``per_channel=False``: one scale ``max|w| / (2^(bits-1) − 1)`` for the whole tensor; ``True``: one scale per
    slice along ``axis`` (the output channels for conv / linear weights).  A slice (or tensor) of zeros stays zero.
    """
    if bits < 2:
        raise ValueError(f"bits must be at least 2, got {bits}")
    w = weight.detach().to(torch.float64)
    levels = 2 ** (bits - 1) - 1
    if per_channel and w.ndim > 0:
        reduce = [d for d in range(w.ndim) if d != axis % w.ndim]
        absmax = w.abs().amax(dim=reduce, keepdim=True) if reduce else w.abs()
    else:
        absmax = w.abs().max()
    scale = absmax / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(w / safe), -levels, levels) * safe * (scale > 0)


def snr_db(signal: torch.Tensor, approximation: torch.Tensor) -> float:
    """``10 · log10(Σ signal² / Σ (signal − approximation)²)`` in dB, computed in float64.

    ``inf`` when the approximation is exact (including an all-zero signal reproduced exactly); ``-inf`` when the
    signal is all zeros but the approximation is not.
    """
    s = signal.detach().to(torch.float64)
    noise = float((s - approximation.detach().to(torch.float64)).pow(2).sum())
    power = float(s.pow(2).sum())
    if noise == 0.0:
        return math.inf
    if power == 0.0:
        return -math.inf
    return 10.0 * math.log10(power / noise)


@dataclass
class LayerQuant:
    """Weight statistics and int8 quantization error of one conv / linear layer (see the module docstring)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    w_min: float
    w_max: float
    std: float
    outlier_ratio: float
    channel_spread: float
    per_tensor_snr_db: float
    per_channel_snr_db: float
    per_tensor_worst_channel_snr_db: float
    per_channel_worst_channel_snr_db: float
    flags: list[str] = field(default_factory=list)
    snr_threshold_db: float = SNR_THRESHOLD_DB
    channel_snr_threshold_db: float = CHANNEL_SNR_THRESHOLD_DB

    @property
    def flagged(self) -> bool:
        """True when int8 per-tensor quantization of this layer is expected to hurt."""
        return bool(self.flags)

    @property
    def advice(self) -> str:
        """``""`` (fine), ``"per-channel"`` or ``"keep in higher precision"``."""
        if not self.flags:
            return ""
        if (
            self.per_channel_snr_db >= self.snr_threshold_db
            and self.per_channel_worst_channel_snr_db >= self.channel_snr_threshold_db
        ):
            return "per-channel"
        return "keep in higher precision"


@dataclass
class QuantReport:
    """Per-layer :class:`LayerQuant` rows of a model, in module order, and the thresholds used."""

    layers: list[LayerQuant]
    bits: int = 8
    snr_threshold_db: float = SNR_THRESHOLD_DB
    channel_snr_threshold_db: float = CHANNEL_SNR_THRESHOLD_DB
    outlier_threshold: float = OUTLIER_THRESHOLD

    @property
    def flagged(self) -> list[LayerQuant]:
        """The layers that per-tensor int8 quantization will hurt."""
        return [layer for layer in self.layers if layer.flagged]

    def worst(self, n: int = 5) -> list[LayerQuant]:
        """The ``n`` layers with the lowest per-tensor SNR."""
        return sorted(self.layers, key=lambda layer: layer.per_tensor_snr_db)[:n]


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    kernel = "×".join(str(k) for k in module.kernel_size)
    extra = f" g{module.groups}" if module.groups != 1 else ""
    transposed = "transposed " if isinstance(module, nn.modules.conv._ConvTransposeNd) else ""
    return f"{transposed}conv {kernel}{extra}"


def _worst_channel_snr_db(w: torch.Tensor, q: torch.Tensor, axis: int) -> float:
    """The lowest per-output-channel SNR (dB) of ``q`` approximating ``w`` (channels along ``axis``)."""
    if w.ndim < 2:
        return snr_db(w, q)
    w, q = w.movedim(axis, 0).flatten(1), q.movedim(axis, 0).flatten(1)
    return min(snr_db(wc, qc) for wc, qc in zip(w, q, strict=True))


def analyze_weight(
    weight: torch.Tensor,
    name: str = "",
    kind: str = "",
    *,
    bits: int = 8,
    channel_axis: int = 0,
    snr_threshold_db: float = SNR_THRESHOLD_DB,
    channel_snr_threshold_db: float = CHANNEL_SNR_THRESHOLD_DB,
    outlier_threshold: float = OUTLIER_THRESHOLD,
) -> LayerQuant:
    """Statistics and per-tensor / per-channel symmetric quantization SNR of one weight tensor.

    ``channel_axis`` is the output-channel axis (0 for ``Conv*d`` and ``Linear``, 1 for ``ConvTranspose*d``).
    """
    w = weight.detach().to(torch.float64)
    if w.numel() == 0:
        raise ValueError(f"{name or 'weight'} is empty")
    absmax = float(w.abs().max())
    std = float(w.std(unbiased=False)) if w.numel() > 1 else 0.0
    outlier = absmax / std if std > 0 else (math.inf if absmax > 0 else 1.0)
    reduce = [d for d in range(w.ndim) if d != channel_axis % max(w.ndim, 1)]
    per_channel_max = w.abs().amax(dim=reduce) if reduce and w.ndim > 1 else w.abs().reshape(-1)
    median = float(per_channel_max.median())
    spread = float(per_channel_max.max()) / median if median > 0 else (math.inf if absmax > 0 else 1.0)
    q_tensor = quantize_symmetric(w, bits)
    q_channel = quantize_symmetric(w, bits, per_channel=True, axis=channel_axis)
    per_tensor, per_channel = snr_db(w, q_tensor), snr_db(w, q_channel)
    worst_tensor = _worst_channel_snr_db(w, q_tensor, channel_axis)
    worst_channel = _worst_channel_snr_db(w, q_channel, channel_axis)
    flags = []
    if per_tensor < snr_threshold_db:
        flags.append(f"per-tensor SNR {per_tensor:.1f} dB < {snr_threshold_db:g} dB")
    if worst_tensor < channel_snr_threshold_db:
        flags.append(f"worst channel SNR {worst_tensor:.1f} dB < {channel_snr_threshold_db:g} dB")
    if outlier > outlier_threshold:
        flags.append(f"max|w|/std {outlier:.1f} > {outlier_threshold:g}")
    return LayerQuant(
        name=name,
        kind=kind,
        shape=tuple(w.shape),
        w_min=float(w.min()),
        w_max=float(w.max()),
        std=std,
        outlier_ratio=outlier,
        channel_spread=spread,
        per_tensor_snr_db=per_tensor,
        per_channel_snr_db=per_channel,
        per_tensor_worst_channel_snr_db=worst_tensor,
        per_channel_worst_channel_snr_db=worst_channel,
        flags=flags,
        snr_threshold_db=snr_threshold_db,
        channel_snr_threshold_db=channel_snr_threshold_db,
    )


def analyze_model(
    model: nn.Module,
    *,
    bits: int = 8,
    snr_threshold_db: float = SNR_THRESHOLD_DB,
    channel_snr_threshold_db: float = CHANNEL_SNR_THRESHOLD_DB,
    outlier_threshold: float = OUTLIER_THRESHOLD,
) -> QuantReport:
    """:func:`analyze_weight` for every conv / linear layer of ``model`` (each shared module once).

    Run it on the *fused* model (``reparam.fuse(model)``): that is the model a quantizer sees.  Other
    floating-point parameters (biases, channel scales) are not analysed: int8 deployments keep biases in int32
    and channel-wise ops in higher precision.
    """
    layers = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, _LAYER_TYPES) or id(module) in seen:
            continue
        seen.add(id(module))
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.numel() == 0:
            continue
        axis = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
        layers.append(
            analyze_weight(
                weight,
                name or "(model)",
                _kind(module),
                bits=bits,
                channel_axis=axis,
                snr_threshold_db=snr_threshold_db,
                channel_snr_threshold_db=channel_snr_threshold_db,
                outlier_threshold=outlier_threshold,
            )
        )
    return QuantReport(layers, bits, snr_threshold_db, channel_snr_threshold_db, outlier_threshold)
