"""What makes a fuse fast must not change what it computes: shapes recorded without arithmetic equal a real run's,
the fast float64 depthwise convolution equals PyTorch's, the private float64 copy is a faithful copy, and caches
that the private runs fill in place are emptied again."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import reparam
from reparam import shapes
from reparam.float64 import FastFloat64
from reparam.pipeline import _float64_copy
from reparam.shape_run import NeedsValues, ShapeRecorder, StandIns, convolution_layout, record_shapes
from reparam.match import node_shape


class Mixed(nn.Module):
    """Convolutions, a depthwise one, linears, attention, transcendental and cheap elementwise ops, views."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8, bias=False)

    def forward(self, x):
        x = F.gelu(self.bn(self.dw(self.stem(x)))) + x[:, :1].mean()
        t = x.flatten(2).transpose(1, 2)  # N, HW, C
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return torch.sigmoid(self.proj(a)).softmax(-1) @ t.transpose(1, 2)


def _shapes(gm: fx.GraphModule) -> dict:
    return {n.name: node_shape(n) for n in gm.graph.nodes}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stand_in_shapes_equal_a_real_run(dtype):
    gm = fx.symbolic_trace(Mixed().eval().to(dtype))
    real, stood_in, _, _ = _recorded_both_ways(gm, torch.randn(2, 3, 16, 12, dtype=dtype), _shapes)
    assert stood_in == real and sum(s is not None for s in real.values()) >= 15


def _recorded_both_ways(gm: fx.GraphModule, x: torch.Tensor, described) -> tuple:
    """(``described(gm)`` after a real shape run on ``x``, the same after a run on stand-ins (no fallback to a real
    run: every op of the graph runs inside :class:`StandIns`), that run's output, its mode)."""
    with torch.no_grad():
        torch.fx.passes.shape_prop.ShapeProp(gm).propagate(x)
        real = described(gm)
        for n in gm.graph.nodes:
            n.meta.pop("tensor_meta", None)
        with StandIns() as mode:
            output = ShapeRecorder(gm).run(x)
    return real, described(gm), output, mode


class Elementwise(nn.Module):
    """Pointwise ops (in place too, broadcasting, promoting, a comparison's mask), reductions, concatenations, pools
    and resizes on a channels-last map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.register_buffer("steps", torch.arange(6).reshape(1, 6, 1, 1))

    def forward(self, x):
        y = self.conv(x.contiguous(memory_format=torch.channels_last))
        y = y.clamp_min(0.01) * self.steps + torch.tensor(2.0, dtype=torch.float64)  # int buffer, float64 0-dim
        y.mul_(2).add_(y[:, :1])
        z = torch.where(y > 0.5, y, -y).sigmoid()
        norms = torch.linalg.vector_norm(z, dim=(2, 3), keepdim=True).clamp_min(1e-6)
        pooled = F.avg_pool2d(z / norms, 2)
        wide = torch.cat([F.interpolate(pooled, scale_factor=2.0, mode="nearest"), y], dim=1)
        return wide.mean(dim=(-1, -2)), wide.amax(1), (y > 0).sum(dtype=torch.int64), torch.stack([z, y], 0)


def _metas(gm: fx.GraphModule) -> dict:
    """Each node's recorded shapes and dtypes."""

    def described(meta):
        return fx.node.map_aggregate(meta, lambda m: (tuple(m.shape), m.dtype) if hasattr(m, "dtype") else m)

    return {n.name: described(n.meta.get("tensor_meta")) for n in gm.graph.nodes}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_elementwise_stand_ins_record_the_shapes_and_dtypes_of_a_real_run(dtype, monkeypatch):
    import reparam.shape_run as shape_run

    monkeypatch.setattr(shape_run, "ELEMENTWISE_STAND_IN", 1)  # every floating pointwise op and reduction
    gm = fx.symbolic_trace(Elementwise().eval().to(dtype))
    real, stood_in, output, mode = _recorded_both_ways(gm, torch.randn(2, 3, 10, 8, dtype=dtype), _metas)
    assert stood_in == real and sum(m is not None for m in real.values()) >= 20
    assert not any(bool(t.any()) for t in output[:2] + output[3:])  # stood in: zeros, nothing computed
    assert len(mode._layouts) >= 10  # one meta layout per signature


