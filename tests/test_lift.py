"""reparam.lift: what each supported node lifts to (the Unary / Sum / Concat and its Affine's fields), and the
reason a node is not lifted (``NotAffine``) or a lift is refused (``affine.Refusal``).

The algebra itself (compose, add, ...) is tested in test_affine.py; here only the lifting layer: which tensors and
hyper-parameters a node hands to the algebra, read off small traced models.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reparam.affine as A
from conftest import random_bn
from passes.conftest import Lambda, Lambda2, traced
from reparam.lift import Concat, Constants, Lifter, NotAffine, Sum, Unary

pytestmark = pytest.mark.usefixtures("single_thread")

X4 = (2, 4, 5, 6)


def lifted(forward, *inputs, node: str | None = None, shapes: bool = True, **modules):
    """Lift the output node (or the node named ``node``) of ``Lambda(forward, **modules)`` traced on ``inputs``."""
    model = Lambda(forward, **modules) if len(inputs) == 1 else Lambda2(forward, **modules)
    case = traced(model, *(torch.randn(s) if isinstance(s, tuple) else s for s in inputs), shapes=shapes)
    graph = case.gm.graph
    target = (
        next(n for n in graph.nodes if n.op == "output").args[0]
        if node is None
        else next(n for n in graph.nodes if n.name == node)
    )
    return Lifter(case.gm, Constants(case.gm)).lift(target)


def placeholder(op) -> str:
    return op.source.name


def kind(k) -> str:
    """An op's or affine's kind as a lower-case word (plain string or enum member)."""
    return k if isinstance(k, str) else k.name.lower()


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


# ------------------------------------------------------------------------------------------------ modules


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_module(nd):
    layer = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd](4, 6, 3, stride=2, padding=1, dilation=2, groups=2)
    op = lifted(lambda s, x: s.conv(x), (2, 4) + (7,) * nd, conv=layer)
    assert isinstance(op, Unary) and kind(op.kind) == "conv" and placeholder(op) == "x"
    a = op.affine
    assert (a.stride, a.pad_lo, a.pad_hi, a.dilation) == ((2,) * nd, (1,) * nd, (1,) * nd, (2,) * nd)
    assert a.groups == 2 and a.layout == A.Layout(nd) and a.padding_mode == "zeros" and kind(a.kind) == "dense"
    assert a.weight.dtype == torch.float64 and torch.equal(a.weight, f64(layer.weight))
    assert torch.equal(a.bias, f64(layer.bias))


def test_conv_module_same_padding_and_padding_modes():
    even = lifted(lambda s, x: s.conv(x), X4, conv=nn.Conv2d(4, 4, (2, 4), padding="same", bias=False)).affine
    assert (even.pad_lo, even.pad_hi) == ((0, 1), (1, 2))  # the odd pixel on the high side
    assert even.bias is None
    reflect = lifted(lambda s, x: s.conv(x), X4, conv=nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")).affine
    assert reflect.padding_mode == "reflect"
    unpadded = lifted(lambda s, x: s.conv(x), X4, conv=nn.Conv2d(4, 4, 3, padding_mode="reflect")).affine
    assert unpadded.padding_mode == "zeros"  # no padding read: the mode does not matter


def test_bn_module_hands_its_statistics_to_the_algebra():
    norm = random_bn(nn.BatchNorm2d(4, eps=1e-3))
    op = lifted(lambda s, x: s.bn(x), X4, bn=norm)
    assert kind(op.kind) == "batchnorm" and kind(op.affine.kind) == "diagonal"
    want = A.batchnorm(
        *(f64(t) for t in (norm.running_mean, norm.running_var, norm.weight, norm.bias)), 1e-3, A.Layout(2)
    )
    torch.testing.assert_close(op.affine.weight, want.weight, rtol=0, atol=0)
    torch.testing.assert_close(op.affine.bias, want.bias, rtol=0, atol=0)


@pytest.mark.parametrize("shape,nd", [((4, 5), 0), ((2, 5, 7), 1)])
def test_bn1d_layout_follows_the_input_rank(shape, nd):
    op = lifted(lambda s, x: s.bn(x), shape, bn=random_bn(nn.BatchNorm1d(5)))
    assert op.affine.layout == A.Layout(nd)


def test_bn_without_affine_parameters_is_a_pure_normalisation():
    norm = random_bn(nn.BatchNorm2d(4, affine=False))
    op = lifted(lambda s, x: s.bn(x), X4, bn=norm)
    torch.testing.assert_close(op.affine.weight.reshape(-1), torch.rsqrt(f64(norm.running_var) + norm.eps))


def test_linear_module_is_channels_last():
    layer = nn.Linear(5, 3)
    op = lifted(lambda s, x: s.lin(x), (2, 7, 5), lin=layer)
    assert kind(op.kind) == "linear" and op.affine.layout.channels_last
    assert torch.equal(op.affine.weight, f64(layer.weight)) and torch.equal(op.affine.bias, f64(layer.bias))


def test_avg_pool_module_is_a_depthwise_mean():
    op = lifted(lambda s, x: s.pool(x), X4, pool=nn.AvgPool2d(3, 2, 1))
    a = op.affine
    assert kind(op.kind) == "avgpool" and a.groups == 4 and a.kernel == (3, 3)
    assert a.stride == (2, 2) and a.pad_lo == a.pad_hi == (1, 1)
    assert torch.equal(a.weight, torch.full((4, 1, 3, 3), 1 / 9, dtype=torch.float64))
    assert lifted(lambda s, x: s.pool(x), X4, pool=nn.AvgPool2d(2)).affine.stride == (2, 2)  # stride: the kernel


def test_zero_pad_module_keeps_each_axis_lo_and_hi():
    op = lifted(lambda s, x: s.pad(x), X4, pad=nn.ZeroPad2d((1, 2, 3, 4)))  # left, right, top, bottom
    assert kind(op.kind) == "pad" and kind(op.affine.kind) == "pad"
    assert (op.affine.pad_lo, op.affine.pad_hi) == ((3, 1), (4, 2))


@pytest.mark.parametrize("module", [nn.Identity(), nn.Dropout(0.3), nn.Dropout2d(0.3), nn.AlphaDropout(0.2)])
def test_identity_and_eval_dropout_modules_are_the_identity(module):
    op = lifted(lambda s, x: s.m(x), X4, m=module)
    assert kind(op.kind) == "identity" and op.affine is None and placeholder(op) == "x"


def test_module_refusals():
    with pytest.raises(NotAffine, match="ReLU is not affine"):
        lifted(lambda s, x: s.m(x), X4, m=nn.ReLU())
    with pytest.raises(NotAffine, match="constant padding with a non-zero value"):
        lifted(lambda s, x: s.m(x), X4, m=nn.ConstantPad2d(1, 0.5))
    with pytest.raises(NotAffine, match="module call with extra arguments"):
        lifted(lambda s, x, y: s.m(x, y), (2, 3), (2, 3), m=nn.Bilinear(3, 3, 2))
    with pytest.raises(A.Refusal, match="track_running_stats=False"):
        lifted(lambda s, x: s.m(x), X4, m=nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(A.Refusal, match="count_include_pad=False is not a fixed kernel on the border"):
        lifted(lambda s, x: s.m(x), X4, m=nn.AvgPool2d(3, 1, 1, count_include_pad=False))
    with pytest.raises(NotAffine, match="average pool with ceil_mode=True has a partial border window"):
        lifted(lambda s, x: s.m(x), X4, m=nn.AvgPool2d(2, ceil_mode=True))
    with pytest.raises(NotAffine, match="uninitialised lazy conv"):
        lifted(lambda s, x: s.m(x), X4, m=nn.LazyConv2d(4, 1), shapes=False)


def test_bn_module_in_training_mode_is_not_affine():
    case = traced(Lambda(lambda s, x: s.bn(x), bn=nn.BatchNorm2d(4)), torch.randn(X4))
    case.gm.bn.train()
    output = next(n for n in case.gm.graph.nodes if n.op == "output").args[0]
    with pytest.raises(NotAffine, match="BatchNorm in training mode"):
        Lifter(case.gm, Constants(case.gm)).lift(output)


# ------------------------------------------------------------------------------------------------ functions


class Weights(nn.Module):
    """Parameters for functional calls: a conv weight ``w`` (6, 2, 3, 3), its bias ``b``, BN statistics."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 2, 3, 3))
        self.b = nn.Parameter(torch.randn(6))
        self.mean, self.var = nn.Parameter(torch.randn(4)), nn.Parameter(torch.rand(4) + 0.5)
        self.lin = nn.Parameter(torch.randn(3, 6))


