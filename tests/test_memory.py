"""Memory reused inside a fuse: glibc's malloc is told to keep freed blocks for the length of the outermost fuse and
put back to its defaults after; nothing is changed without glibc or when the user tunes malloc."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn

import reparam
import reparam.memory as memory


class FakeLibc:
    """Records the mallopt / malloc_trim calls made of it."""

    def __init__(self):
        self.calls: list = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


KEEP = [("mallopt", memory.M_MMAP_MAX, 0), ("mallopt", memory.M_TRIM_THRESHOLD, memory.KEPT_TRIM_THRESHOLD)]
RESTORE = [
    ("mallopt", memory.M_MMAP_MAX, memory.DEFAULT_MMAP_MAX),
    ("mallopt", memory.M_TRIM_THRESHOLD, memory.DEFAULT_TRIM_THRESHOLD),
    ("malloc_trim", 0),
]


def test_the_outermost_block_keeps_memory_and_restores_the_defaults(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_LIBC", libc)
    with memory.reused_memory():
        assert libc.calls == KEEP
        with memory.reused_memory():  # a fuse inside a fuse changes nothing more
            pass
        assert libc.calls == KEEP
    assert libc.calls == KEEP + RESTORE


def test_the_defaults_come_back_when_the_block_raises(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_LIBC", libc)
    with pytest.raises(RuntimeError), memory.reused_memory():
        raise RuntimeError("a fuse that fails")
    assert libc.calls == KEEP + RESTORE and memory._depth == 0


def test_a_fuse_runs_inside_the_block(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_LIBC", libc)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    reparam.fuse(model, torch.randn(1, 3, 8, 8))
    assert libc.calls == KEEP + RESTORE


@pytest.mark.parametrize("variable", ["MALLOC_ARENA_MAX", "GLIBC_TUNABLES"])
def test_a_user_tuned_malloc_is_left_alone(monkeypatch, variable):
    monkeypatch.setenv(variable, "2")
    assert memory._glibc() is None


def test_nothing_is_tuned_without_glibc(monkeypatch):
    monkeypatch.setattr(memory, "_LIBC", None)
    with memory.reused_memory():
        pass  # no C library calls at all: nothing to record, nothing raised
    monkeypatch.setattr(sys, "platform", "darwin")
    assert memory._glibc() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_glibc_is_found_on_linux(monkeypatch):
    for name in [k for k in __import__("os").environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name)
    libc = memory._glibc()
    if libc is None:
        pytest.skip("not glibc (musl or another C library)")
    assert libc.mallopt(memory.M_TRIM_THRESHOLD, memory.DEFAULT_TRIM_THRESHOLD) == 1
