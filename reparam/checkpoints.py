"""Checkpoint reading: weights read safely from a file, unwrapped, and loaded strictly into a model.

- :func:`read_checkpoint` / :func:`load_state_dict` read a checkpoint (``torch.save`` zip or legacy pickle, or
  ``.safetensors``) without executing anything in it unless ``trust=True``, unwrap the usual containers
  (``state_dict``, ``model``, ``model_state_dict``, EMA copies ...) and strip ``module.`` (DataParallel) /
  ``_orig_mod.`` (torch.compile) prefixes; :func:`read_checkpoint` also says where the weights were found.
- :func:`scanned_globals` names the code a ``torch.save`` pickle needs, read statically (nothing is unpickled).
- :func:`infer_num_classes` reads the classifier's width from the weights.
- :func:`load_strict` loads a state dict strictly and, on mismatch, names the missing / unexpected / wrongly
  shaped keys (``strict=False`` hides exactly the mistakes that break a conversion).

Every failure a user can cause raises a :class:`~reparam.errors.CheckpointError` (a missing, corrupt or unsafe
file) or :class:`~reparam.errors.StateDictMismatchError` whose message reads ``<problem>. <what to do>``.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reparam.errors import CheckpointError, StateDictMismatchError, UnsafeCheckpointError, one_line

__all__ = [
    "STATE_DICT_KEYS",
    "EMA_KEYS",
    "WRAPPER_PREFIXES",
    "TRUST_HINT",
    "Checkpoint",
    "read_checkpoint",
    "check_checkpoint_path",
    "load_state_dict",
    "scanned_globals",
    "describe",
    "infer_num_classes",
    "load_strict",
]

#: Keys under which training code stores the model weights, most common first.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "params", "weights")
#: Keys under which training code stores an exponential moving average (EMA) copy of the weights.
EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "model_ema_state_dict", "ema", "ema_model")
#: Prefixes added by wrappers: ``nn.DataParallel``/DDP (``module.``) and ``torch.compile`` (``_orig_mod.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_SAFETENSORS_SUFFIX = ".safetensors"
#: What a refusal to unpickle code tells the user to do.
TRUST_HINT = "If you trust the file's source, re-run with --trust-checkpoint (this executes code from the file)"


@dataclass
class Checkpoint:
    """The weights read from a checkpoint file and where they were found in it.

    ``source`` describes the container (e.g. ``checkpoint['state_dict_ema']``); ``notes`` lists the
    transformations applied (prefixes stripped, non-tensor entries dropped).
    """

    state_dict: dict[str, torch.Tensor]
    source: str
    notes: list[str] = field(default_factory=list)


def read_checkpoint(path: str | os.PathLike, trust: bool = False, prefer_ema: bool = False) -> Checkpoint:
    """Read the weights of a checkpoint file; see :func:`load_state_dict`. Also reports where they were found."""
    path = check_checkpoint_path(path)
    if _is_safetensors(path):
        obj, fmt = _load_safetensors(path), "safetensors"
    else:
        obj, fmt = _load_pickle(path, trust), "checkpoint"
    state_dict, source, notes = _unwrap(obj, fmt, prefer_ema, path)
    state_dict, stripped = _strip_wrapper_prefixes(state_dict)
    notes.extend(f"removed the {p!r} prefix" for p in stripped)
    return Checkpoint(state_dict, source, notes)


def check_checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`Path` if it names an existing file; :class:`CheckpointError` otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}. Check the path")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}. Pass the path of a checkpoint file")
    return path


def load_state_dict(path: str | os.PathLike, trust: bool = False, prefer_ema: bool = False) -> dict[str, torch.Tensor]:
    """Read the model weights stored in ``path`` as a flat ``{name: tensor}`` dict on the CPU.

    Formats: a ``torch.save`` file (zip or legacy) or a raw pickle, loaded with ``weights_only=True`` unless
    ``trust``; a ``.safetensors`` file.  Containers are unwrapped: a plain state dict, one stored under
    :data:`STATE_DICT_KEYS` or :data:`EMA_KEYS` (``prefer_ema`` picks the EMA copy when both are present), or a
    pickled ``nn.Module`` (only loadable with ``trust``).  :data:`WRAPPER_PREFIXES` shared by every key are removed.

    Raises :class:`CheckpointError` (missing, corrupt, no weights inside) and :class:`UnsafeCheckpointError`
    (the pickle needs arbitrary globals; they are named and nothing is executed).
    """
    return read_checkpoint(path, trust=trust, prefer_ema=prefer_ema).state_dict


def _is_safetensors(path: Path) -> bool:
    """True for a ``.safetensors`` name, or a file that starts like one (8-byte header length, then ``{``)."""
    if path.suffix == _SAFETENSORS_SUFFIX:
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read {path} as safetensors ({one_line(exc)}). The file may be corrupt or truncated"
        ) from exc


def _load_pickle(path: Path, trust: bool) -> Any:
    """``torch.load`` on the CPU; with ``trust=False`` only the ``weights_only`` allow-list is ever unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if not trust and "weights only load failed" in str(exc).lower():
            raise _refusal(path, exc) from exc
        raise _corrupt_error(path, exc) from exc
    except MemoryError:
        raise
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError, ValueError ... on damaged files
        raise _corrupt_error(path, exc) from exc


def _corrupt_error(path: Path, exc: BaseException) -> CheckpointError:
    """What is wrong with a file torch cannot load: its content when recognisable, else torch's reason.

    torch's own advice for a failed safe load (re-run with ``weights_only=False``) is never passed on: it would
    run whatever the file holds, and a file that is no checkpoint at all gains nothing from it.
    """
    what = _sniff(path)
    if what is None:
        reason = one_line(exc)
        what = (
            "it is not a pickle torch can read"
            if "weights_only" in reason or "weights only" in reason.lower()
            else f"{type(exc).__name__}: {reason}"
        )
    return CheckpointError(
        f"cannot read {path} as a PyTorch checkpoint ({what}). "
        "The file may be corrupt, truncated or in another format (.safetensors, .pt, .pth are supported)"
    )


_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"\x1f\x8b": "a gzip file",
    b"\x89HDF": "an HDF5 file (Keras .h5?)",
    b"\x93NUMPY": "a NumPy .npy file",
    b"%PDF": "a PDF document",
}