def test_functional_conv_reads_its_constant_arguments():
    op = lifted(lambda s, x: F.conv2d(x, s.p.w, s.p.b, 2, 1, 1, 2), X4, p=Weights())
    a = op.affine
    assert kind(op.kind) == "conv" and a.groups == 2 and a.stride == (2, 2) and a.pad_lo == (1, 1)
    assert a.out_channels == 6 and a.in_channels == 4


def test_functional_conv_of_a_computed_weight_folds_the_weight():
    """Weight standardisation: a weight computed from parameters is a constant too."""
    p = Weights()
    op = lifted(lambda s, x: F.conv2d(x, s.p.w / s.p.w.norm(), None, 1, 0, 1, 2), X4, p=p)
    torch.testing.assert_close(op.affine.weight, f64(p.w / p.w.norm()), rtol=0, atol=0)
    assert op.affine.bias is None


def test_functional_batch_norm_linear_avg_pool_pad_dropout():
    p = Weights()
    bn = lifted(lambda s, x: F.batch_norm(x, s.p.mean, s.p.var, None, None, False, 0.1, 1e-3), X4, p=p)
    torch.testing.assert_close(bn.affine.weight.reshape(-1), torch.rsqrt(f64(p.var) + 1e-3))
    linear = lifted(lambda s, x: F.linear(x, s.p.lin), (2, 6), p=p)
    assert kind(linear.kind) == "linear" and linear.affine.weight.shape == (3, 6) and linear.affine.bias is None
    pool = lifted(lambda s, x: F.avg_pool2d(x, 2, 1), X4)
    assert kind(pool.kind) == "avgpool" and pool.affine.stride == (1, 1)
    pad = lifted(lambda s, x: F.pad(x, [1, 2]), X4)
    assert (pad.affine.pad_lo, pad.affine.pad_hi) == ((0, 1), (0, 2))  # only the last axis
    assert kind(lifted(lambda s, x: F.dropout(x, 0.5, False), X4).kind) == "identity"


