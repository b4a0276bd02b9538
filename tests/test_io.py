"""reparam.io: safe checkpoint reading, unwrapping, architectures, strict loading, atomic writes."""

import os
import pickle
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from reparam import io
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
    loaded = io.read_checkpoint(tmp_path / "plain.pt")
    assert same(loaded.state_dict, sd)
    assert loaded.source == "checkpoint" and loaded.notes == []
    assert same(io.load_state_dict(str(tmp_path / "plain.pt")), sd)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema", "ema"])
def test_wrapped_state_dict(tmp_path, key):
    _, sd = small_state_dict()
    torch.save({key: sd, "epoch": 7, "optimizer": {"lr": 0.1}, "args": ["--lr", "0.1"]}, tmp_path / "w.pth")
    loaded = io.read_checkpoint(tmp_path / "w.pth")
    assert same(loaded.state_dict, sd)
    assert loaded.source == f"checkpoint[{key!r}]"


def test_regular_weights_preferred_unless_ema_asked(tmp_path):
    _, sd = small_state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({"state_dict": sd, "state_dict_ema": ema}, tmp_path / "both.pth")
    assert same(io.load_state_dict(tmp_path / "both.pth"), sd)
    assert same(io.load_state_dict(tmp_path / "both.pth", prefer_ema=True), ema)


def test_nested_wrappers_and_prefixes_are_removed(tmp_path):
    _, sd = small_state_dict()
    wrapped = OrderedDict(("module._orig_mod." + k, v) for k, v in sd.items())
    torch.save({"model_ema": {"state_dict": wrapped}}, tmp_path / "ddp.pth")
    loaded = io.read_checkpoint(tmp_path / "ddp.pth")
    assert same(loaded.state_dict, sd)
    assert any("'module.'" in n for n in loaded.notes) and any("'_orig_mod.'" in n for n in loaded.notes)


def test_partial_prefix_is_kept(tmp_path):
    _, sd = small_state_dict()
    mixed = {("module." + k if i == 0 else k): v for i, (k, v) in enumerate(sd.items())}
    torch.save(mixed, tmp_path / "mixed.pt")
    assert set(io.load_state_dict(tmp_path / "mixed.pt")) == set(mixed)


def test_non_tensor_entries_next_to_weights_are_dropped(tmp_path):
    _, sd = small_state_dict()
    torch.save({**sd, "epoch": 3}, tmp_path / "flat.pt")
    loaded = io.read_checkpoint(tmp_path / "flat.pt")
    assert same(loaded.state_dict, sd)
    assert loaded.notes == ["ignored 1 non-tensor entry"]


