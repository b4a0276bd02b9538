"""reparam.passes.inplace on small graphs: a zero pad of ``A(x)`` whose border is overwritten in place with
``A(0)`` becomes ``A(pad(x))`` (the official DBB's BNAndPadLayer), writes of the pad's own value are dropped, and
every write the pass cannot read functionally stays in place with its reason in the report."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reparam.passes.inplace import follow_inplace_writes

from .conftest import bn, conv, shape, traced


def sides(t, value, p: int, nd: int) -> None:
    """Overwrite the whole ``p``-wide border of every spatial axis with ``value``."""
    for axis in range(nd):
        for part in (slice(0, p), slice(-p, None)):
            index = [slice(None)] * (2 + nd)
            index[2 + axis] = part
            t[tuple(index)] = value


class BorderWrite(nn.Module):
    """``t = F.pad(source(x), p)``, then ``write(t, border, x)``; ``border`` is ``source(0)`` per channel."""

    def __init__(self, write=None, nd=2, p=1, source="bn"):
        super().__init__()
        self.nd, self.p, self.source = nd, p, source
        self.bn = bn(4, nd)
        self.conv = conv(nd, 4, 4, 3 if source == "conv3" else 1, 1, 1 if source == "conv3" else 0)
        self.write = write or (lambda t, c, x: sides(t, c, p, nd))

    def border(self):
        """``source(0)`` per channel, spelled as the official DBB spells BN(0)."""
        if self.source in ("conv1", "conv3"):
            return self.conv.bias.reshape(1, -1, *[1] * self.nd)
        bn_ = self.bn
        value = bn_.bias.detach() - bn_.running_mean * bn_.weight.detach() / torch.sqrt(bn_.running_var + bn_.eps)
        return value.reshape(1, -1, *[1] * self.nd)

    def forward(self, x):
        if self.source == "relu":
            y = torch.relu(x)
        elif self.source.startswith("conv"):
            y = self.conv(x)
        else:
            y = self.bn(x)
        t = F.pad(y, [self.p] * (2 * self.nd))
        self.write(t, self.border(), x)
        return t


def writes(case) -> int:
    return case.functions().count(operator.setitem)


@pytest.mark.parametrize("nd,p,source", [(2, 1, "bn"), (2, 2, "bn"), (1, 1, "bn"), (3, 1, "bn"), (2, 1, "conv1")])
def test_a_border_written_with_the_op_at_zero_becomes_a_pad_of_its_input(nd, p, source):
    case = traced(BorderWrite(nd=nd, p=p, source=source), torch.randn(shape(nd, 4, size=5)))
    assert writes(case) == 2 * nd
    assert bool(case.run(follow_inplace_writes))
    assert writes(case) == 0
    (pad,) = [n for n in case.nodes("call_function") if n.target is F.pad]
    assert pad.args[0].op == "placeholder"  # the pad reads x now; the op reads the pad
    assert [u.op for u in pad.users] == ["call_module"]
    assert case.events == {"inplace_pad": 1}
    case.assert_exact()


def test_writes_of_the_pad_value_are_dropped():
    case = traced(BorderWrite(lambda t, c, x: sides(t, 0.0, 1, 2)), torch.randn(2, 4, 5, 6))
    assert bool(case.run(follow_inplace_writes))
    assert writes(case) == 0 and F.pad in case.functions()
    assert case.report.rewrites[0].after == "redundant writes of the pad value"
    case.assert_exact()


def _copied(t, c, x):
    """The border written through views: ``t[box].copy_(c)``, and a zero ``t[box].zero_()`` corner on top."""
    t[:, :, :1, :].copy_(c)
    t[:, :, -1:, :].copy_(c)
    t[..., :1].copy_(c)
    t[..., -1:].copy_(c)


def test_border_writes_through_views_are_read_the_same_way():
    case = traced(BorderWrite(_copied), torch.randn(2, 4, 5, 6))
    assert "copy_" in case.methods()
    assert bool(case.run(follow_inplace_writes))
    assert "copy_" not in case.methods() and operator.getitem not in case.functions()
    assert case.events == {"inplace_pad": 1}
    case.assert_exact()


def test_zeroed_and_filled_borders_of_a_zero_pad_are_redundant():
    def write(t, c, x):
        t[:, :, :1, :].zero_()
        t[:, :, -1:, :].fill_(0.0)

    case = traced(BorderWrite(write), torch.randn(2, 4, 5, 6))
    assert bool(case.run(follow_inplace_writes))
    assert not {"zero_", "fill_"} & set(case.methods())
    assert case.report.rewrites[0].after == "redundant writes of the pad value"
    case.assert_exact()


def _top(t, c, x):
    t[:, :, :1, :] = c


def _shifted(t, c, x):
    sides(t, c + 1.0, 1, 2)


def _two_values(t, c, x):
    sides(t, c, 1, 2)
    t[:, :, :1, :] = 2.0 * c


def _into_data(t, c, x):
    t[:, :, 1:3, :] = c


def _one_channel(t, c, x):
    t[:, :1, :1, :] = 0.5


def _stepped(t, c, x):
    t[:, :, ::2, :] = c


def _integer_index(t, c, x):
    t[:, 0] = 1.0


def _from_input(t, c, x):
    t[:, :, :1, :] = x.mean()


def _input_sized(t, c, x):
    t[:, :, : x.size(2) // 4, :] = c


def _read_first(t, c, x):
    t.sum()
    sides(t, c, 1, 2)


def _spatial_value(t, c, x):
    t[:, :, :1, 2:6] = c.reshape(1, 1, 1, 4)  # four numbers along the width


@pytest.mark.parametrize(
    "write,source,reason",
    [
        (_top, "bn", "the writes cover only part of the border"),
        (_shifted, "bn", "the border value differs from what bn gives at zero input"),
        (_two_values, "bn", "the border is written with different values"),
        (_into_data, "bn", "a write reaches into the padded data"),
        (_one_channel, "bn", "a border write does not span every sample and channel"),
        (_stepped, "bn", "the write's slice has a step"),
        (_integer_index, "bn", "the write's index is not basic slicing"),
        (_from_input, "bn", "the written value is computed from the input"),
        (_input_sized, "bn", "the write's slice bounds are computed from the input"),
        (_read_first, "bn", "reads pad before it is written in place"),
        (_spatial_value, "bn", "the written value is not constant per channel"),
        (None, "conv3", "comes from a 3x3 conv 4->4, which is not pointwise"),
        (lambda t, c, x: sides(t, 1.0, 1, 2), "relu", "the padded tensor is not an affine op's output"),
    ],
)
def test_a_write_no_rule_proves_stays_in_place_with_the_reason(write, source, reason):
    case = traced(BorderWrite(write, source=source), torch.randn(2, 4, 5, 6))
    before = writes(case)
    assert not case.run(follow_inplace_writes)
    assert writes(case) == before
    assert case.refused("in-place write kept: ") and case.refused(reason), case.reasons
    case.assert_exact()


def test_a_write_into_a_tensor_the_graph_did_not_create_is_kept():
    class IntoInput(nn.Module):
        def forward(self, x):
            x[:, :, :1] = 0.0
            return x * 2.0

    case = traced(IntoInput(), torch.randn(2, 4, 5, 6))
    assert not case.run(follow_inplace_writes)
    assert writes(case) == 1
    assert case.refused("x is written in place but may share storage with a tensor read elsewhere")
    case.assert_exact()


def test_a_write_into_another_fresh_tensor_has_no_rule():
    class IntoProduct(nn.Module):
        def forward(self, x):
            t = x * 2.0
            t[:, :, :1] = 0.0
            return t

    case = traced(IntoProduct(), torch.randn(2, 4, 5, 6))
    assert not case.run(follow_inplace_writes)
    assert case.refused("no rule reads such writes (only pad borders)")
    case.assert_exact()


def test_an_op_updated_in_place_after_the_pad_is_not_moved():
    class Updated(BorderWrite):
        def forward(self, x):
            y = self.bn(x)
            t = F.pad(y, [1, 1, 1, 1])
            sides(t, self.border(), 1, 2)
            y.add_(1.0)
            return t + y.mean()

    case = traced(Updated(), torch.randn(2, 4, 5, 6))
    assert not case.run(follow_inplace_writes)
    assert case.refused("the padded tensor, is updated in place")
    case.assert_exact()


def test_without_shapes_the_writes_stay():
    case = traced(BorderWrite(), torch.randn(2, 4, 5, 6), shapes=False)
    assert not case.run(follow_inplace_writes)
    assert writes(case) == 4
    assert case.refused("its shape is unknown")
    case.assert_exact()
