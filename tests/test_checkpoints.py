"""reparam.checkpoints: safe checkpoint reading, unwrapping, the classifier's width, strict loading."""

import os
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from reparam import checkpoints, errors
from reparam.errors import ReparamError


def small_state_dict():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 7))
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class MarkerPayload:
    """Unpickling this creates a file: the proof that a checkpoint ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------------------------- formats


def test_plain_state_dict(tmp_path):
    _, sd = small_state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    loaded = checkpoints.read_checkpoint(tmp_path / "plain.pt")
    assert same(loaded.state_dict, sd)
    assert loaded.source == "checkpoint" and loaded.notes == []
    assert same(checkpoints.load_state_dict(str(tmp_path / "plain.pt")), sd)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema", "ema"])
def test_wrapped_state_dict(tmp_path, key):
    _, sd = small_state_dict()
    torch.save({key: sd, "epoch": 7, "optimizer": {"lr": 0.1}, "args": ["--lr", "0.1"]}, tmp_path / "w.pth")
    loaded = checkpoints.read_checkpoint(tmp_path / "w.pth")
    assert same(loaded.state_dict, sd)
    assert loaded.source == f"checkpoint[{key!r}]"


def test_regular_weights_preferred_unless_ema_asked(tmp_path):
    _, sd = small_state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({"state_dict": sd, "state_dict_ema": ema}, tmp_path / "both.pth")
    assert same(checkpoints.load_state_dict(tmp_path / "both.pth"), sd)
    assert same(checkpoints.load_state_dict(tmp_path / "both.pth", prefer_ema=True), ema)


def test_nested_wrappers_and_prefixes_are_removed(tmp_path):
    _, sd = small_state_dict()
    wrapped = OrderedDict(("module._orig_mod." + k, v) for k, v in sd.items())
    torch.save({"model_ema": {"state_dict": wrapped}}, tmp_path / "ddp.pth")
    loaded = checkpoints.read_checkpoint(tmp_path / "ddp.pth")
    assert same(loaded.state_dict, sd)
    assert any("'module.'" in n for n in loaded.notes) and any("'_orig_mod.'" in n for n in loaded.notes)


def test_partial_prefix_is_kept(tmp_path):
    _, sd = small_state_dict()
    mixed = {("module." + k if i == 0 else k): v for i, (k, v) in enumerate(sd.items())}
    torch.save(mixed, tmp_path / "mixed.pt")
    assert set(checkpoints.load_state_dict(tmp_path / "mixed.pt")) == set(mixed)


def test_non_tensor_entries_next_to_weights_are_dropped(tmp_path):
    _, sd = small_state_dict()
    torch.save({**sd, "epoch": 3}, tmp_path / "flat.pt")
    loaded = checkpoints.read_checkpoint(tmp_path / "flat.pt")
    assert same(loaded.state_dict, sd)
    assert loaded.notes == ["ignored 1 non-tensor entry"]


def test_legacy_serialization(tmp_path):
    _, sd = small_state_dict()
    torch.save({"state_dict": sd}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert same(checkpoints.load_state_dict(tmp_path / "old.pth"), sd)


def test_safetensors_by_suffix_and_by_content(tmp_path):
    _, sd = small_state_dict()
    save_file({"module." + k: v for k, v in sd.items()}, tmp_path / "w.safetensors")
    loaded = checkpoints.read_checkpoint(tmp_path / "w.safetensors")
    assert same(loaded.state_dict, sd) and loaded.source == "safetensors"
    os.rename(tmp_path / "w.safetensors", tmp_path / "w.bin")
    assert same(checkpoints.load_state_dict(tmp_path / "w.bin"), sd)


# ----------------------------------------------------------------------------------------------- safety


@pytest.mark.parametrize("legacy", [False, True])
def test_code_in_a_pickle_is_never_run(tmp_path, legacy):
    marker = tmp_path / "MARKER"
    _, sd = small_state_dict()
    torch.save(
        {"state_dict": sd, "payload": MarkerPayload(marker)},
        tmp_path / "evil.pt",
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(errors.UnsafeCheckpointError) as info:
        checkpoints.load_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()
    name = f"{open.__module__}.open"  # how pickle names the builtin open
    assert info.value.globals == [name]
    message = str(info.value)
    assert name in message and "--trust-checkpoint" in message
    assert isinstance(info.value, ReparamError) and "\n" not in message


def test_raw_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "MARKER"
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump({"payload": MarkerPayload(marker)}, f, protocol=2)
    with pytest.raises(errors.UnsafeCheckpointError, match="--trust-checkpoint"):
        checkpoints.load_state_dict(tmp_path / "raw.pkl")
    assert not marker.exists()


def test_trust_runs_the_pickle(tmp_path):
    """The payload above is real: with trust=True it does run (which is why it needs the flag)."""
    marker = tmp_path / "MARKER"
    _, sd = small_state_dict()
    torch.save({"state_dict": sd, "payload": MarkerPayload(marker)}, tmp_path / "evil.pt")
    assert same(checkpoints.load_state_dict(tmp_path / "evil.pt", trust=True), sd)
    assert marker.exists()


def test_pickled_module_needs_trust(tmp_path):
    model, sd = small_state_dict()
    torch.save(model, tmp_path / "full.pt")
    with pytest.raises(errors.UnsafeCheckpointError, match="torch.nn.modules"):
        checkpoints.load_state_dict(tmp_path / "full.pt")
    loaded = checkpoints.read_checkpoint(tmp_path / "full.pt", trust=True)
    assert same(loaded.state_dict, sd) and "Sequential" in loaded.source


# ----------------------------------------------------------------------------------------------- broken


def test_missing_file(tmp_path):
    with pytest.raises(errors.CheckpointError, match="not found"):
        checkpoints.load_state_dict(tmp_path / "nope.pt")


def test_directory(tmp_path):
    with pytest.raises(errors.CheckpointError, match="not a file"):
        checkpoints.load_state_dict(tmp_path)


@pytest.mark.parametrize(
    "content", [b"", b"certainly not a checkpoint" * 9, bytes(range(256)), b"\x89PNG\r\n", "truncated"]
)
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "truncated":
        torch.save(small_state_dict()[1], path)
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(errors.CheckpointError, match="cannot read") as info:
        checkpoints.load_state_dict(path)
    assert not isinstance(info.value, errors.UnsafeCheckpointError)


def test_corrupt_safetensors(tmp_path):
    save_file(small_state_dict()[1], tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.CheckpointError, match="safetensors"):
        checkpoints.load_state_dict(tmp_path / "w.safetensors")


def test_no_weights_inside(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "meta.pt")
    with pytest.raises(errors.CheckpointError, match="no model weights.*'epoch'"):
        checkpoints.load_state_dict(tmp_path / "meta.pt")


# ------------------------------------------------------------------------------------------ num classes


def test_infer_num_classes():
    assert checkpoints.infer_num_classes(small_state_dict()[1]) == 7
    sd = {"head.fc.weight": torch.zeros(10, 64), "head.fc.bias": torch.zeros(10), "se.fc1.weight": torch.zeros(4, 8)}
    assert checkpoints.infer_num_classes(sd) == 10  # the head wins over a later non-head linear
    # a 1x1 conv classifier
    assert checkpoints.infer_num_classes({"classifier.1.weight": torch.zeros(12, 512, 1, 1)}) == 12
    assert checkpoints.infer_num_classes({"blocks.0.weight": torch.zeros(5, 3)}) == 5  # no head name: last linear
    assert checkpoints.infer_num_classes({"conv.weight": torch.zeros(8, 3, 3, 3)}) is None


# -------------------------------------------------------------------------------------------- strictness


def test_load_strict_exact_and_tolerated():
    model, sd = small_state_dict()
    target, _ = small_state_dict()
    assert checkpoints.load_strict(target, sd) is target
    assert same(target.state_dict(), sd)
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # pre-0.4.1 checkpoints
    checkpoints.load_strict(small_state_dict()[0], old)
    lightning = {"model." + k: v for k, v in sd.items()}
    target = small_state_dict()[0]
    checkpoints.load_strict(target, lightning)
    assert same(target.state_dict(), sd)


def test_load_strict_names_the_mismatch():
    model, sd = small_state_dict()
    sd = dict(sd)
    del sd["0.weight"], sd["1.bias"], sd["1.running_mean"], sd["1.running_var"]
    sd["extra.weight"] = torch.zeros(1)
    sd["3.weight"] = torch.zeros(9, 4)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(errors.StateDictMismatchError) as info:
        checkpoints.load_strict(model, sd)
    err = info.value
    message = str(err)
    assert "4 missing keys (0.weight, 1.bias, 1.running_mean, ...)" in message
    assert "1 unexpected key (extra.weight)" in message
    assert "1 key of the wrong shape (3.weight: checkpoint [9, 4] vs model [7, 4])" in message
    assert message.endswith("Check the architecture and the number of classes")
    assert len(err.missing) == 4 and err.unexpected == ["extra.weight"] and err.mismatched[0][0] == "3.weight"
    assert same(model.state_dict(), fresh)  # nothing loaded on failure