def test_elementwise_ops_on_small_tensors_run_as_usual():
    x = torch.randn(4, 4)
    with torch.no_grad(), StandIns():
        got = (x.clamp_min(0) + 1).sum()
    assert torch.equal(got, (x.clamp_min(0) + 1).sum())  # below ELEMENTWISE_STAND_IN: computed


def test_stand_ins_are_zeros_laid_out_as_asked():
    from reparam.shape_run import _zeros_like

    like = torch.empty(2, 3, 5, 7, dtype=torch.float64, device="meta").contiguous(memory_format=torch.channels_last)
    got = _zeros_like(like, torch.device("cpu"))
    assert got.shape == like.shape and got.stride() == like.stride() and got.dtype == torch.float64
    assert got.is_contiguous(memory_format=torch.channels_last) and not bool(got.any())
    got.add_(1)  # writable, its own memory
    assert bool((got == 1).all()) and not bool(_zeros_like(like, torch.device("cpu")).any())
    assert _zeros_like(torch.empty(0, 3, device="meta"), torch.device("cpu")).shape == (0, 3)


def test_a_value_read_needs_a_real_run():
    class ReadsAValue(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y[y > 0]  # the output length depends on the convolution's values

    model = ReadsAValue().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = fx.symbolic_trace(model)
    with torch.no_grad(), pytest.raises(NeedsValues), StandIns():
        gm(x)
    with torch.no_grad():
        record_shapes(gm, (x,))  # falls back to a real run: the recorded length is the real one
        want = model(x).shape
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert node_shape(out) == tuple(want)


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation, bias",
    [
        ((3, 3), (1, 1), (1, 1), (1, 1), True),
        ((3, 5), (2, 1), (0, 2), (1, 2), False),
        ((7, 7), (1, 1), (3, 3), (1, 1), True),
        ((1, 1), (2, 2), (0, 0), (1, 1), True),
    ],
)
def test_fast_float64_depthwise_equals_pytorch(kernel, stride, padding, dilation, bias):
    c = 6
    x = torch.randn(2, c, 11, 9, dtype=torch.float64)
    w = torch.randn(c, 1, *kernel, dtype=torch.float64)
    b = torch.randn(c, dtype=torch.float64) if bias else None
    want = F.conv2d(x, w, b, stride, padding, dilation, c)
    with torch.no_grad(), FastFloat64():
        got = F.conv2d(x, w, b, stride, padding, dilation, c)
        other = F.conv2d(x.float(), w.float(), None, stride, padding, dilation, c)  # not float64: PyTorch's own
    assert got.shape == want.shape and got.is_contiguous() and rel_err(got, want) <= 1e-14
    assert torch.equal(other, F.conv2d(x.float(), w.float(), None, stride, padding, dilation, c))


