"""Property tests of the algebra (reparam.affine) against eager PyTorch in float64.

Every operation is checked on drawn shapes: kernel sizes (non-square, even, 1xk / kx1), strides,
groups (incl. depthwise), dilation, symmetric and asymmetric (lo/hi) padding, odd / rectangular input
sizes, 1-D / 2-D / 3-D and the channels-last (Linear) layout.  The reference is always eager
PyTorch (``F.conv*``, ``nn.Conv*`` with its padding_mode, ``F.batch_norm``, ``F.avg_pool*``,
``F.pad``, ``F.linear``) or the composition of ``apply`` calls, never the formula under test.
Tolerance: relative L2 error <= 1e-10 in float64.
"""

from __future__ import annotations

import math
from dataclasses import replace
from unittest import mock
from functools import reduce

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from conftest import core_settings, kernel_of_shape, rel_err
from reparam import affine as A

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-10
F64 = torch.float64
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
MODULE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


def divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def close(got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> None:
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    err = rel_err(got, want)
    assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"


def assert_kind_consistent(a: A.Affine) -> None:
    """The symbolic ``kind`` must describe the weights: emitters trust it without looking at them
    (a "pad" is emitted as a bare ConstantPad, "identity" / "diagonal" as a channel affine)."""
    unit = (
        all(k == 1 for k in a.kernel) and all(s == 1 for s in a.stride) and a.groups == a.in_channels == a.out_channels
    )
    if a.kind in ("identity", "pad"):
        assert unit and a.bias_is_zero() and bool(torch.all(a.weight == 1)), f"{a.kind} that is not one"
    if a.kind == "identity":
        assert not a.pads
    if a.kind == "diagonal":
        assert unit and not a.pads


def apply_pad(a: A.Affine, lo: tuple, hi: tuple) -> A.Affine:
    """``a`` with its padding replaced by an asymmetric ``lo``/``hi`` (zeros)."""
    return replace(a, pad_lo=tuple(lo), pad_hi=tuple(hi))


def random_bn_affine(g, channels: int, layout: A.Layout, eps: float = 1e-5):
    mean = randn(g, channels)
    var = torch.rand(channels, generator=g, dtype=F64) * 1.5 + 0.5
    weight, bias = randn(g, channels), randn(g, channels)
    return A.batchnorm(mean, var, weight, bias, eps, layout), (mean, var, weight, bias, eps)


# ============================================================================================
# constructors + apply == eager PyTorch


@st.composite
def conv_case(draw, nd: int):
    """A conv module's hyper-parameters and an input size that it accepts."""
    kmax, nmax = (3, 6) if nd == 3 else (5, 11)
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    if draw(st.booleans()):  # depthwise
        groups, cin = cin, cin
        cout = cin * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if padding_kind == "same":
        stride = (1,) * nd
    else:
        stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    extent = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True))
    if padding_kind == "int":
        padding = draw(st.integers(0, 2))
        pads = (padding,) * nd
    elif padding_kind == "tuple":
        pads = padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
    elif padding_kind == "same":
        padding = "same"
        pads = tuple(e // 2 for e in extent)  # upper bound of either side
    else:
        padding, pads = "valid", (0,) * nd
    # size: the kernel must fit, and reflect/circular need pad < size
    size = tuple(max(e - 2 * p, p + 1, 1) + draw(st.integers(0, nmax - 4)) for e, p in zip(extent, pads, strict=True))
    bias = draw(st.booleans())
    return dict(
        cin=cin,
        cout=cout,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        mode=mode,
        bias=bias,
        size=size,
        seed=draw(st.integers(0, 2**31)),
    )


@pytest.mark.parametrize("nd", [1, 2, 3])
@given(data=st.data())
@core_settings(25)
def test_from_conv_apply_matches_conv_module(nd, data):
    c = data.draw(conv_case(nd))
    g = gen(c["seed"])
    m = MODULE[nd](
        c["cin"],
        c["cout"],
        c["kernel"],
        c["stride"],
        c["padding"],
        c["dilation"],
        c["groups"],
        bias=c["bias"],
        padding_mode=c["mode"],
    ).double()
    with torch.no_grad():
        m.weight.copy_(randn(g, *m.weight.shape))
        if m.bias is not None:
            m.bias.copy_(randn(g, *m.bias.shape))
    x = randn(g, 2, c["cin"], *c["size"])
    a = A.from_conv(
        m.weight.detach(),
        None if m.bias is None else m.bias.detach(),
        m.stride,
        m.padding,
        m.dilation,
        m.groups,
        m.padding_mode,
    )
    want = m(x)
    close(A.apply(a, x), want)
    assert a.out_size(c["size"]) == tuple(want.shape[2:])
    assert a.in_channels == c["cin"] and a.out_channels == c["cout"]


@pytest.mark.parametrize("kernel", [(2, 2), (4, 3), (2, 5), (1, 4)])
@pytest.mark.parametrize("dilation", [1, 2])
def test_same_padding_even_kernels_matches_pytorch(kernel, dilation):
    g = gen(0)
    w = randn(g, 3, 2, *kernel)
    x = randn(g, 1, 2, 7, 6)
    a = A.from_conv(w, None, 1, "same", dilation)
    close(A.apply(a, x), F.conv2d(x, w, None, 1, "same", dilation))


def test_same_padding_with_stride_refuses():
    with pytest.raises(A.Refusal, match="same"):
        A.from_conv(torch.zeros(2, 2, 3, 3, dtype=F64), None, 2, "same")


@given(
    seed=st.integers(0, 2**31),
    rank=st.integers(2, 4),
    cin=st.integers(1, 6),
    cout=st.integers(1, 6),
    bias=st.booleans(),
)
@core_settings(30)
def test_from_linear_apply_matches_linear(seed, rank, cin, cout, bias):
    g = gen(seed)
    w, b = randn(g, cout, cin), randn(g, cout) if bias else None
    x = randn(g, *([2, 3, 2][: rank - 1]), cin)
    a = A.from_linear(w, b)
    assert a.layout.channels_last and a.in_channels == cin and a.out_channels == cout
    close(A.apply(a, x), F.linear(x, w, b))


@pytest.mark.parametrize("nd", [0, 1, 2, 3])
@given(seed=st.integers(0, 2**31), channels=st.integers(1, 6), eps=st.sampled_from([1e-5, 1e-3, 0.1]))
@core_settings(10)
def test_identity_channelwise_batchnorm(nd, seed, channels, eps):
    g = gen(seed)
    layout = A.Layout(nd)
    x = randn(g, 2, channels) if nd == 0 else randn(g, 2, channels, *[5, 4, 3][:nd])
    ident = A.identity(channels, layout)
    assert ident.kind == "identity"
    close(A.apply(ident, x), x)
    scale, shift = randn(g, channels), randn(g, channels)
    view = (-1,) + (1,) * nd
    cw = A.channelwise(scale, shift, layout)
    assert cw.kind == "diagonal" and cw.groups == channels
    close(A.apply(cw, x), x * scale.reshape(view) + shift.reshape(view))
    close(A.apply(A.channelwise(scale, None, layout), x), x * scale.reshape(view))
    bn, (mean, var, w, b, eps) = random_bn_affine(g, channels, layout, eps)
    close(A.apply(bn, x), F.batch_norm(x, mean, var, w, b, False, 0.0, eps))
    # affine=False BatchNorm
    close(
        A.apply(A.batchnorm(mean, var, None, None, eps, layout), x),
        F.batch_norm(x, mean, var, None, None, False, 0.0, eps),
    )


@pytest.mark.parametrize("nd", [1, 2, 3])
@given(data=st.data())
@core_settings(25)
def test_avgpool_matches_count_include_pad(nd, data):
    kernel = tuple(data.draw(st.integers(1, 4)) for _ in range(nd))
    stride = data.draw(st.one_of(st.none(), st.tuples(*[st.integers(1, 3)] * nd)))
    padding = tuple(data.draw(st.integers(0, k // 2)) for k in kernel)
    size = tuple(k + data.draw(st.integers(0, 5)) for k in kernel)
    channels = data.draw(st.integers(1, 4))
    x = randn(gen(data.draw(st.integers(0, 2**31))), 2, channels, *size)
    a = A.avgpool(channels, kernel, stride, padding, A.Layout(nd))
    want = POOL[nd](x, kernel, stride, padding, ceil_mode=False, count_include_pad=True)
    close(A.apply(a, x), want)


@pytest.mark.parametrize("nd", [1, 2, 3])
@given(data=st.data())
@core_settings(25)
def test_zero_pad_matches_f_pad(nd, data):
    lo = tuple(data.draw(st.integers(0, 3)) for _ in range(nd))
    hi = tuple(data.draw(st.integers(0, 3)) for _ in range(nd))
    channels = data.draw(st.integers(1, 4))
    x = randn(gen(data.draw(st.integers(0, 2**31))), 2, channels, *[3, 4, 5][:nd])
    pads = []
    for low, high in zip(reversed(lo), reversed(hi), strict=True):
        pads += [low, high]
    a = A.zero_pad(channels, lo, hi, A.Layout(nd))
    close(A.apply(a, x), F.pad(x, pads))


def test_zero_pad_negative_refuses():
    with pytest.raises(A.Refusal, match="negative"):
        A.zero_pad(3, (0, -1), (0, 0), A.Layout(2))


# ============================================================================================
# parallel branches: add and concat


@st.composite
def branch(draw, g, nd: int, cin: int, cout: int, stride: tuple, right: tuple, allow_unit: bool):
    """One Affine branch on ``cin`` channels whose output grid is (stride, right)."""
    kinds = ["conv", "conv", "conv"]
    if allow_unit and cin == cout:
        kinds += ["identity", "channelwise", "bn", "pad0"]
    if cin == cout and all(r <= 0 for r in right) and len(set(stride)) == 1:
        kinds += ["avgpool"]
    kind = draw(st.sampled_from(kinds))
    layout = A.Layout(nd)
    if kind == "identity":
        return A.identity(cin, layout), kind
    if kind == "channelwise":
        return A.channelwise(randn(g, cin), randn(g, cin) if draw(st.booleans()) else None, layout), kind
    if kind == "bn":
        return random_bn_affine(g, cin, layout)[0], kind
    if kind == "pad0":  # F.pad(x, [0, 0, ...]): an identity that went through the pad constructor
        return A.zero_pad(cin, (0,) * nd, (0,) * nd, layout), kind
    if kind == "avgpool":
        # symmetric padding p with 2p - k + 1 == right per axis
        pads = tuple(draw(st.integers(max(0, -r), 2)) for r in right)
        kernel = tuple(2 * p + 1 - r for p, r in zip(pads, right, strict=True))
        return A.avgpool(cin, kernel, stride, pads, layout), kind
    common = math.gcd(cin, cout)
    groups = draw(st.sampled_from(divisors(common)))
    shape = draw(st.sampled_from(["kxk", "1xk", "kx1", "free"])) if nd >= 2 else "free"
    k = draw(st.integers(1, 5))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(nd)) if shape == "free" else kernel_of_shape(shape, k, nd)
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    extent = tuple(d * (kk - 1) + 1 for kk, d in zip(kernel, dilation, strict=True))
    # lo anywhere that keeps hi = right + extent - 1 - lo >= 0
    lo = tuple(draw(st.integers(0, max(0, r + e - 1))) for r, e in zip(right, extent, strict=True))
    hi = tuple(r + e - 1 - low for r, e, low in zip(right, extent, lo, strict=True))
    assume(all(h >= 0 for h in hi))
    w = randn(g, cout, cin // groups, *kernel)
    b = randn(g, cout) if draw(st.booleans()) else None
    a = A.from_conv(w, b, stride, 0, dilation, groups)
    return apply_pad(a, lo, hi), f"conv{kernel} d{dilation} g{groups} lo{lo} hi{hi}"


@st.composite
def parallel_case(draw, nd: int, same_out: bool):
    """Branches on one input with a common output grid; ``unit_ok`` cases add identity/BN branches."""
    g = gen(draw(st.integers(0, 2**31)))
    cin = draw(st.sampled_from([1, 2, 3, 4, 6]))
    unit_ok = draw(st.booleans())
    stride = (1,) * nd if unit_ok else tuple(draw(st.integers(1, 3)) for _ in range(nd))
    right = (0,) * nd if unit_ok else tuple(draw(st.integers(-1, 1)) for _ in range(nd))
    shared = cin if unit_ok or draw(st.booleans()) else draw(st.sampled_from([1, 2, 3, 4, 6]))
    branches, names = [], []
    for _ in range(draw(st.integers(1, 4))):
        cout = shared if same_out else draw(st.sampled_from([cin, 1, 2, 3, 4, 6]))
        a, name = draw(branch(g, nd, cin, cout, stride, right, unit_ok))
        branches.append(a)
        names.append(name)
    limit = 6 if nd == 3 else 10
    size = tuple(draw(st.integers(max(2, 2 - r), limit)) for r in right)
    x = randn(g, 2, cin, *size)
    return branches, names, x


@pytest.mark.parametrize("nd", [1, 2, 3])
@given(data=st.data())
@core_settings(40)
def test_add_of_branches_equals_sum_of_applies(nd, data):
    branches, names, x = data.draw(parallel_case(nd, same_out=True))
    assume(len({a.out_channels for a in branches}) == 1)
    merged = A.add(branches)
    want = sum(A.apply(a, x) for a in branches)
    close(A.apply(merged, x), want)
    assert_kind_consistent(merged)
    # the merged conv keeps the coarsest grouping every branch allows
    if merged.kind == "dense" and len(branches) > 1:
        assert merged.groups == reduce(math.gcd, [a.groups for a in branches])


@pytest.mark.parametrize("nd", [1, 2, 3])
@given(data=st.data())
@core_settings(30)
def test_concat_of_branches_equals_cat_of_applies(nd, data):
    branches, names, x = data.draw(parallel_case(nd, same_out=False))
    merged = A.concat(branches)
    want = torch.cat([A.apply(a, x) for a in branches], 1)
    close(A.apply(merged, x), want)
    assert_kind_consistent(merged)
    assert merged.out_channels == sum(a.out_channels for a in branches)


@pytest.mark.parametrize("merge", [A.add, A.concat, lambda bs: A.direct_sum(*bs)])
def test_merges_read_their_branches_weights_and_never_write_them(merge):
    """A branch already on the common kernel is read as it is (no copy of it first), and the merged weight is a tensor
    of its own: writing into it leaves every branch as it was."""
    torch.manual_seed(0)
    weights = [torch.randn(4, 3, 3, 3, dtype=torch.float64) for _ in range(2)]
    branches = [A.from_conv(w, torch.randn(4, dtype=torch.float64), padding=1) for w in weights]
    kept = [w.clone() for w in weights]
    merged = merge(branches).weight
    assert all(merged.untyped_storage().data_ptr() != w.untyped_storage().data_ptr() for w in weights)
    merged.add_(1.0)
    assert all(torch.equal(w, k) for w, k in zip(weights, kept, strict=True))


@given(
    seed=st.integers(0, 2**31),
    cin=st.integers(1, 5),
    couts=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    with_identity=st.booleans(),
)
@core_settings(30)
def test_channels_last_add_concat(seed, cin, couts, with_identity):
    g = gen(seed)
    layout = A.Layout(0)
    x = randn(g, 2, 3, cin)
    lin = [A.from_linear(randn(g, c, cin), randn(g, c) if i % 2 else None) for i, c in enumerate(couts)]
    close(A.apply(A.concat(lin), x), torch.cat([A.apply(a, x) for a in lin], -1))
    same = [A.from_linear(randn(g, cin, cin), randn(g, cin)) for _ in couts]
    if with_identity:
        same += [A.identity(cin, layout), random_bn_affine(g, cin, layout)[0]]
    close(A.apply(A.add(same), x), sum(A.apply(a, x) for a in same))


@pytest.mark.parametrize("op", ["add", "concat"])
def test_dilated_conv_plus_1x1_branch(op):
    """A dilated 3x3 (d=2, p=2) next to a dense 1x1: common grid has dilation 2, the 1x1 sits at the centre."""
    g = gen(16)
    a = A.from_conv(randn(g, 2, 2, 3, 3), None, 1, 2, 2)
    b = A.from_conv(randn(g, 2, 2, 1, 1), randn(g, 2))
    merged = getattr(A, op)([a, b])
    x = randn(g, 1, 2, 7, 6)
    want = A.apply(a, x) + A.apply(b, x) if op == "add" else torch.cat([A.apply(a, x), A.apply(b, x)], 1)
    close(A.apply(merged, x), want)


@pytest.mark.parametrize("shift,pads", [(False, (1, 2)), (False, (0, 0)), (True, (0, 0))])
def test_compose_channelwise_then_zero_pad_is_not_a_bare_pad(shift, pads):
    g = gen(17)
    layout = A.Layout(1)
    scale = A.channelwise(randn(g, 3), randn(g, 3) if shift else None, layout)
    pad = A.zero_pad(3, (pads[0],), (pads[1],), layout)
    c = A.compose(scale, pad)
    x = randn(g, 2, 3, 5)
    close(A.apply(c, x), A.apply(pad, A.apply(scale, x)))
    assert_kind_consistent(c)


def test_shift_then_zero_pad_refuses():
    layout = A.Layout(1)
    bn = random_bn_affine(gen(19), 3, layout)[0]
    with pytest.raises(A.Refusal, match="bias"):
        A.compose(bn, A.zero_pad(3, (1,), (0,), layout))


def test_add_channelwise_and_zero_pad():
    g = gen(18)
    layout = A.Layout(2)
    parts = [A.channelwise(randn(g, 3), randn(g, 3), layout), A.zero_pad(3, (0, 0), (0, 0), layout)]
    merged = A.add(parts)
    x = randn(g, 2, 3, 4, 5)
    close(A.apply(merged, x), sum(A.apply(a, x) for a in parts))
    assert_kind_consistent(merged)


def test_add_of_units_only_stays_channelwise():
    g = gen(1)
    layout = A.Layout(2)
    parts = [A.identity(4, layout), random_bn_affine(g, 4, layout)[0], A.channelwise(randn(g, 4), None, layout)]
    merged = A.add(parts)
    assert merged.kind == "diagonal"
    assert_kind_consistent(merged)
    x = randn(g, 2, 4, 5, 3)
    close(A.apply(merged, x), sum(A.apply(a, x) for a in parts))


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_identity_on_grouped_conv_sits_at_i_mod_cg(groups):
    """YOLOv7's identity is wrong for g > 1: the one must be at ``[i, i mod (C/g), centre]``."""
    g = gen(groups)
    c = 8
    conv = A.from_conv(randn(g, c, c // groups, 3, 3), randn(g, c), 1, 1, 1, groups)
    merged = A.add([conv, A.identity(c, A.Layout(2))])
    x = randn(g, 1, c, 5, 6)
    close(A.apply(merged, x), A.apply(conv, x) + x)
    assert merged.groups == groups
    rows = torch.arange(c)
    expected = conv.weight.clone()
    expected[rows, rows % (c // groups), 1, 1] += 1
    assert torch.equal(merged.weight, expected)


# ============================================================================================
# sequential: compose


@st.composite
def compose_case(draw, nd: int):
    """Two random convs A then B (strided, dilated, grouped, asymmetric pads) and a valid input size;
    sometimes A or B is a unit instead (identity, channelwise scale, BN, zero pad incl. a 0-pad)."""
    seed = draw(st.integers(0, 2**31))
    g = gen(seed)
    kmax = 3 if nd == 3 else 4

    def conv(cin):
        groups = draw(st.sampled_from([1, 1, 2, 3, 6]))
        if cin is None:
            cin = groups * draw(st.integers(1, 2))
        groups = math.gcd(groups, cin)
        cout = groups * draw(st.integers(1, 3)) if not draw(st.booleans()) else cin
        groups = math.gcd(groups, cout)
        kernel = tuple(draw(st.integers(1, kmax)) for _ in range(nd))
        stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
        dilation = tuple(draw(st.integers(1, 3)) for _ in range(nd))
        lo = tuple(draw(st.integers(0, 2)) for _ in range(nd))
        hi = tuple(draw(st.sampled_from([low, 0, 1, 2])) for low in lo)
        bias = randn(g, cout) if draw(st.booleans()) else None
        a = A.from_conv(randn(g, cout, cin // groups, *kernel), bias, stride, 0, dilation, groups)
        return apply_pad(a, lo, hi)

    def unit(c):
        layout = A.Layout(nd)
        kind = draw(st.sampled_from(["identity", "scale", "bn", "pad", "pad0"]))
        if kind == "identity":
            return A.identity(c, layout)
        if kind == "scale":
            return A.channelwise(randn(g, c), None, layout)
        if kind == "bn":
            return random_bn_affine(g, c, layout)[0]
        if kind == "pad0":
            return A.zero_pad(c, (0,) * nd, (0,) * nd, layout)
        return A.zero_pad(
            c,
            tuple(draw(st.integers(0, 2)) for _ in range(nd)),
            tuple(draw(st.integers(0, 2)) for _ in range(nd)),
            layout,
        )

    shape = draw(st.sampled_from(["conv-conv"] * 4 + ["unit-conv", "conv-unit", "unit-unit"]))
    if shape.startswith("unit"):
        a = unit(draw(st.sampled_from([1, 2, 3, 6])))
    else:
        a = conv(None)
    b = unit(a.out_channels) if shape.endswith("unit") else conv(a.out_channels)
    # A's output size
    need = tuple(max(1, e - low - high) for e, low, high in zip(b.extent, b.pad_lo, b.pad_hi, strict=True))
    base = tuple(
        (m - 1) * s + e - low - high
        for m, s, e, low, high in zip(need, a.stride, a.extent, a.pad_lo, a.pad_hi, strict=True)
    )
    size = tuple(max(1, n) + draw(st.integers(0, 4)) for n in base)
    x = randn(g, 2, a.in_channels, *size)
    return a, b, x


def zero_border_ok(a: A.Affine, b: A.Affine) -> bool:
    """Independent statement of when B's zero padding may be pushed through A."""
    if not b.pads:
        return True
    if not a.bias_is_zero():
        return False
    for i in range(a.nd):
        if b.pad_lo[i] or b.pad_hi[i]:
            e, lo, hi, s = a.extent[i], a.pad_lo[i], a.pad_hi[i], a.stride[i]
            if not (e - 1 - lo < s and e - 1 <= hi):
                return False
    return True


@pytest.mark.parametrize("nd", [1, 2, 3])
@given(case=st.data())
@core_settings(60)
def test_compose_random_convs(nd, case):
    """Whenever compose answers, it is exact; it refuses only when the zero-border precondition fails."""
    a, b, x = case.draw(compose_case(nd))
    want = A.apply(b, A.apply(a, x))
    try:
        c = A.compose(a, b)
    except A.Refusal as r:
        assert not zero_border_ok(a, b), f"refused an exact composition: {r}"
        return
    close(A.apply(c, x), want)
    assert c.stride == tuple(sa * sb for sa, sb in zip(a.stride, b.stride, strict=True))
    assert_kind_consistent(c)


@pytest.mark.parametrize("nd", [1, 2])
@given(case=st.data())
@core_settings(40)
def test_compose_without_padding_in_b_never_refuses(nd, case):
    a, b, x = case.draw(compose_case(nd))
    b = apply_pad(b, (0,) * nd, (0,) * nd)
    assume(all(m >= e for m, e in zip(a.out_size(x.shape[2:]), b.extent, strict=True)))
    c = A.compose(a, b)
    close(A.apply(c, x), A.apply(b, A.apply(a, x)))


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("depthwise", ["b", "a"])
@given(case=st.data())
@core_settings(40)
def test_compose_with_a_depthwise_side_is_exact_and_stays_sparse(nd, depthwise, case):
    """A dense conv then a depthwise one (a DenseNet transition's 1x1 conv then its 2x2 pool, channel multipliers
    too), or a depthwise one then a grouped one (ResNet-D's pool then 1x1): exact, and composed without the
    transposed convolution of the general path, which densifies the depthwise side (C^3 multiply-adds)."""
    draw = case.draw
    g = gen(draw(st.integers(0, 2**31)))
    kmax = 3 if nd == 3 else 4

    def geometry():
        return (
            tuple(draw(st.integers(1, kmax)) for _ in range(nd)),
            tuple(draw(st.integers(1, 3)) for _ in range(nd)),
            tuple(draw(st.integers(1, 3)) for _ in range(nd)),
        )

    (ka, sa, da), (kb, sb, db) = geometry(), geometry()
    mid = draw(st.sampled_from([1, 2, 3, 4, 6]))
    if depthwise == "b":
        groups_a = draw(st.sampled_from([d for d in (1, 2, 3, 6) if mid % d == 0]))
        cin = groups_a * draw(st.integers(1, 2))
        a = A.from_conv(randn(g, mid, cin // groups_a, *ka), randn(g, mid), sa, 0, da, groups_a)
        cout = mid * draw(st.integers(1, 2))
        b = A.from_conv(randn(g, cout, 1, *kb), randn(g, cout), sb, 0, db, mid)
    else:
        cin = mid
        a = A.from_conv(randn(g, mid, 1, *ka), randn(g, mid), sa, 0, da, mid)
        groups_b = draw(st.sampled_from([d for d in (1, 2, 3, 6) if mid % d == 0]))
        cout = groups_b * draw(st.integers(1, 3))
        b = A.from_conv(randn(g, cout, mid // groups_b, *kb), randn(g, cout), sb, 0, db, groups_b)
    side = tuple((eb - 1) * s + ea + draw(st.integers(0, 3)) for ea, eb, s in zip(a.extent, b.extent, sa, strict=True))
    x = randn(g, 2, cin, *side)

    def densifying(*args, **kwargs):
        raise AssertionError("the depthwise side was made dense (transposed convolution)")

    with mock.patch.multiple(F, conv_transpose1d=densifying, conv_transpose2d=densifying, conv_transpose3d=densifying):
        c = A.compose(a, b)
        close(A.apply(c, x), A.apply(b, A.apply(a, x)))


def test_compose_strided_dilated_grouped():
    g = gen(3)
    a = A.from_conv(randn(g, 6, 2, 3, 3), randn(g, 6), (2, 1), (1, 1), (1, 2), 2)
    b = A.from_conv(randn(g, 9, 2, 3, 2), randn(g, 9), (1, 2), 0, (2, 1), 3)
    x = randn(g, 2, 4, 15, 13)
    c = A.compose(a, b)
    assert c.groups == 1  # gcd(2, 3)
    close(A.apply(c, x), A.apply(b, A.apply(a, x)))
    a2 = A.from_conv(randn(g, 8, 2, 3, 3), None, 2, 1, 1, 4)
    b2 = A.from_conv(randn(g, 8, 4, 3, 3), None, 1, 0, 2, 2)
    c2 = A.compose(a2, b2)
    assert c2.groups == 2
    x2 = randn(g, 1, 8, 17, 12)
    close(A.apply(c2, x2), A.apply(b2, A.apply(a2, x2)))


@pytest.mark.parametrize("nd", [1, 2, 3])
@given(data=st.data())
@core_settings(25)
def test_pad_then_conv(nd, data):
    """F.pad(x, lo, hi) -> conv (itself zero padded, any stride/dilation): one conv with lo + p, hi + p."""
    g = gen(data.draw(st.integers(0, 2**31)))
    lo = tuple(data.draw(st.integers(0, 3)) for _ in range(nd))
    hi = tuple(data.draw(st.integers(0, 3)) for _ in range(nd))
    kernel = tuple(data.draw(st.integers(1, 3)) for _ in range(nd))
    stride = tuple(data.draw(st.integers(1, 2)) for _ in range(nd))
    padding = tuple(data.draw(st.integers(0, 1)) for _ in range(nd))
    cin, cout = 2, 3
    w, b = randn(g, cout, cin, *kernel), randn(g, cout)
    x = randn(g, 2, cin, *[5, 4, 3][:nd])
    pads = []
    for low, high in zip(reversed(lo), reversed(hi), strict=True):
        pads += [low, high]
    c = A.compose(A.zero_pad(cin, lo, hi, A.Layout(nd)), A.from_conv(w, b, stride, padding))
    close(A.apply(c, x), CONV[nd](F.pad(x, pads), w, b, stride, padding))
    assert c.pad_lo == tuple(low + p for low, p in zip(lo, padding, strict=True))
    assert c.pad_hi == tuple(h + p for h, p in zip(hi, padding, strict=True))


def test_bn_then_conv_without_padding_folds():
    g = gen(4)
    bn, (mean, var, w_bn, b_bn, eps) = random_bn_affine(g, 4, A.Layout(2))
    w, b = randn(g, 6, 2, 3, 3), randn(g, 6)
    conv = A.from_conv(w, b, 2, 0, 1, 2)
    x = randn(g, 2, 4, 9, 8)
    c = A.compose(bn, conv)
    close(A.apply(c, x), F.conv2d(F.batch_norm(x, mean, var, w_bn, b_bn, False, 0, eps), w, b, 2, 0, 1, 2))


def test_bn_then_zero_padded_conv_refuses():
    g = gen(5)
    bn = random_bn_affine(g, 4, A.Layout(2))[0]
    conv = A.from_conv(randn(g, 4, 4, 3, 3), None, 1, 1)
    with pytest.raises(A.Refusal, match="bias"):
        A.compose(bn, conv)
    # a pure scale (no shift) has zero border and composes
    scale = A.channelwise(randn(g, 4), None, A.Layout(2))
    x = randn(g, 1, 4, 5, 7)
    close(A.apply(A.compose(scale, conv), x), A.apply(conv, A.apply(scale, x)))


@pytest.mark.parametrize("nd", [0, 1, 2, 3])
def test_conv_then_bn(nd):
    g = gen(6 + nd)
    if nd == 0:
        a = A.from_linear(randn(g, 5, 3), randn(g, 5))
        x = randn(g, 2, 4, 3)
    else:
        a = A.from_conv(randn(g, 5, 1, *[3] * nd), randn(g, 5), 2, 1, 1, 1)
        x = randn(g, 2, 1, *[7, 6, 5][:nd])
    bn, (mean, var, w, b, eps) = random_bn_affine(g, 5, A.Layout(nd))
    c = A.compose(a, bn)
    y = A.apply(a, x)
    want = F.batch_norm(y.movedim(-1, 1) if nd == 0 and y.dim() > 2 else y, mean, var, w, b, False, 0, eps)
    if nd == 0 and y.dim() > 2:
        want = want.movedim(1, -1)
    close(A.apply(c, x), want)
    assert c.kernel == a.kernel and c.stride == a.stride


def test_linear_then_linear():
    g = gen(7)
    a = A.from_linear(randn(g, 5, 3), randn(g, 5))
    b = A.from_linear(randn(g, 4, 5), randn(g, 4))
    x = randn(g, 2, 6, 3)
    c = A.compose(a, b)
    close(A.apply(c, x), F.linear(F.linear(x, a.weight, a.bias), b.weight, b.bias))
    assert c.weight.shape == (4, 3)


def test_compose_layout_mismatch_refuses():
    g = gen(8)
    with pytest.raises(A.Refusal, match="layout"):
        A.compose(A.from_linear(randn(g, 3, 3), None), A.from_conv(randn(g, 3, 3, 1, 1), None))
    with pytest.raises(A.Refusal, match="channel"):
        A.compose(A.from_conv(randn(g, 3, 3, 1, 1), None), A.from_conv(randn(g, 3, 4, 1, 1), None))


# ============================================================================================
# the exactness traps


def test_trap_1x1_with_bias_then_zero_padded_3x3_refuses():
    g = gen(9)
    a = A.from_conv(randn(g, 4, 3, 1, 1), randn(g, 4))
    b = A.from_conv(randn(g, 5, 4, 3, 3), randn(g, 5), 1, 1)
    with pytest.raises(A.Refusal, match="bias"):
        A.compose(a, b)
    # the trap is real: the naive fold (bias pushed through the whole kernel) is wrong on the border
    x = randn(g, 2, 3, 6, 5)
    naive = A.compose(replace(a, bias=None), b)
    naive = replace(naive, bias=naive.bias + b.weight.sum((2, 3)) @ a.bias)
    want = A.apply(b, A.apply(a, x))
    assert (A.apply(naive, x) - want).abs().max().item() > 1e-3
    # without the bias it composes exactly
    close(A.apply(naive := A.compose(replace(a, bias=None), b), x), A.apply(b, A.apply(replace(a, bias=None), x)))
    # and with an explicit pad before the 1x1 (DBB's fix) it is exact with the bias too
    p = A.zero_pad(3, (1, 1), (1, 1), A.Layout(2))
    b0 = replace(b, pad_lo=(0, 0), pad_hi=(0, 0))
    fixed = A.compose(A.compose(p, a), b0)
    close(A.apply(fixed, x), A.apply(b0, A.apply(a, F.pad(x, [1, 1, 1, 1]))))


def test_trap_strided_conv_reading_real_input_on_the_border_refuses():
    """3x3/s2/p1 then a zero-padded conv: A's output one past the end reads real input for even sizes."""
    g = gen(10)
    a = A.from_conv(randn(g, 3, 3, 3, 3), None, 2, 1)
    b = A.from_conv(randn(g, 3, 3, 3, 3), None, 1, 1)
    with pytest.raises(A.Refusal):
        A.compose(a, b)
    # 1x1/s2 without bias only reads inside: fine
    a1 = A.from_conv(randn(g, 3, 3, 1, 1), None, 2, 0)
    x = randn(g, 1, 3, 8, 7)
    close(A.apply(A.compose(a1, b), x), A.apply(b, A.apply(a1, x)))


@pytest.mark.parametrize("a_pad,b_pad", [(0, 1), (1, 1), (0, 0)])
def test_misaligned_stride2_branches_refuse(a_pad, b_pad):
    g = gen(11)
    a = A.from_conv(randn(g, 4, 4, 3, 3), None, 2, a_pad)
    b = A.from_conv(randn(g, 4, 4, 1, 1), None, 2, b_pad)
    with pytest.raises(A.Refusal, match="align"):
        A.add([a, b])
    with pytest.raises(A.Refusal, match="align"):
        A.concat([a, b])


def test_different_strides_refuse():
    g = gen(12)
    with pytest.raises(A.Refusal, match="stride"):
        A.add([A.from_conv(randn(g, 2, 2, 3, 3), None, 2, 1), A.from_conv(randn(g, 2, 2, 3, 3), None, 1, 1)])


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_non_zero_padding_mode(mode):
    g = gen(13)
    w3 = randn(g, 4, 4, 3, 3)
    m = nn.Conv2d(4, 4, 3, 1, 1, padding_mode=mode, bias=True).double()
    with torch.no_grad():
        m.weight.copy_(w3)
        m.bias.copy_(randn(g, 4))
    r = A.from_conv(m.weight.detach(), m.bias.detach(), 1, 1, 1, 1, mode)
    x = randn(g, 2, 4, 7, 5)
    one = A.from_conv(randn(g, 4, 4, 1, 1), randn(g, 4))
    bn = random_bn_affine(g, 4, A.Layout(2))[0]
    merged = A.add([r, one, bn, A.identity(4, A.Layout(2))])
    assert merged.padding_mode == mode
    close(A.apply(merged, x), m(x) + A.apply(one, x) + A.apply(bn, x) + x)
    # a zero-padded off-centre branch cannot share the reflect padding
    zero3 = A.from_conv(randn(g, 4, 4, 3, 3), None, 1, 1)
    with pytest.raises(A.Refusal, match=mode):
        A.add([r, zero3])
    # 1x1 (pointwise) before a reflect-padded conv composes; a 3x3 does not
    close(A.apply(A.compose(one, r), x), m(A.apply(one, x)))
    with pytest.raises(A.Refusal, match="pointwise"):
        A.compose(zero3, r)
    # a reflect-padded conv before a zero-padded one does not compose either
    with pytest.raises(A.Refusal):
        A.compose(r, zero3)


def test_different_padding_modes_refuse():
    g = gen(14)
    a = A.from_conv(randn(g, 2, 2, 3, 3), None, 1, 1, padding_mode="reflect")
    b = A.from_conv(randn(g, 2, 2, 3, 3), None, 1, 1, padding_mode="replicate")
    with pytest.raises(A.Refusal, match="modes"):
        A.add([a, b])


def test_non_square_kernels_are_centred_per_axis():
    """DBB pads a 1x3 into 1x5 by swapping the pad axes; each axis must be centred on its own."""
    g = gen(15)
    branches = [
        A.from_conv(randn(g, 3, 3, 1, 5), None, 1, (0, 2)),
        A.from_conv(randn(g, 3, 3, 3, 1), None, 1, (1, 0)),
        A.from_conv(randn(g, 3, 3, 1, 3), None, 1, (0, 1)),
        A.from_conv(randn(g, 3, 3, 5, 5), randn(g, 3), 1, 4, 2),  # dilated 5x5 (extent 9)
    ]
    merged = A.add(branches)
    x = randn(g, 2, 3, 11, 6)
    close(A.apply(merged, x), sum(A.apply(a, x) for a in branches))


# ============================================================================================
# regroup


def block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Dense ``(out, in, *k)`` weight of a grouped ``(out, in/groups, *k)`` one, built by hand."""
    out, per_in = weight.shape[:2]
    dense = weight.new_zeros((out, per_in * groups, *weight.shape[2:]))
    per_out = out // groups
    for gi in range(groups):
        dense[gi * per_out : (gi + 1) * per_out, gi * per_in : (gi + 1) * per_in] = weight[
            gi * per_out : (gi + 1) * per_out
        ]
    return dense


@given(
    seed=st.integers(0, 2**31),
    groups=st.sampled_from([2, 3, 4, 6, 12]),
    per_in=st.integers(1, 2),
    per_out=st.integers(1, 2),
    nd=st.integers(0, 2),
    data=st.data(),
)
@core_settings(40)
def test_regroup(seed, groups, per_in, per_out, nd, data):
    g = gen(seed)
    target = data.draw(st.sampled_from(divisors(groups)))
    w = randn(g, groups * per_out, per_in, *(3,) * nd)
    b = randn(g, groups * per_out)
    if nd == 0:  # a grouped channels-last map (what channelwise builds); reference: dense by hand
        a = A.Affine(w, b, (), (), (), (), groups, A.Layout(0))
        x = randn(g, 2, groups * per_in)
        want = F.linear(x, block_diagonal(w, groups), b)
    else:
        a = A.from_conv(w, b, 1, 1, 1, groups)
        x = randn(g, 2, groups * per_in, *[6, 5][:nd])
        want = CONV[nd](x, w, b, 1, 1, 1, groups)
        close(A.apply(A.regroup(a, 1), x), CONV[nd](x, block_diagonal(w, groups), b, 1, 1))
    r = A.regroup(a, target)
    assert r.groups == target
    assert r.weight.shape[1] == groups * per_in // target
    close(A.apply(r, x), want)
    assert int((r.weight != 0).sum()) == int((a.weight != 0).sum())  # the new taps are exact zeros
    if target == 1:
        assert torch.equal(r.weight, block_diagonal(w, groups))


# ============================================================================================
# structure facts


def test_out_size_and_extent():
    a = A.from_conv(torch.zeros(2, 2, 3, 4, dtype=F64), None, (2, 1), (1, 2), (2, 1))
    assert a.extent == (5, 4)
    assert a.out_size((9, 7)) == ((9 + 2 - 5) // 2 + 1, (7 + 4 - 4) + 1)
    assert not a.is_pointwise and A.from_conv(torch.zeros(2, 2, 1, 1, dtype=F64), None).is_pointwise
