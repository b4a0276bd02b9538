"""Calibration inputs for post-training int8 quantization: a folder of images, a ``.npy`` tensor, or random.

- **images** (``--calib DIR``): every ``.png`` / ``.jpg`` / ``.jpeg`` / ``.bmp`` / ``.webp`` / ``.tif`` file under
  DIR, sorted by path; each is converted to RGB (3 input channels) or grayscale (1), resized so that its shorter
  side is ``size / crop_pct`` (bilinear) and centre-cropped to ``size`` (timm's eval transform), scaled to [0, 1]
  and normalized with ``(x - mean) / std``.  ``mean`` / ``std`` / ``input_size`` / ``crop_pct`` come from the
  model's timm ``pretrained_cfg`` where it has one, from the caller (``--mean`` / ``--std`` / ``--input-size``)
  otherwise; without either the pixels stay in [0, 1] and a warning says so.
- **a tensor** (``--calib FILE.npy``): an array of shape ``(N, C, H, W)`` (or ``(C, H, W)`` for one sample),
  already preprocessed as the model expects; used as is (cast to float32).
- **random** (``--calib-random N``): ``N`` standard-normal inputs of the example shape.  A smoke test of the
  int8 pipeline, not an accuracy measurement: the warning says so.

Fewer than :data:`MIN_SAMPLES` samples draws a warning (activation ranges estimated from a handful of inputs
clip real data).  Public API: :class:`Calibration`, :func:`from_images`, :func:`from_npy`, :func:`from_random`,
:func:`preprocessing`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .errors import InputError

__all__ = [
    "MIN_SAMPLES",
    "IMAGE_SUFFIXES",
    "Calibration",
    "Preprocessing",
    "preprocessing",
    "from_images",
    "from_npy",
    "from_random",
]

#: Fewer calibration samples than this draws a warning.
MIN_SAMPLES = 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
RANDOM_WARNING = (
    "random calibration inputs: smoke test, not an accuracy measurement (random inputs do not have "
    "the activation ranges of real data)"
)


@dataclass
class Calibration:
    """Calibration samples, each of shape ``(1, C, H, W)``, where they came from, and warnings about them."""

    samples: list[torch.Tensor]
    source: str
    random: bool = False
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.samples:
            raise InputError(
                f"no calibration samples in {self.source}. Give images, a non-empty .npy array, or --calib-random N"
            )
        if self.random:
            self.warnings.append(RANDOM_WARNING)
        if len(self.samples) < MIN_SAMPLES:
            self.warnings.append(
                f"only {len(self.samples)} calibration samples (< {MIN_SAMPLES}): activation "
                "ranges may not cover real data; use a few hundred representative inputs"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample, ``(1, C, H, W)``."""
        return tuple(self.samples[0].shape)


@dataclass(frozen=True)
class Preprocessing:
    """How images become model inputs: ``(x / 255 - mean) / std`` after resize + centre crop to ``size``."""

    size: tuple[int, int]
    mean: Optional[tuple[float, ...]]
    std: Optional[tuple[float, ...]]
    crop_pct: float = 0.875


def preprocessing(
    model: nn.Module,
    example_shape: Sequence[int],
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    input_size: Optional[Sequence[int]] = None,
) -> Preprocessing:
    """The given ``mean`` / ``std`` / ``input_size``, else the model's timm ``pretrained_cfg`` values, else the
    example input's size and no normalization."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = (
        tuple(input_size)
        if input_size
        else (tuple(cfg["input_size"][-2:]) if "input_size" in cfg else tuple(example_shape[-2:]))
    )
    if len(size) == 1:
        size = (size[0], size[0])
    return Preprocessing(
        size=(int(size[0]), int(size[1])),
        mean=tuple(mean) if mean else (tuple(cfg["mean"]) if "mean" in cfg else None),
        std=tuple(std) if std else (tuple(cfg["std"]) if "std" in cfg else None),
        crop_pct=float(cfg.get("crop_pct", 0.875) or 0.875),
    )


def _image_tensor(path: Path, channels: int, prep: Preprocessing) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB" if channels == 3 else "L")
        h, w = prep.size
        scale = min(h, w) / prep.crop_pct / min(image.size)
        resized = image.resize(
            (max(w, round(image.size[0] * scale)), max(h, round(image.size[1] * scale))), Image.BILINEAR
        )
        left, top = (resized.size[0] - w) // 2, (resized.size[1] - h) // 2
        pixels = np.asarray(resized.crop((left, top, left + w, top + h)), dtype=np.float32) / 255.0
    x = torch.from_numpy(pixels.reshape(h, w, -1)).permute(2, 0, 1)
    if prep.mean is not None:
        x = x - torch.tensor(prep.mean, dtype=torch.float32).reshape(-1, 1, 1)
    if prep.std is not None:
        x = x / torch.tensor(prep.std, dtype=torch.float32).reshape(-1, 1, 1)
    return x.unsqueeze(0)


def from_images(directory: Path, channels: int, prep: Preprocessing, limit: Optional[int] = None) -> Calibration:
    """Every image file under ``directory`` (sorted), preprocessed by ``prep`` (module docstring)."""
    if channels not in (1, 3):
        raise InputError(f"images give 1 or 3 channels, but the model takes {channels}. Pass a .npy tensor to --calib")
    files = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(
            f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {directory}. Point --calib at a folder "
            "of images or a .npy file"
        )
    samples = []
    for path in files[:limit]:
        try:
            samples.append(_image_tensor(path, channels, prep))
        except Exception as exc:
            raise InputError(
                f"cannot read calibration image {path} ({type(exc).__name__}: {exc}). Remove it or fix it"
            ) from exc
    calibration = Calibration(samples, f"{directory} ({len(samples)} images, {prep.size[0]}x{prep.size[1]})")
    if prep.mean is None or prep.std is None:
        calibration.warnings.append(
            "no mean/std known for this model: pixels scaled to [0, 1] only; pass --mean "
            "and --std as the model was trained with"
        )
    return calibration


def from_npy(path: Path, example_shape: Sequence[int]) -> Calibration:
    """Samples of an ``(N, C, H, W)`` array (``(C, H, W)``: one sample); ``C`` must match the example."""
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(
            f"cannot read {path} as a .npy array ({type(exc).__name__}: {exc}). Save it with numpy.save"
        ) from exc
    if array.ndim == len(example_shape) - 1:
        array = array[None]
    if array.ndim != len(example_shape) or array.shape[1] != example_shape[1]:
        layout = ",".join(["N", str(example_shape[1])] + ["H", "W", "D"][: len(example_shape) - 2])
        raise InputError(
            f"{path} holds an array of shape {tuple(array.shape)}; the model takes {layout}. Save the "
            "preprocessed inputs in that layout"
        )
    if not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{path} holds {array.dtype} values, not numbers")
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return Calibration(list(tensor.split(1)), f"{path} ({len(tensor)} samples, shape {tuple(array.shape[1:])})")


def from_random(n: int, example_shape: Sequence[int], seed: int = 0) -> Calibration:
    """``n`` standard-normal samples of ``example_shape`` (batch 1): a smoke test (module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (1, *example_shape[1:])
    return Calibration(
        [torch.randn(shape, generator=generator) for _ in range(n)], f"random normal inputs ({n} samples)", random=True
    )