def test_functional_refusals():
    p = Weights()
    with pytest.raises(NotAffine, match="conv weight is computed from the input"):
        lifted(lambda s, x, w: F.conv2d(x, w), (2, 2, 5, 5), (3, 2, 1, 1))
    with pytest.raises(NotAffine, match="an operand is a constant"):  # a conv of parameters alone is left alone
        lifted(
            lambda s, x: F.conv2d(s.c.v, s.p.w, None, 1, 0, 1, 2) + x,
            (2, 6, 3, 4),
            node="conv2d",
            p=p,
            c=_holder(torch.randn(2, 4, 5, 6)),
        )
    with pytest.raises(A.Refusal, match=r"training=True"):
        lifted(lambda s, x: F.batch_norm(x, s.p.mean, s.p.var, training=True), X4, p=p)
    with pytest.raises(NotAffine, match=r"BatchNorm input rank unknown \(no shapes\)"):
        lifted(lambda s, x: F.batch_norm(x, s.p.mean, s.p.var), X4, p=p, shapes=False)
    with pytest.raises(NotAffine, match="average pool with divisor_override"):
        lifted(lambda s, x: F.avg_pool2d(x, 2, divisor_override=3), X4)
    with pytest.raises(NotAffine, match="average pool input shape unknown"):
        lifted(lambda s, x: F.avg_pool2d(x, 2), X4, shapes=False)
    with pytest.raises(NotAffine, match="padding reaches the channel or batch axis"):
        lifted(lambda s, x: F.pad(x, [1] * 6), X4)
    with pytest.raises(NotAffine, match="padding is not a constant zero pad"):
        lifted(lambda s, x: F.pad(x, [1] * 4, mode="reflect"), X4)
    with pytest.raises(NotAffine, match="pad input rank unknown"):
        lifted(lambda s, x: F.pad(x, [1, 1]), (2, 5))
    with pytest.raises(A.Refusal, match="negative padding"):
        lifted(lambda s, x: F.pad(x, [-1, 1]), X4)
    with pytest.raises(NotAffine, match="dropout in training mode"):
        lifted(lambda s, x: F.dropout(x, 0.5, True), X4)
    with pytest.raises(NotAffine, match="relu is not affine"):
        lifted(lambda s, x: F.relu(x), X4)
    with pytest.raises(NotAffine, match=r"\.relu\(\) is not affine"):
        lifted(lambda s, x: x.relu(), X4)