def test_fast_float64_leaves_small_kernels_on_large_maps_to_pytorch(monkeypatch):
    import reparam.float64 as f64

    used = []
    real = f64.depthwise_conv2d
    monkeypatch.setattr(f64, "depthwise_conv2d", lambda *a: used.append(a[1].shape[-1]) or real(*a))
    large, small = torch.randn(1, 4, 64, 64, dtype=torch.float64), torch.randn(1, 4, 16, 16, dtype=torch.float64)
    with torch.no_grad(), FastFloat64():
        for x in (large, small):
            for k in (3, 7):
                for stride in (2, 1):
                    F.conv2d(x, torch.randn(4, 1, k, k, dtype=torch.float64), None, stride, k // 2, 1, 4)
    # PyTorch's kernel for the 3x3 on the 64x64 map and for stride 1 there (as fast or faster there)
    assert used == [7, 3, 3, 7, 7]


def test_float64_copy_is_a_faithful_private_copy():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    model[2].weight = model[0].weight  # tied
    before = {k: v.clone() for k, v in model.state_dict().items()}
    work = _float64_copy(model)
    assert work[2].weight is work[0].weight and work[0].weight is not model[0].weight
    assert all(t.dtype == torch.float64 for t in work.parameters())
    assert work[3].num_batches_tracked.dtype == torch.int64
    with torch.no_grad():
        work[0].weight.add_(1)
    assert all(torch.equal(v, model.state_dict()[k]) and v.dtype == before[k].dtype for k, v in before.items())


class Odd(nn.Module):
    """What a deep copy must keep: shared submodules and containers, a cycle through a tuple, hooks, tensors that are
    no parameter or buffer, a class with its own ``__deepcopy__``, one with slots, plain objects."""

    class Own(nn.Linear):
        def __deepcopy__(self, memo):
            twin = nn.Linear(self.in_features, self.out_features)
            twin.copied_by_own = True
            return twin

    class Slotted:
        __slots__ = ("value",)

        def __init__(self, value):
            self.value = value

    def __init__(self):
        super().__init__()
        shared = nn.Conv2d(3, 3, 1)
        self.a, self.b = shared, nn.Sequential(shared, nn.ReLU())
        self.own = Odd.Own(2, 2)
        self.table = {"k": [1, 2], "t": torch.ones(2)}
        self.same_table = self.table
        self.cycle = [None]
        self.cycle[0] = (self.cycle, 3)
        self.slotted = Odd.Slotted([4])
        self.register_forward_hook(lambda m, i, o: o)


def test_the_fast_module_copy_is_what_copy_deepcopy_makes():
    import copy

    from reparam.module_copy import deep_copy

    model = Odd()
    memo = {id(t): t for t in model.parameters()}  # shared tensors, as the pipeline's memos do
    fast, slow = deep_copy(model, dict(memo)), copy.deepcopy(model, dict(memo))
    assert [(n, type(m)) for n, m in fast.named_modules()] == [(n, type(m)) for n, m in slow.named_modules()]
    assert fast.a is fast.b[0] and fast.a is not model.a and fast.a.weight is model.a.weight
    assert fast.own.copied_by_own and fast.own is not model.own
    assert fast.same_table is fast.table and fast.table is not model.table and fast.table["t"] is not model.table["t"]
    assert fast.cycle[0][0] is fast.cycle and fast.cycle is not model.cycle
    assert fast.slotted.value == [4] and fast.slotted.value is not model.slotted.value
    assert len(fast._forward_hooks) == 1 and fast._forward_hooks is not model._forward_hooks
    assert set(vars(fast)) == set(vars(slow))
    fast.table["k"].append(3)
    assert model.table["k"] == [1, 2]  # the copy is private


def test_a_trace_generates_its_code_when_first_used():
    from reparam.trace import symbolic_trace

    model = Mixed().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = symbolic_trace(model)
    assert "_code" not in vars(gm)  # not generated at the trace
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert "self.stem" in gm.code
    again = symbolic_trace(model)
    assert "def forward" in again.code and "_code" in vars(again)  # reading the code generates it too


class CachedBias(nn.Module):
    """Caches a tensor in a dict attribute filled in place during forward, like timm's attention_bias_cache."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.bias = nn.Parameter(torch.randn(3, 1, 1))
        self.cache = {}

    def forward(self, x):
        if str(x.device) not in self.cache:
            self.cache[str(x.device)] = self.bias * 2
        return self.bn(self.conv(x)) + self.cache[str(x.device)]


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = CachedBias()

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: fused part by part, the block's forward stays eager
            return x
        return self.block(x)


def test_caches_filled_in_place_by_the_float64_runs_are_emptied():
    model = Untraceable().eval()
    x = torch.randn(1, 3, 8, 8)
    fused = reparam.fuse(model, (x,))
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in fused.block.cache.values())
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-5


@settings(max_examples=300, deadline=None)
@given(
    nd=st.integers(1, 3),
    transposed=st.booleans(),
    groups=st.integers(1, 2),
    data=st.data(),
)
def test_the_convolution_stand_in_has_the_shape_of_the_real_output(nd, transposed, groups, data):
    """``convolution_layout`` (a formula, not the 0.2 ms meta kernel) against the meta kernel's shape."""
    ints = lambda lo, hi: data.draw(st.lists(st.integers(lo, hi), min_size=nd, max_size=nd))  # noqa: E731
    kernel, stride, padding, dilation, sides = ints(1, 4), ints(1, 3), ints(0, 2), ints(1, 2), ints(1, 12)
    cin, cout = groups * data.draw(st.integers(1, 3)), groups * data.draw(st.integers(1, 3))
    output_padding = (
        [data.draw(st.integers(0, min(s, d) - 1)) for s, d in zip(stride, dilation, strict=True)]
        if transposed
        else [0] * nd
    )
    x = torch.empty(2, cin, *sides, device="meta")
    w = torch.empty(*((cin, cout // groups) if transposed else (cout, cin // groups)), *kernel, device="meta")
    args = (x, w, None, stride, padding, dilation, transposed, output_padding, groups)
    try:
        want = torch.ops.aten.convolution(*args)
    except RuntimeError:  # an output side below one
        return
    assert convolution_layout(*args).shape == want.shape


def _refuses(run) -> bool:
    try:
        run()
    except RuntimeError:
        return True
    return False


@settings(max_examples=200, deadline=None)
@given(
    transposed=st.booleans(),
    groups=st.integers(1, 2),
    channels=st.integers(1, 5),
    side=st.integers(1, 6),
    kernel=st.integers(1, 4),
    dilation=st.integers(1, 2),
    norm_channels=st.integers(1, 5),
    normalized=st.integers(1, 5),
)
def test_stand_ins_refuse_the_shapes_the_real_ops_refuse(
    transposed, groups, channels, side, kernel, dilation, norm_channels, normalized
):
    """A stand-in laid out by a formula still refuses an input the real op refuses (a wrong channel count, a map
    smaller than the dilated kernel, statistics or a normalized shape of another size), and takes what it takes."""
    x = torch.randn(1, channels, side, side)
    w = torch.randn(2 * groups, 2, kernel, kernel)  # takes 2 * groups channels (transposed: 2 * groups)
    conv = F.conv_transpose2d if transposed else F.conv2d
    cases = [
        lambda: conv(x, w, None, 1, 0, dilation=dilation, groups=groups),
        lambda: F.batch_norm(x, torch.zeros(norm_channels), torch.ones(norm_channels), torch.ones(norm_channels)),
        lambda: F.layer_norm(x, (normalized,)),
    ]
    for case in cases:
        real = _refuses(case)
        with torch.no_grad(), StandIns():
            assert _refuses(case) == real


def test_inputs_that_fit_a_model_whose_first_registered_layer_does_not_cost_no_real_run():
    """A space-to-depth stem: the first registered conv takes 12 channels, the model 3.  The input check runs the
    model on stand-ins (no convolution computed) and accepts; a wrong input is still refused by name."""

    class SpaceToDepth(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(12, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(F.pixel_unshuffle(x, 2)))

    class Convolutions(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten.convolution.default
            return func(*args, **(kwargs or {}))

    net = SpaceToDepth().eval()
    x = torch.randn(1, 3, 8, 8).double()
    assert shapes.shape_mismatch(net, x) is not None  # the registration-order guess flags it ...
    with Convolutions() as seen:
        shapes.check_example_inputs(net.double(), x)  # ... the model takes it ...
    assert seen.count == 0  # ... and no convolution was computed to find that out
    with pytest.raises(shapes.InputShapeError, match="takes 12 input channels, not 2"):
        shapes.check_example_inputs(net, torch.randn(1, 2, 8, 8).double())


def test_norms_gathers_copies_pads_and_softmaxes_are_stood_in_with_the_real_shapes():
    class Gathers(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.weight = nn.Parameter(torch.randn(4, 2, 3, 3))
            self.table = nn.Parameter(torch.randn(10, 3))
            self.register_buffer("idx", torch.randint(0, 10, (5, 6)))

        def forward(self, x):
            standardised = F.batch_norm(self.weight.reshape(1, 4, -1), None, None, training=True)  # as NF-Nets
            tokens = x.permute(0, 2, 3, 1)
            return (
                self.bn(x),
                standardised.reshape_as(self.weight),
                self.table[self.idx],
                F.layer_norm(tokens, (4,)),
                tokens.contiguous(),
                F.pad(x, (1, 2, 0, 1)),
                torch.ops.aten._safe_softmax.default(x, -1),
            )

    model = Gathers().eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 4, 7, 5)
    stats = model.bn.running_mean.clone()
    with torch.no_grad():
        output, convolutions = record_shapes(gm, (x,))
        want = model(x)
    assert convolutions == []  # the stand-in run went through (None: it fell back to a real run)
    assert all(not bool(t.any()) for t in output)  # stand-ins: zeros, nothing computed
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert [node_shape(n) for n in out] == [tuple(t.shape) for t in want]
    assert torch.equal(model.bn.running_mean, stats)


class BufferCache(nn.Module):
    """Caches a table by assigning its buffer anew on first use (as ConViT's ``rel_indices``); its forward does not
    trace, so the whole-model graph calls it as it is, and the shape run computes the table from stand-ins."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("table", torch.zeros(1), persistent=False)

    def forward(self, x):
        if self.table.shape[0] != x.shape[1]:
            self.table = torch.arange(x.shape[1], dtype=x.dtype).clone() + 1  # the clone is stood in by the shape run
        return self.proj(x) * self.table[:, None]


def test_a_buffer_a_run_assigns_anew_is_put_back():
    model = nn.Sequential(nn.Linear(4, 4), BufferCache()).eval()
    x = torch.randn(2, 5, 4)
    fused = reparam.fuse(model, (x,))
    cache = next(m for m in fused.modules() if isinstance(m, BufferCache))
    assert cache.table.shape == (1,) and cache.table.dtype == torch.float32  # as the user's model had it
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) < 1e-6


class Untouched(nn.Module):
    """Nothing to fold or merge: a norm, a product, a transcendental, a residual."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + F.gelu(self.fc(self.norm(x)))


def test_an_untouched_trace_is_checked_bit_for_bit_in_float32():
    torch.manual_seed(0)
    model, x = Untouched().eval(), torch.randn(2, 5, 8)
    fused, report = reparam.fuse_with_report(model, x)
    assert (
        report.verified_on == "the inputs in float32, bit for bit (nothing was rewritten: the trace computes the model)"
    )
    assert report.max_rel_error == 0.0 and not report.rewrites
    assert all(p.dtype == torch.float32 for p in fused.parameters())
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))
    convs = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.GELU())
    _, report = reparam.fuse_with_report(convs.eval(), torch.randn(1, 3, 224, 224))  # nothing folds across a GELU
    assert report.verified_on.startswith("centre crops of the inputs (1x3x224x224 -> 1x3x128x128) in float32, bit")


def test_a_rewritten_or_float64_model_is_checked_in_float64():
    _, rewritten = reparam.fuse_with_report(Mixed().eval(), torch.randn(1, 3, 16, 16))  # its BN folds
    _, float64 = reparam.fuse_with_report(Untouched().double().eval(), torch.randn(2, 5, 8, dtype=torch.float64))
    assert "bit for bit" not in rewritten.verified_on and "bit for bit" not in float64.verified_on


def test_an_unfaithful_untouched_trace_is_still_caught():
    from test_passes import AliasedIAdd

    torch.manual_seed(0)
    model, x = AliasedIAdd().eval(), torch.randn(2, 3, 5, 4)  # float32, nothing to fold: the bits differ
    fused = reparam.fuse(model, (x,))
    report = fused.reparam_report
    assert any("unfaithfully" in note for note in report.notes) and "bit for bit" not in (report.verified_on or "")
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-6


def test_the_float32_check_puts_the_float64_tensors_back_exactly():
    from reparam.pipeline import _in_float32

    module = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double()
    before = [t.clone() for t in module.state_dict().values()]
    saved = _in_float32(module)
    assert all(t.dtype in (torch.float32, torch.int64) for t in module.state_dict().values())
    for t, data in saved:
        t.data = data
    assert all(
        torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(module.state_dict().values(), before, strict=True)
    )


def test_a_repvgg_sum_is_built_in_the_storage_of_its_folded_3x3():
    from reparam import affine as A

    torch.manual_seed(0)
    layout = A.Layout(2)
    stats = torch.randn(8), torch.rand(8) + 0.5, torch.rand(8) + 0.5, torch.randn(8)
    bn = A.batchnorm(*(t.double() for t in stats), 1e-5, layout)
    wide = A.compose(A.from_conv(torch.randn(8, 8, 3, 3, dtype=torch.float64), None, padding=1), bn)
    narrow = A.compose(A.from_conv(torch.randn(8, 8, 1, 1, dtype=torch.float64), None), bn)
    assert isinstance(wide.w, A.Lazy)  # the BN-scaled 3x3, computed when first read
    want = wide.weight.clone()
    want[:, :, 1, 1] += narrow.weight[:, :, 0, 0]
    want[range(8), range(8), 1, 1] += bn.weight.reshape(-1)
    total = A.add([narrow, wide, bn])  # the 1x1 first, as timm's RepVggBlock adds them
    folded = wide.w.resolve()
    assert total.weight.data_ptr() == folded.data_ptr()  # no zero 3x3 for the 1x1 to start from
    torch.testing.assert_close(total.weight, want, rtol=1e-15, atol=1e-15)