def _sniff(path: Path) -> str | None:
    """A description of a file's content that tells why it is no checkpoint, or None when it might be one."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if not head:
        return "the file is empty"
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return f"it is {kind}"
    if zipfile.is_zipfile(path):
        return None  # a torch.save archive, possibly damaged: torch's reason says how
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        start = " ".join(text.split())[:40]
        return f"it is a text file, starting {start!r}"
    if head[:1] != b"\x80" and not _parses_as_pickle(path):  # pickles of protocol 2+ start with PROTO (0x80)
        return f"it is neither a pickle, a zip archive nor safetensors: it starts with bytes {head[:8].hex(' ')}"
    return None


_GLOBAL_NAME = re.compile(r"GLOBAL ([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\s|$)")


def _refusal(path: Path, exc: BaseException) -> CheckpointError:
    """Explain why a ``weights_only`` load failed, naming the globals it refused, without unpickling anything.

    Garbage that merely fails the safe unpickler (it is no pickle at all) is reported as corrupt instead.
    """
    # deterministic order: the model's own classes (outside torch) first, then torch's, each sorted
    found = sorted(
        dict.fromkeys(scanned_globals(path) or _GLOBAL_NAME.findall(str(exc))),
        key=lambda name: (name.startswith(("torch.", "collections.", "builtins.")), name),
    )
    if found:
        shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
        return UnsafeCheckpointError(
            f"refusing to load {path}: its pickle needs code from {shown}. {TRUST_HINT}", found
        )
    if not zipfile.is_zipfile(path) and not _parses_as_pickle(path):
        return _corrupt_error(path, exc)
    detail = next(
        (
            line.strip()
            for line in str(exc).splitlines()[1:]
            if line.strip() and "error" not in line.lower() and "documentation" not in line.lower()
        ),
        "",
    )
    return UnsafeCheckpointError(
        f"refusing to load {path}: it cannot be loaded with weights_only=True "
        f"({detail or 'unsupported pickle'}). {TRUST_HINT}"
    )


def _parses_as_pickle(path: Path) -> bool:
    """True when the file starts with a well-formed pickle (read with pickletools: nothing is executed)."""
    try:
        with open(path, "rb") as f:
            for _ in pickletools.genops(f):
                pass
    except (ValueError, OSError, OverflowError, MemoryError):  # what pickletools raises on a malformed stream (a
        return False  # corrupt length field can ask for more memory than there is)
    return True


#: What torch's static pickle scanner raises on a damaged archive or pickle.
_SCAN_ERRORS = (RuntimeError, ValueError, OSError, EOFError, IndexError, struct.error, pickle.UnpicklingError)


def scanned_globals(path: str | os.PathLike) -> list[str]:
    """The globals the pickle of a ``torch.save`` zip needs beyond torch's weights-only set, read statically with
    torch's scanner (nothing is executed); ``[]`` for a file that is no zip, that the scanner cannot read, or
    with a torch too old to have the scanner (before 2.6)."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is None or not zipfile.is_zipfile(path):
        return []
    try:
        return list(scan(path))
    except _SCAN_ERRORS:
        return []