# ------------------------------------------------------------------------------------------------ arithmetic


@pytest.mark.parametrize(
    "forward,terms",
    [
        (lambda s, x, y: x + y, [("x", 1.0), ("y", 1.0)]),
        (lambda s, x, y: x - y, [("x", 1.0), ("y", -1.0)]),
        (lambda s, x, y: torch.add(x, y, alpha=2), [("x", 1.0), ("y", 2.0)]),
        (lambda s, x, y: torch.sub(x, y, alpha=3), [("x", 1.0), ("y", -3.0)]),
        (lambda s, x, y: x.add(y), [("x", 1.0), ("y", 1.0)]),
    ],
)
def test_sums_of_two_tensors(forward, terms):
    op = lifted(forward, X4, X4)
    assert isinstance(op, Sum) and [(t.name, c) for t, c in op.terms] == terms


@pytest.mark.parametrize(
    "forward,scale,shift",
    [
        (lambda s, x: x + 1.5, 1.0, 1.5),
        (lambda s, x: 1.5 - x, -1.0, 1.5),
        (lambda s, x: x - 2, 1.0, -2.0),
        (lambda s, x: x * 3, 3.0, 0.0),
        (lambda s, x: 3 * x, 3.0, 0.0),
        (lambda s, x: x / 4, 0.25, 0.0),
        (lambda s, x: -x, -1.0, 0.0),
        (lambda s, x: x.neg(), -1.0, 0.0),
        (lambda s, x: x.mul(0.5), 0.5, 0.0),
        (lambda s, x: x * s.c.v[:1], 0.75, 0.0),  # a one-element tensor is a number
    ],
)
def test_scalar_scale_and_shift(forward, scale, shift):
    op = lifted(forward, X4, c=_holder(torch.tensor([0.75, 2.0]), buffer=True))
    assert isinstance(op, Unary) and op.affine is None and placeholder(op) == "x"
    assert kind(op.kind) in ("scale", "shift")
    assert op.scale == scale and op.shift == shift


@pytest.mark.parametrize("shape,input_shape,nd", [((1, 4, 1, 1), X4, 2), ((4, 1, 1), X4, 2), ((4,), (2, 7, 4), 0)])
def test_per_channel_constants_become_channelwise_affines(shape, input_shape, nd):
    scale, shift = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    mul = lifted(lambda s, x: x * s.c.v, input_shape, c=_holder(scale))
    assert kind(mul.kind) == "scale" and mul.affine.layout == A.Layout(nd) and kind(mul.affine.kind) == "diagonal"
    assert torch.equal(mul.affine.weight.reshape(-1), scale.reshape(-1)) and mul.affine.bias is None
    add = lifted(lambda s, x: x + s.c.v, input_shape, c=_holder(shift))
    assert kind(add.kind) == "shift" and torch.equal(add.affine.bias, shift.reshape(-1))
    assert torch.equal(add.affine.weight.reshape(-1), torch.ones(shift.numel(), dtype=torch.float64))


def _holder(value: torch.Tensor, buffer: bool = False) -> nn.Module:
    """A submodule holding ``value`` as its parameter (or buffer) ``v``, read in a forward as ``s.c.v``."""
    holder = nn.Module()
    if buffer:
        holder.register_buffer("v", value)
    else:
        holder.register_parameter("v", nn.Parameter(value))
    return holder


def test_arithmetic_refusals():
    with pytest.raises(NotAffine, match="product of two tensors"):
        lifted(lambda s, x, y: x * y, X4, X4)
    with pytest.raises(NotAffine, match="no tensor operand"):
        lifted(lambda s, x: 2.0 / x, X4)
    with pytest.raises(NotAffine, match="rounding division"):
        lifted(lambda s, x: torch.div(x, 2, rounding_mode="floor"), X4)
    with pytest.raises(NotAffine, match="constant varies along a non-channel axis"):
        lifted(lambda s, x: x * s.c.v, X4, c=_holder(torch.randn(1, 1, 5, 1)))
    with pytest.raises(NotAffine, match="constant is not per-channel"):
        lifted(lambda s, x: x * s.c.v, X4, c=_holder(torch.randn(1, 4, 5, 1)))
    with pytest.raises(NotAffine, match="constant would broadcast the tensor"):
        lifted(lambda s, x: x * s.c.v, (2, 4), c=_holder(torch.randn(3, 1, 4)))
    with pytest.raises(NotAffine, match="operand is not a number or floating tensor"):
        lifted(lambda s, x: x * s.c.v, X4, c=_holder(torch.arange(4).reshape(1, 4, 1, 1), buffer=True))


