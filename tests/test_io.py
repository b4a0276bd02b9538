"""reparam.io: output paths checked up front, atomic writes of files and directories."""

import os

import pytest

from reparam import errors, io


# ---------------------------------------------------------------------------------------------- outputs


def test_check_output_path(tmp_path):
    source = tmp_path / "in.pt"
    source.write_bytes(b"x")
    assert io.check_output_path(tmp_path / "out.pt2", [source]) == tmp_path / "out.pt2"
    with pytest.raises(errors.OutputPathError, match="is the input file"):
        io.check_output_path(source, [source])
    os.symlink(source, tmp_path / "link.pt")
    with pytest.raises(errors.OutputPathError, match="is the input file"):
        io.check_output_path(tmp_path / "link.pt", [source])
    with pytest.raises(errors.OutputPathError, match="is a directory"):
        io.check_output_path(tmp_path)
    with pytest.raises(errors.OutputPathError, match="does not exist"):
        io.check_output_path(tmp_path / "missing" / "out.pt2")
    with pytest.raises(errors.OutputPathError, match="not a directory"):
        io.check_output_path(source / "out.pt2")


def test_check_output_path_read_only(read_only_dir):
    with pytest.raises(errors.OutputPathError, match="not writable"):
        io.check_output_path(read_only_dir / "out.pt2")
    with pytest.raises(errors.OutputPathError, match="cannot write"):  # and a writer that gets there anyway
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
    with pytest.raises(errors.OutputPathError, match="cannot write"):
        io.atomic_write(tmp_path / "missing" / "out.pt2", lambda tmp: None)

    def full_disk(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(errors.OutputPathError, match="No space left"):
        io.atomic_write(tmp_path / "out.pt2", full_disk)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_dir_replaces_a_directory_whole(tmp_path):
    target = tmp_path / "m.mlpackage"
    (target / "old").mkdir(parents=True)

    def writer(staged):
        assert staged.name == target.name and staged.parent.parent == tmp_path
        (staged / "Data").mkdir(parents=True)
        (staged / "Manifest.json").write_text("{}")
        return 7

    assert io.atomic_write_dir(target, writer) == 7
    assert sorted(p.name for p in target.iterdir()) == ["Data", "Manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage"]  # no staging left


def test_atomic_write_dir_failure_keeps_the_old_directory(tmp_path):
    target = tmp_path / "m.mlpackage"
    (target / "old").mkdir(parents=True)

    def writer(staged):
        staged.mkdir()
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        io.atomic_write_dir(target, writer)
    assert [p.name for p in target.iterdir()] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage"]

    def full_disk(staged):
        raise OSError(28, "No space left on device")

    with pytest.raises(errors.OutputPathError, match="No space left"):
        io.atomic_write_dir(target, full_disk)
    with pytest.raises(errors.OutputPathError, match="cannot write"):
        io.atomic_write_dir(tmp_path / "missing" / "m.mlpackage", lambda staged: None)
