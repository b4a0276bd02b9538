"""The zoo's architectures as plain data, for ``reparam list`` (which must not import torch to print a table).

:data:`ARCHITECTURES` is a copy of what :mod:`reparam.models` registers (name, input size, default classes, the
first docstring line without reStructuredText markup); :func:`from_registry` builds the same list from the live
registry, and ``tests/test_cli.py`` checks that the two agree, so the copy cannot go stale.  Regenerate it with
``python -c "import reparam.catalog as c; c.print_source()"``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["Architecture", "ARCHITECTURES", "from_registry", "plain_text", "print_source"]


class Architecture(NamedTuple):
    """One ``--arch`` name of the zoo."""

    name: str
    input_size: tuple
    num_classes: int
    description: str


def plain_text(text: str) -> str:
    """reStructuredText inline markup removed: ````code````, ``:role:`x```, ``*emphasis*``."""
    text = re.sub(r":[a-z]+:`~?([^`]*)`", r"\1", text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    return re.sub(r"(?<!\w)\*([^*]+)\*(?!\w)", r"\1", text)


def from_registry() -> list[Architecture]:
    """The zoo's architectures as :mod:`reparam.models` registers them (imports torch)."""
    from reparam import models

    return [
        Architecture(name, tuple(spec.input_size), spec.num_classes, plain_text(spec.description))
        for name, spec in ((n, models.spec(n)) for n in models.names())
    ]


def print_source() -> None:
    """Print the :data:`ARCHITECTURES` literal for the live registry (to paste here after adding a model)."""
    print("ARCHITECTURES = [")
    for arch in from_registry():
        print(
            f"    Architecture({arch.name!r}, {arch.input_size!r}, {arch.num_classes!r},\n"
            f"                 {arch.description!r}),"
        )
    print("]")


ARCHITECTURES = [
    Architecture(
        "acnet_resnet18",
        (3, 224, 224),
        1000,
        "ResNet-18 with ACNet asymmetric blocks (3×3 + 3×1 + 1×3, each with BN) for its 3×3 convs.",
    ),
    Architecture("dbb_resnet18", (3, 224, 224), 1000, "ResNet-18 with Diverse Branch Blocks for its 3×3 convs."),
    Architecture(
        "mobileone_s0", (3, 224, 224), 1000, "MobileOne-S0, training-time form (mobileone_s0_unfused.pth.tar keys)."
    ),
    Architecture(
        "mobileone_s1", (3, 224, 224), 1000, "MobileOne-S1, training-time form (mobileone_s1_unfused.pth.tar keys)."
    ),
    Architecture(
        "mobileone_s2", (3, 224, 224), 1000, "MobileOne-S2, training-time form (mobileone_s2_unfused.pth.tar keys)."
    ),
    Architecture(
        "mobileone_s3", (3, 224, 224), 1000, "MobileOne-S3, training-time form (mobileone_s3_unfused.pth.tar keys)."
    ),
    Architecture(
        "mobileone_s4", (3, 224, 224), 1000, "MobileOne-S4, training-time form (mobileone_s4_unfused.pth.tar keys)."
    ),
    Architecture(
        "repvgg_a0", (3, 224, 224), 1000, "RepVGG-A0, training-time form (official layout, RepVGG-A0-train.pth keys)."
    ),
    Architecture(
        "repvgg_a1", (3, 224, 224), 1000, "RepVGG-A1, training-time form (official layout, RepVGG-A1-train.pth keys)."
    ),
    Architecture(
        "repvgg_a2", (3, 224, 224), 1000, "RepVGG-A2, training-time form (official layout, RepVGG-A2-train.pth keys)."
    ),
    Architecture(
        "repvgg_b0", (3, 224, 224), 1000, "RepVGG-B0, training-time form (official layout, RepVGG-B0-train.pth keys)."
    ),
    Architecture(
        "repvgg_b1", (3, 224, 224), 1000, "RepVGG-B1, training-time form (official layout, RepVGG-B1-train.pth keys)."
    ),
    Architecture(
        "repvgg_b1g2",
        (3, 224, 224),
        1000,
        "RepVGG-B1g2, training-time form (official layout, RepVGG-B1g2-train.pth keys).",
    ),
    Architecture(
        "repvgg_b1g4",
        (3, 224, 224),
        1000,
        "RepVGG-B1g4, training-time form (official layout, RepVGG-B1g4-train.pth keys).",
    ),
    Architecture(
        "repvgg_b2", (3, 224, 224), 1000, "RepVGG-B2, training-time form (official layout, RepVGG-B2-train.pth keys)."
    ),
    Architecture(
        "repvgg_b2g2",
        (3, 224, 224),
        1000,
        "RepVGG-B2g2, training-time form (official layout, RepVGG-B2g2-train.pth keys).",
    ),
    Architecture(
        "repvgg_b2g4",
        (3, 224, 224),
        1000,
        "RepVGG-B2g4, training-time form (official layout, RepVGG-B2g4-train.pth keys).",
    ),
    Architecture(
        "repvgg_b3", (3, 224, 224), 1000, "RepVGG-B3, training-time form (official layout, RepVGG-B3-train.pth keys)."
    ),
    Architecture(
        "repvgg_b3g2",
        (3, 224, 224),
        1000,
        "RepVGG-B3g2, training-time form (official layout, RepVGG-B3g2-train.pth keys).",
    ),
    Architecture(
        "repvgg_b3g4",
        (3, 224, 224),
        1000,
        "RepVGG-B3g4, training-time form (official layout, RepVGG-B3g4-train.pth keys).",
    ),
    Architecture(
        "repvgg_d2se",
        (3, 224, 224),
        1000,
        "RepVGG-D2se, training-time form (official layout, RepVGG-D2se-train.pth keys).",
    ),
    Architecture(
        "repvgg_digits",
        (1, 8, 8),
        10,
        "Tiny RepVGG for scikit-learn's 8×8 digits: stem 16 ch (stride 1), stages 32 and 64 ch (stride 2).",
    ),
    Architecture(
        "resnext_multipath_tiny",
        (3, 64, 64),
        1000,
        "Small ResNeXt (8 paths) in explicit multi-path form; fuses to grouped convs.",
    ),
]