def test_an_in_place_update_of_a_tensor_read_elsewhere_is_not_lifted():
    def forward(s, x):
        y = x * 1.0
        z = y.mul_(2.0)
        return z + y

    with pytest.raises(NotAffine, match="in-place update of a tensor that is read elsewhere"):
        lifted(forward, X4, node="mul_")


def test_concatenation():
    op = lifted(lambda s, x, y: torch.cat([x, y], 1), X4, X4)
    assert isinstance(op, Concat) and [n.name for n in op.sources] == ["x", "y"] and op.dim == 1
    assert lifted(lambda s, x, y: torch.cat((x, y), dim=-1), X4, X4).dim == -1
    with pytest.raises(NotAffine, match="concatenation of non-tensors"):
        lifted(lambda s, x: torch.cat([x, s.c.v], 1), X4, c=_holder(torch.randn(2, 1, 5, 6)))


# ------------------------------------------------------------------------------------------------ layout-only ops


def test_a_reshape_undone_later_is_a_channels_last_identity():
    """timm's ``bn(linear(x).flatten(0, 1)).reshape_as(x)``: both reshapes keep the last axis."""
    forward = lambda s, x: s.bn(s.lin(x).flatten(0, 1)).reshape_as(x)  # noqa: E731
    modules = dict(lin=nn.Linear(4, 4), bn=random_bn(nn.BatchNorm1d(4)))
    for node in ("flatten", "reshape_as"):
        op = lifted(forward, (2, 3, 4), node=node, **modules)
        assert kind(op.kind) == "identity" and op.affine.layout.channels_last and op.affine.out_channels == 4


def test_reshape_refusals():
    with pytest.raises(NotAffine, match="reshape changes the last axis"):
        lifted(lambda s, x: s.lin(x.reshape(2, -1)), (2, 3, 4), node="reshape", lin=nn.Linear(12, 2))
    with pytest.raises(NotAffine, match="reshape is not undone by a later one"):
        lifted(lambda s, x: torch.relu(s.lin(x.flatten(0, 1))), (2, 3, 4), node="flatten", lin=nn.Linear(4, 4))
    with pytest.raises(NotAffine, match="reshape: shapes unknown"):
        lifted(lambda s, x: x.flatten(0, 1).reshape_as(x), (2, 3, 4), node="flatten", shapes=False)


def test_contiguous_is_the_identity_unless_a_view_follows():
    op = lifted(lambda s, x: x.contiguous() * 2.0, X4, node="contiguous")
    assert kind(op.kind) == "identity"
    with pytest.raises(NotAffine, match=r"\.contiguous\(\) before a view"):
        lifted(lambda s, x: x.contiguous().view(2, -1), X4, node="contiguous")


# ------------------------------------------------------------------------------------------------ constants


def test_constants_evaluate_parameter_only_subgraphs_and_nothing_random():
    def forward(s, x):
        w = s.p.w * 2.0 + 1.0
        noise = torch.randn_like(s.p.b)
        return F.conv2d(x, w, s.p.b + noise, 1, 0, 1, 2)

    p = Weights()
    case = traced(Lambda(forward, p=p), torch.randn(X4))
    const = Constants(case.gm)
    nodes = {n.name: n for n in case.gm.graph.nodes}
    torch.testing.assert_close(const(nodes["add"]), f64(p.w) * 2.0 + 1.0)
    assert const.is_constant(nodes["add"]) and not const.is_constant(nodes["randn_like"])
    assert not const.is_constant(nodes["add_1"]) and not const.is_constant(nodes["x"])
    with pytest.raises(NotAffine, match="conv weight is computed from the input"):
        Lifter(case.gm, const).lift(nodes["conv2d"])


def test_lift_rejects_what_is_not_a_call():
    case = traced(Lambda(lambda s, x: x), torch.randn(X4))
    (x,) = [n for n in case.gm.graph.nodes if n.op == "placeholder"]
    with pytest.raises(NotAffine, match="placeholder"):
        Lifter(case.gm, Constants(case.gm)).lift(x)