def test_legacy_serialization(tmp_path):
    _, sd = small_state_dict()
    torch.save({"state_dict": sd}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert same(io.load_state_dict(tmp_path / "old.pth"), sd)


def test_safetensors_by_suffix_and_by_content(tmp_path):
    _, sd = small_state_dict()
    save_file({"module." + k: v for k, v in sd.items()}, tmp_path / "w.safetensors")
    loaded = io.read_checkpoint(tmp_path / "w.safetensors")
    assert same(loaded.state_dict, sd) and loaded.source == "safetensors"
    os.rename(tmp_path / "w.safetensors", tmp_path / "w.bin")
    assert same(io.load_state_dict(tmp_path / "w.bin"), sd)


# ----------------------------------------------------------------------------------------------- safety


@pytest.mark.parametrize("legacy", [False, True])
def test_code_in_a_pickle_is_never_run(tmp_path, legacy):
    marker = tmp_path / "MARKER"
    _, sd = small_state_dict()
    torch.save({"state_dict": sd, "payload": MarkerPayload(marker)}, tmp_path / "evil.pt",
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(io.UnsafeCheckpointError) as info:
        io.load_state_dict(tmp_path / "evil.pt")
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
    with pytest.raises(io.UnsafeCheckpointError, match="--trust-checkpoint"):
        io.load_state_dict(tmp_path / "raw.pkl")
    assert not marker.exists()


def test_trust_runs_the_pickle(tmp_path):
    """The payload above is real: with trust=True it does run (which is why it needs the flag)."""
    marker = tmp_path / "MARKER"
    _, sd = small_state_dict()
    torch.save({"state_dict": sd, "payload": MarkerPayload(marker)}, tmp_path / "evil.pt")
    assert same(io.load_state_dict(tmp_path / "evil.pt", trust=True), sd)
    assert marker.exists()


def test_pickled_module_needs_trust(tmp_path):
    model, sd = small_state_dict()
    torch.save(model, tmp_path / "full.pt")
    with pytest.raises(io.UnsafeCheckpointError, match="torch.nn.modules"):
        io.load_state_dict(tmp_path / "full.pt")
    loaded = io.read_checkpoint(tmp_path / "full.pt", trust=True)
    assert same(loaded.state_dict, sd) and "Sequential" in loaded.source


# ----------------------------------------------------------------------------------------------- broken


def test_missing_file(tmp_path):
    with pytest.raises(io.CheckpointError, match="not found"):
        io.load_state_dict(tmp_path / "nope.pt")


def test_directory(tmp_path):
    with pytest.raises(io.CheckpointError, match="not a file"):
        io.load_state_dict(tmp_path)


@pytest.mark.parametrize("content", [b"", b"certainly not a checkpoint" * 9, bytes(range(256)), b"\x89PNG\r\n", "truncated"])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "truncated":
        torch.save(small_state_dict()[1], path)
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(io.CheckpointError, match="cannot read") as info:
        io.load_state_dict(path)
    assert not isinstance(info.value, io.UnsafeCheckpointError)


def test_corrupt_safetensors(tmp_path):
    save_file(small_state_dict()[1], tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(io.CheckpointError, match="safetensors"):
        io.load_state_dict(tmp_path / "w.safetensors")


def test_no_weights_inside(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "meta.pt")
    with pytest.raises(io.CheckpointError, match="no model weights.*'epoch'"):
        io.load_state_dict(tmp_path / "meta.pt")


# ------------------------------------------------------------------------------------------ num classes


def test_infer_num_classes():
    assert io.infer_num_classes(small_state_dict()[1]) == 7
    sd = {"head.fc.weight": torch.zeros(10, 64), "head.fc.bias": torch.zeros(10), "se.fc1.weight": torch.zeros(4, 8)}
    assert io.infer_num_classes(sd) == 10  # the head wins over a later non-head linear
    assert io.infer_num_classes({"classifier.1.weight": torch.zeros(12, 512, 1, 1)}) == 12  # 1x1 conv classifier
    assert io.infer_num_classes({"blocks.0.weight": torch.zeros(5, 3)}) == 5  # no head name: last linear
    assert io.infer_num_classes({"conv.weight": torch.zeros(8, 3, 3, 3)}) is None


# ------------------------------------------------------------------------------------------ architectures


def test_build_zoo_model():
    model = io.build_model("repvgg_digits", num_classes=3)
    assert not model.training
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert io.default_input_shape("repvgg_digits") == (1, 1, 8, 8)
    assert "repvgg_digits" in io.zoo_names()


def test_unknown_zoo_model_suggests():
    with pytest.raises(io.UnknownArchError, match="Did you mean repvgg_a0.*reparam list"):
        io.build_model("repvgg_a00")
    with pytest.raises(io.UnknownArchError, match="unknown architecture source 'keras'"):
        io.build_model("keras:resnet")
    with pytest.raises(io.UnknownArchError, match="missing model name"):
        io.build_model("timm:")


def test_build_timm_and_torchvision_models():
    pytest.importorskip("timm")
    model = io.build_model("timm:test_byobnet", num_classes=5)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert io.default_input_shape("timm:test_byobnet", model) == (1, 3, 160, 160)
    with pytest.raises(io.UnknownArchError, match="Did you mean timm:test_byobnet"):
        io.build_model("timm:test_byobnett")
    pytest.importorskip("torchvision")
    model = io.build_model("torchvision:squeezenet1_0", num_classes=4)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    assert io.default_input_shape("torchvision:squeezenet1_0", model) is None
    with pytest.raises(io.UnknownArchError, match="torchvision.models.list_models"):
        io.build_model("torchvision:no_such_net")


def test_missing_third_party_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(io.UnknownArchError, match="timm is not installed.*pip install timm"):
        io.build_model("timm:resnet18")


# -------------------------------------------------------------------------------------------- strictness


def test_load_strict_exact_and_tolerated():
    model, sd = small_state_dict()
    target, _ = small_state_dict()
    assert io.load_strict(target, sd) is target
    assert same(target.state_dict(), sd)
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # pre-0.4.1 checkpoints
    io.load_strict(small_state_dict()[0], old)
    lightning = {"model." + k: v for k, v in sd.items()}
    target = small_state_dict()[0]
    io.load_strict(target, lightning)
    assert same(target.state_dict(), sd)


def test_load_strict_names_the_mismatch():
    model, sd = small_state_dict()
    sd = dict(sd)
    del sd["0.weight"], sd["1.bias"], sd["1.running_mean"], sd["1.running_var"]
    sd["extra.weight"] = torch.zeros(1)
    sd["3.weight"] = torch.zeros(9, 4)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(io.StateDictMismatchError) as info:
        io.load_strict(model, sd)
    err = info.value
    message = str(err)
    assert "4 missing keys (0.weight, 1.bias, 1.running_mean, ...)" in message
    assert "1 unexpected key (extra.weight)" in message
    assert "1 key of the wrong shape (3.weight: checkpoint [9, 4] vs model [7, 4])" in message
    assert message.endswith("Check the architecture and the number of classes")
    assert len(err.missing) == 4 and err.unexpected == ["extra.weight"] and err.mismatched[0][0] == "3.weight"
    assert same(model.state_dict(), fresh)  # nothing loaded on failure


# ---------------------------------------------------------------------------------------------- outputs


def test_check_output_path(tmp_path):
    source = tmp_path / "in.pt"
    source.write_bytes(b"x")
    assert io.check_output_path(tmp_path / "out.pt2", [source]) == tmp_path / "out.pt2"
    with pytest.raises(io.OutputPathError, match="is the input file"):
        io.check_output_path(source, [source])
    os.symlink(source, tmp_path / "link.pt")
    with pytest.raises(io.OutputPathError, match="is the input file"):
        io.check_output_path(tmp_path / "link.pt", [source])
    with pytest.raises(io.OutputPathError, match="is a directory"):
        io.check_output_path(tmp_path)
    with pytest.raises(io.OutputPathError, match="does not exist"):
        io.check_output_path(tmp_path / "missing" / "out.pt2")
    with pytest.raises(io.OutputPathError, match="not a directory"):
        io.check_output_path(source / "out.pt2")


def test_check_output_path_read_only(read_only_dir):
    with pytest.raises(io.OutputPathError, match="not writable"):
        io.check_output_path(read_only_dir / "out.pt2")
    with pytest.raises(io.OutputPathError, match="cannot write"):  # and a writer that gets there anyway
        io.atomic_write(read_only_dir / "out.pt2", lambda tmp: tmp.write_bytes(b"x"))
    assert list(read_only_dir.iterdir()) == []


def test_atomic_write_success_keeps_suffix_and_default_mode(tmp_path):
    seen = []

    def writer(tmp):
        seen.append(tmp)
        assert tmp.parent == tmp_path and tmp.suffix == ".pt2" and tmp != tmp_path / "out.pt2"
        tmp.write_text("data")
        return 42

    assert io.atomic_write(tmp_path / "out.pt2", writer) == 42
    assert (tmp_path / "out.pt2").read_text() == "data"
    assert not seen[0].exists()
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out.pt2").stat().st_mode & 0o777 == 0o666 & ~mask


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.pt2"
    target.write_text("previous")

    def writer(tmp):
        tmp.write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        io.atomic_write(target, writer)
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt2"]


def test_atomic_write_os_errors_become_output_errors(tmp_path):
    with pytest.raises(io.OutputPathError, match="cannot write"):
        io.atomic_write(tmp_path / "missing" / "out.pt2", lambda tmp: None)

    def full_disk(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(io.OutputPathError, match="No space left"):
        io.atomic_write(tmp_path / "out.pt2", full_disk)
    assert list(tmp_path.iterdir()) == []
