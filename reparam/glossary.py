"""Plain words for the report: what each rewrite kind, each word of a region's "before" column and each kind of
refusal means.  ``reparam explain KIND`` prints an entry; the convert and inspect reports print a legend of the
entries they use, once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["Entry", "GLOSSARY", "lookup", "refusal_kind", "legend_kinds"]


class Entry(NamedTuple):
    """One term: its group (``rewrite``, ``op`` or ``refusal``) and what it means."""

    group: str
    meaning: str


GLOSSARY: dict[str, Entry] = {
    # rewrite kinds (the "rewrites" column, Report.counts())
    "fold_bn": Entry(
        "rewrite",
        "a BatchNorm with running statistics folded into the conv or linear before or after "
        "it (scale the weights, shift the bias); the BatchNorm disappears.",
    ),
    "merge_parallel": Entry(
        "rewrite",
        "branches that read the same input and are summed (3x3 + 1x1 + identity "
        "...) merged into one conv: kernels zero-padded to the largest size and added.",
    ),
    "merge_concat": Entry(
        "rewrite",
        "branches that read the same input and are concatenated along channels merged "
        "into one conv whose output channels are the branches' stacked.",
    ),
    "merge_towers": Entry(
        "rewrite", "parallel paths of the same shape (a multi-path ResNeXt block) merged into one grouped path."
    ),
    "merge_siblings": Entry(
        "rewrite",
        "convs (or linears) that read the same input and whose outputs are used "
        "separately merged into one kernel with the outputs' channels stacked, each output a "
        "view of its channels (no copy).",
    ),
    "merge_rows": Entry(
        "rewrite",
        "affine ops applied to fixed-size partitions of a tensor, across the reshapes "
        "between them (RepMLP's partition-wise fc and local convs), merged into one grouped 1x1 conv.",
    ),
    "compose": Entry(
        "rewrite",
        "two linear layers in a row (1x1 then kxk, pad then conv, linear then linear) "
        "composed into one, when that costs no more multiply-accumulates.",
    ),
    "skip": Entry(
        "rewrite", "a linear skip connection (x + f(x) with f linear) folded into the conv as an identity kernel."
    ),
    "scale": Entry(
        "rewrite",
        "a per-channel or scalar multiply or an added constant (layer scale, x * gamma, + c, "
        "- x) folded into the neighbouring conv's weights and bias.",
    ),
    "pad": Entry("rewrite", "an explicit zero padding absorbed into the padding of the conv after it."),
    "pool": Entry("rewrite", "an average pool written as a fixed conv kernel and merged with its neighbours."),
    "remove_residual": Entry(
        "rewrite",
        "(only with --remove-residuals) relu(F(x) + x) turned into a plain chain "
        "that carries x in extra channels with identity (Dirac) kernels; exact, costs MACs.",
    ),
    "fold_constant": Entry(
        "rewrite",
        "a tensor the forward computes from parameters and buffers alone (an attention-bias gather, a "
        "standardised weight) computed once at fuse time and kept as a buffer.",
    ),
    # words of the "before" column (what a region held)
    "conv": Entry("op", "a convolution, written kxk conv IN->OUT [stride SxS] [groups G]."),
    "linear": Entry("op", "a fully connected layer, written linear IN->OUT."),
    "batchnorm": Entry("op", "a BatchNorm in eval mode: a per-channel scale and shift."),
    "shift": Entry(
        "op", "a constant added to a tensor (a bias-like + c, e.g. an affine BatchNorm's offset written out by hand)."
    ),
    "add": Entry("op", "a sum of two branches or of a branch and a skip connection."),
    "cat": Entry("op", "a concatenation of branches along channels."),
    "avgpool": Entry("op", "an average pool (count_include_pad=True), a fixed linear kernel."),
    "no-op": Entry(
        "op",
        "modules that pass their input through (nn.Identity placeholders, dropout in eval mode, "
        "reshapes that are undone): not branches, and not counted.",
    ),
    # kinds of refusal (the "why" column)
    "zero-padding": Entry(
        "refusal",
        "composing B(A(x)) would change the border: B pads A's output with zeros, and "
        "A does not output zeros there (it has a bias or a kernel wider than 1x1).",
    ),
    "cost": Entry(
        "refusal",
        "merging through this point would need more multiply-accumulates than it saves, so the region is cut here.",
    ),
    "shape": Entry(
        "refusal", "the branches do not line up: different strides, channel counts, layouts or output grids."
    ),
    "padding-mode": Entry("refusal", "reflect/replicate padding, or padding no single conv module can express."),
    "batch-statistics": Entry(
        "refusal",
        "a BatchNorm that uses batch statistics (training mode or no running statistics) is not a fixed affine map.",
    ),
    "residual-kept": Entry(
        "refusal", "(--remove-residuals) the residual could not be carried exactly through the block's activations."
    ),
    "paths-kept": Entry("refusal", "parallel paths that could not be merged into a grouped path."),
    "constant-kept": Entry(
        "refusal",
        "a tensor computed from parameters alone is still computed on every forward: as a buffer it would be too "
        "large, the model returns it, or its dtype cannot be derived.",
    ),
}

_REFUSAL_PATTERNS = (
    ("constant-kept", r"^constant kept"),
    ("residual-kept", r"^residual kept"),
    ("paths-kept", r"^parallel paths kept"),
    ("zero-padding", r"pads with zeros|has a bias and the"),
    ("cost", r"more MACs"),
    ("batch-statistics", r"batch statistics"),
    ("padding-mode", r"pads? (asymmetrically|with (reflect|replicate|circular|different))|-padded|padding"),
    ("shape", r"different|do not align|do not chain|not along the channel|shape"),
)


def refusal_kind(reason: str) -> str | None:
    """The :data:`GLOSSARY` refusal entry a refusal's reason belongs to, or None."""
    for kind, pattern in _REFUSAL_PATTERNS:
        if re.search(pattern, reason):
            return kind
    return None


def lookup(term: str) -> Entry | None:
    """The entry for ``term`` (case and ``-``/``_`` insensitive; ``identity`` is ``no-op``)."""
    key = term.strip().lower()
    if key == "identity":
        key = "no-op"
    for name in (key, key.replace("-", "_"), key.replace("_", "-")):
        if name in GLOSSARY:
            return GLOSSARY[name]
    return None


def before_words(text: str) -> set[str]:
    """The :data:`GLOSSARY` op words used in a region's "before" text (``add x4, 3x3 conv 3->48 ...``)."""
    return {
        word
        for word in ("conv", "linear", "batchnorm", "shift", "add", "cat", "avgpool")
        if re.search(rf"\b{word}\b", text)
    }


def legend_kinds(rewrites: Iterable, refusals: Iterable) -> list[str]:
    """The glossary terms a report uses, in glossary order: rewrite kinds, op words and refusal kinds."""
    used: set[str] = set()
    for rewrite in rewrites:
        used.update(getattr(rewrite, "events", ()))
        used.update(before_words(str(getattr(rewrite, "before", ""))))
    for refusal in refusals:
        kind = refusal_kind(str(getattr(refusal, "reason", "")))
        if kind:
            used.add(kind)
    return [name for name in GLOSSARY if name in used]