def _unwrap(obj: Any, fmt: str, prefer_ema: bool, path: Path) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Find the state dict inside a loaded checkpoint object; returns ``(state_dict, source, notes)``."""
    found = _find_state_dict(obj, fmt, prefer_ema, depth=0)
    if found is None:
        raise CheckpointError(
            f"no model weights found in {path} ({describe(obj)}). Expected a state dict, "
            f"or one under one of the keys {', '.join(STATE_DICT_KEYS + EMA_KEYS)}"
        )
    return found


def _find_state_dict(obj: Any, where: str, prefer_ema: bool, depth: int):
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict()), f"{where} (a pickled {type(obj).__name__})", []
    if not isinstance(obj, Mapping) or depth > 3:
        return None
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors and len(tensors) == len(obj):
        return tensors, where, []
    keys = EMA_KEYS + STATE_DICT_KEYS if prefer_ema else STATE_DICT_KEYS + EMA_KEYS
    for key in keys:
        if key in obj:
            found = _find_state_dict(obj[key], f"{where}[{key!r}]", prefer_ema, depth + 1)
            if found is not None:
                return found
    if tensors:
        dropped = len(obj) - len(tensors)
        return tensors, where, [f"ignored {dropped} non-tensor entr{'y' if dropped == 1 else 'ies'}"]
    return None


def describe(obj: Any) -> str:
    """A short description of a loaded object that holds no weights (``a dict with keys ...``, ``a list``)."""
    if isinstance(obj, Mapping):
        keys = [repr(k) for k in list(obj)[:6]]
        more = ", ..." if len(obj) > 6 else ""
        return f"a dict with keys {', '.join(keys)}{more}" if keys else "an empty dict"
    return f"a {type(obj).__name__}"


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    stripped = []
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                stripped.append(prefix)
                changed = True
    return state_dict, stripped


# ---------------------------------------------------------------------------------------------- num classes

_HEAD_NAMES = frozenset(
    {"fc", "head", "classifier", "linear", "last_linear", "logits", "fc_out", "cls_head", "head_fc"}
)


def infer_num_classes(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The number of classes of the classifier in ``state_dict``, or None when no classifier is recognisable.

    The classifier is the last 2-D ``*.weight`` (or 1×1 conv weight) under a head-like name (``fc``, ``head``,
    ``classifier``, ``linear`` ...); failing that, the last 2-D ``*.weight`` of the dict.
    """
    heads, linears = [], []
    for key, value in state_dict.items():
        if not key.endswith("weight") or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        is_linear = value.ndim == 2
        is_pointwise = value.ndim >= 3 and all(s == 1 for s in value.shape[2:])
        on_head = any(part in _HEAD_NAMES for part in key.split(".")[:-1])
        if on_head and (is_linear or is_pointwise):
            heads.append(value)
        if is_linear:
            linears.append(value)
    candidates = heads or linears
    return int(candidates[-1].shape[0]) if candidates else None


# -------------------------------------------------------------------------------------------- strict loading


def load_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Load ``state_dict`` into ``model`` (in place) requiring every key and shape to match; returns ``model``.

    A missing ``num_batches_tracked`` buffer (absent from old checkpoints, unused in eval mode) is tolerated.  If
    every checkpoint key carries one extra leading component (``model.`` from Lightning, say) and removing it makes
    the keys match exactly, it is removed.  Otherwise raises :class:`StateDictMismatchError` naming how many keys
    are missing, unexpected and of the wrong shape, and the first few of each.
    """
    expected = model.state_dict()
    state_dict = _strip_extra_prefix(dict(state_dict), expected)
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(
            _mismatch_message(missing, unexpected, mismatched), missing, unexpected, mismatched
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # e.g. a num_batches_tracked that a module refuses to fill in
        raise StateDictMismatchError(
            f"checkpoint does not match the model ({one_line(exc)}). Check the architecture and the number of classes"
        ) from exc
    return model


def _strip_extra_prefix(state_dict: dict, expected: Mapping) -> dict:
    if not state_dict or set(state_dict) == set(expected):
        return state_dict
    heads = {k.split(".", 1)[0] for k in state_dict}
    if len(heads) != 1 or not all("." in k for k in state_dict):
        return state_dict
    stripped = {k.split(".", 1)[1]: v for k, v in state_dict.items()}
    required = {k for k in expected if not k.endswith("num_batches_tracked")}
    return stripped if required <= set(stripped) <= set(expected) else state_dict


def _mismatch_message(missing: list, unexpected: list, mismatched: list, shown: int = 3) -> str:
    def names(items: list) -> str:
        head = ", ".join(items[:shown])
        return head + (", ..." if len(items) > shown else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key{'s' * (len(missing) != 1)} ({names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key{'s' * (len(unexpected) != 1)} ({names(unexpected)})")
    if mismatched:
        described = [f"{k}: checkpoint {list(c)} vs model {list(m)}" for k, c, m in mismatched]
        parts.append(f"{len(mismatched)} key{'s' * (len(mismatched) != 1)} of the wrong shape ({names(described)})")
    return (
        "checkpoint does not match the model: "
        + "; ".join(parts)
        + ". Check the architecture and the number of classes"
    )
