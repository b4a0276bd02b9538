"""reparam.passes.mutation: which readers are real, which nodes update in place, which storages such updates
write (through views), which readers a pass must not move, and dead-code elimination that keeps updates someone
still observes."""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from reparam.passes.mutation import (
    eliminate_dead_code,
    is_metadata_user,
    mutation_barriers,
    real_users,
    updated_storage,
    updates_in_place,
)

from .conftest import Lambda, traced


def node(case, name: str):
    return next(n for n in case.gm.graph.nodes if n.name == name)


def test_metadata_reads_are_not_real_users():
    def forward(s, x):
        y = s.conv(x)
        return y * y.dim() + y.ndim, y.shape

    case = traced(Lambda(forward, conv=nn.Conv2d(3, 3, 1)), torch.randn(1, 3, 2, 2))
    y = node(case, "conv")
    readers = {u.name: is_metadata_user(u) for u in y.users}
    assert readers == {"dim": True, "getattr_1": True, "mul": False, "getattr_2": False}  # .shape is a size
    assert {u.name for u in real_users(y)} == {"mul", "getattr_2"}


def test_in_place_updates_are_recognised():
    def forward(s, x):
        a = x * 1.0
        a.add_(1.0)
        a = a + 1.0  # (``a += 1.0`` traces as this too)
        a[:, :1] = 0.0
        b = F.relu(a, inplace=True)
        c = s.relu(b)
        return c.sigmoid() + a.clamp(0.0)

    case = traced(Lambda(forward, relu=nn.ReLU(inplace=True)), torch.randn(2, 3))
    modules = dict(case.gm.named_modules())
    writes = sorted(n.name for n in case.gm.graph.nodes if updates_in_place(n, modules))
    assert writes == ["add_", "relu", "relu_1", "setitem"]


def test_updates_through_a_view_mark_the_whole_storage():
    def forward(s, x):
        y = s.conv(x)
        z = s.conv2(x)
        v = y.view(-1)
        v.mul_(2.0)
        return y + z

    case = traced(Lambda(forward, conv=nn.Conv2d(3, 3, 1), conv2=nn.Conv2d(3, 3, 1)), torch.randn(1, 3, 2, 2))
    assert {n.name for n in updated_storage(case.gm)} == {"conv", "view", "mul_"}


def test_a_reader_after_an_update_is_a_barrier_and_a_reader_before_is_free():
    """The module docstring's example: ``z = y.add_(1); y.mul_(2); bn(z)`` reads what ``mul_`` wrote."""

    def forward(s, x):
        y = s.conv(x)
        early = s.bn(y)
        z = y.add_(1.0)
        y.mul_(2.0)
        return early + s.bn2(z)

    case = traced(
        Lambda(forward, conv=nn.Conv2d(3, 3, 1), bn=nn.BatchNorm2d(3), bn2=nn.BatchNorm2d(3)), torch.randn(1, 3, 2, 2)
    )
    found = mutation_barriers(case.gm)
    assert "bn2" in {n.name for n in found.barriers} and "bn" not in {n.name for n in found.barriers}
    assert {n.name for n in found.shared} >= {"conv", "add_", "mul_"}


def test_the_usual_relu_in_place_after_a_conv_is_no_barrier():
    case = traced(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(inplace=True), nn.BatchNorm2d(3)), torch.randn(1, 3, 2, 2))
    found = mutation_barriers(case.gm)
    assert not found.barriers and not found.shared


def test_dead_code_elimination_keeps_updates_someone_observes():
    def forward(s, x):
        y = x * 2.0
        dead = y + 1.0  # noqa: F841 - nobody reads it
        y.mul_(3.0)  # result unused, but y is read below
        x.add_(1.0)  # writes the caller's tensor
        return y

    case = traced(Lambda(forward), torch.randn(2, 3))
    assert eliminate_dead_code(case.gm)
    assert [n.name for n in case.gm.graph.nodes if n.op != "placeholder" and n.op != "output"] == [
        "mul",
        "mul_",
        "add_",
    ]
    assert operator.add not in case.functions()
    case.assert_exact()


def test_an_update_kept_for_a_dead_reader_goes_once_that_reader_has_gone():
    def forward(s, x):
        y = x * 2.0
        view = y[0]
        dead = view + 1.0  # noqa: F841 - reads y's storage before the update, but nobody reads it
        y.add_(1.0)  # result unused; kept while the dead reader is there (the sweep reaches it first)
        return x * 3.0

    case = traced(Lambda(forward), torch.randn(2, 3))
    assert eliminate_dead_code(case.gm)
    assert [n.op for n in case.gm.graph.nodes] == ["placeholder", "call_function", "output"]
    case.assert_exact()
