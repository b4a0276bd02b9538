"""Train a tiny RepVGG on scikit-learn's 8×8 digits, fuse it with ``reparam.fuse``, compare.

The network is the zoo's ``repvgg_digits`` (RepVGG blocks: 3×3 conv-BN + 1×1 conv-BN + identity BN,
then ReLU). After a few epochs of training the script fuses it into a plain stack of 5 convolutions
and shows that the fused model predicts the same classes on the test split, how far apart the logits
are, and how much faster the fused model runs in eager mode on the CPU.

    python examples/train_digits.py                      # train, fuse, compare (under a minute on 2 CPU cores)
    python examples/train_digits.py --save examples/checkpoints/repvgg_digits.pt
    python examples/train_digits.py --load examples/checkpoints/repvgg_digits.pt   # skip training

The saved checkpoint is a plain state dict, so the CLI can convert it:
``reparam convert examples/checkpoints/repvgg_digits.pt --arch repvgg_digits``.
The digits data ships inside scikit-learn; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import reparam
import reparam.models as zoo

ARCH = "repvgg_digits"


def load_digits_split(seed: int):
    """Digits as ``(N, 1, 8, 8)`` float tensors in [0, 1] with an 80/20 stratified split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "This example needs scikit-learn for its bundled digits dataset: pip install scikit-learn"
        ) from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.2, random_state=seed, stratify=labels.numpy()
    )
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> None:
    """Adam + one-cycle schedule, light random-shift augmentation."""
    generator = torch.Generator().manual_seed(seed)
    batch_size = 64
    steps_per_epoch = (len(labels) + batch_size - 1) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=epochs * steps_per_epoch)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        total_loss, correct = 0.0, 0
        for start in range(0, len(labels), batch_size):
            index = order[start : start + batch_size]
            batch, target = random_shift(images[index], generator), labels[index]
            logits = model(batch)
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(index)
            correct += (logits.argmax(1) == target).sum().item()
        mean_loss, accuracy = total_loss / len(labels), correct / len(labels)
        print(f"epoch {epoch + 1:2d}/{epochs}  loss {mean_loss:.4f}  train acc {accuracy:.3f}")
    model.eval()


def random_shift(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel (zero fill)."""
    padded = F.pad(batch, [1, 1, 1, 1])
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy : dy + 8, dx : dx + 8]


def median_ms(models: dict, x: torch.Tensor, repeats: int) -> dict:
    """Median wall time per model; runs are interleaved so background load hits every model alike."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(3):
                model(x)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(samples) for name, samples in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load", type=Path, help="skip training and load this state dict")
    parser.add_argument("--save", type=Path, help="save the trained state dict here")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: the net is too small to split, and a fixed count keeps training reproducible)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = load_digits_split(args.seed)
    model = zoo.create(ARCH)
    if args.load:
        model.load_state_dict(torch.load(args.load, weights_only=True), strict=True)
        model.eval()
        print(f"loaded {args.load}")
    else:
        print(f"training {ARCH} on {len(train_y)} digits ({sum(p.numel() for p in model.parameters())} parameters)")
        start = time.perf_counter()
        train(model, train_x, train_y, args.epochs, args.seed)
        print(f"trained in {time.perf_counter() - start:.1f} s")
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.save)
        print(f"saved {args.save} ({args.save.stat().st_size / 1024:.0f} KiB)")

    fused = reparam.fuse(model, (test_x[:1],))
    with torch.inference_mode():
        logits, fused_logits = model(test_x), fused(test_x)
    predictions, fused_predictions = logits.argmax(1), fused_logits.argmax(1)
    accuracy = (predictions == test_y).float().mean().item()
    fused_accuracy = (fused_predictions == test_y).float().mean().item()
    print(f"test accuracy   training-time model {accuracy:.4f}   fused model {fused_accuracy:.4f}")
    print(f"same predictions on {int((predictions == fused_predictions).sum())}/{len(test_y)} test digits")
    print(f"max |logit difference| {(logits - fused_logits).abs().max().item():.3g}")

    for batch in (test_x, test_x[:1]):
        ms = median_ms({"training-time": model, "fused": fused}, batch, repeats=50)
        print(
            f"eager CPU, batch {len(batch):3d}: training-time {ms['training-time']:.3f} ms -> "
            f"fused {ms['fused']:.3f} ms ({ms['training-time'] / ms['fused']:.2f}x faster)"
        )


if __name__ == "__main__":
    main()
