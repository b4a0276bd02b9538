"""Constant folding: a subgraph computed from parameters and buffers alone -> one buffer, evaluated at fuse time.

Each hand-built case runs the pass on a traced float64 graph and checks exactness (relative L2 error below 1e-12
against the pristine model), what is left in the graph and the report; what must stay code (random ops, in-place
updates, a view of a tensor, a result too large) stays, a refused size with its reason.  Through ``reparam.fuse``:
the buffer's dtype (float16 model -> float16 buffer), the fused model's ``state_dict``, and timm's LeViT,
EfficientViT-MSRA (no gather of the attention biases left) and NF-RegNet (weight standardisation folded).
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import reparam
from reparam.passes.constants import EVENT, MIB, SizeRule, fold_constants

from .conftest import Lambda, traced

torch.set_num_threads(1)


class Biased(nn.Module):
    """LeViT's attention bias: a parameter table gathered by an index buffer on every forward."""

    def __init__(self, heads: int = 2, n: int = 9):
        super().__init__()
        self.attention_biases = nn.Parameter(torch.randn(heads, n))
        self.register_buffer("attention_bias_idxs", torch.randint(0, n, (n, n)), persistent=False)
        self.proj = nn.Linear(n, n)

    def forward(self, x):  # x: (batch, heads, n, n)
        return self.proj((x + self.attention_biases[:, self.attention_bias_idxs]).softmax(-1))


class StdConv(nn.Module):
    """timm's StdConv2d: the weight standardised by a functional batch norm, then a functional conv."""

    def __init__(self, cin: int = 3, cout: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.randn(cout))

    def forward(self, x):
        w = F.batch_norm(
            self.weight.reshape(1, self.weight.shape[0], -1), None, None, training=True, momentum=0.0, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, padding=1)


def folded(case) -> list:
    return [n for n in case.gm.graph.nodes if n.op == "get_attr" and str(n.target).endswith("_folded")]


def gathers(gm: fx.GraphModule) -> int:
    """getitem nodes indexed by a tensor the module holds (a gather on every forward)."""

    def indexed_by_a_tensor_held(node: fx.Node) -> bool:
        index: list = []
        fx.node.map_arg(node.args[1:], index.append)
        return any(n.op == "get_attr" for n in index)

    return sum(
        n.op == "call_function" and n.target is operator.getitem and indexed_by_a_tensor_held(n) for n in gm.graph.nodes
    )


def test_an_indexed_bias_becomes_one_buffer():
    case = traced(Biased(), torch.randn(2, 2, 9, 9))
    assert gathers(case.gm) == 1
    assert case.run(fold_constants)
    assert gathers(case.gm) == 0
    [read] = folded(case)
    assert read.target == "attention_biases_folded"
    assert tuple(case.gm.get_buffer(read.target).shape) == (2, 9, 9)
    assert "attention_bias_idxs" not in {str(n.target) for n in case.nodes("get_attr")}
    assert case.events[EVENT] == 1
    [rewrite] = case.report.rewrites
    assert rewrite.before == "getitem of attention_biases, attention_bias_idxs"
    assert rewrite.after == "buffer attention_biases_folded 2x9x9"
    case.assert_exact()


def test_a_standardised_weight_feeding_a_functional_conv_is_folded():
    case = traced(Lambda(lambda s, x: F.relu(s.conv(x)), conv=StdConv()), torch.randn(2, 3, 6, 6))
    assert F.batch_norm in case.functions()
    assert case.run(fold_constants)
    assert F.batch_norm not in case.functions() and "reshape" not in case.methods()
    [conv] = [n for n in case.nodes("call_function") if n.target is F.conv2d]
    assert conv.args[1].op == "get_attr" and conv.args[1].target == "conv.weight_folded"  # next to its block
    assert case.report.rewrites[0].where == "conv"
    case.assert_exact()


def test_a_shared_parameter_keeps_its_raw_use():
    model = Lambda(lambda s, x: x @ s.w + x @ (s.w * s.scale).t())
    model.w = nn.Parameter(torch.randn(5, 5))
    model.scale = nn.Parameter(torch.randn(5))
    case = traced(model, torch.randn(3, 5))
    assert case.run(fold_constants).changed == 1
    assert {str(n.target) for n in case.nodes("get_attr")} == {"w", "w_folded"}
    assert isinstance(case.gm.w, nn.Parameter)
    case.assert_exact()


def test_an_untouched_tensor_is_left_alone():
    """A get_attr or a chain of views of one: nothing to save, and a copy would double the memory."""
    model = Lambda(lambda s, x: F.linear(x, s.w.t().reshape(4, 6)[1:], s.b) + s.b.view(1, -1)[:, :3])
    model.w = nn.Parameter(torch.randn(6, 4))
    model.b = nn.Parameter(torch.randn(3))
    case = traced(model, torch.randn(2, 6))
    assert not case.run(fold_constants)
    assert not folded(case) and not case.report.rewrites and not case.report.refusals
    assert case.methods() == ["t", "reshape", "view"]


def test_random_ops_are_not_folded():
    model = Lambda(lambda s, x: x + torch.randn_like(s.b) * 0 + torch.rand(3) * 0 + torch.normal(s.b, 1.0) * 0)
    model.b = nn.Parameter(torch.randn(3))
    case = traced(model, torch.randn(2, 3))
    assert not case.run(fold_constants)
    assert not folded(case)


def test_normalize_is_deterministic_and_folds():
    model = Lambda(lambda s, x: x @ F.normalize(s.w, dim=0))
    model.w = nn.Parameter(torch.randn(4, 3))
    case = traced(model, torch.randn(2, 4))
    assert case.run(fold_constants)
    assert F.normalize not in case.functions()
    case.assert_exact()


class Counting(nn.Module):
    """Buffers written in place on every forward: what reads them differs from call to call."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))
        self.register_buffer("count", torch.ones(3))
        self.register_buffer("out", torch.zeros(3))

    def forward(self, x):
        self.count.add_(1)
        torch.mul(self.w, 2.0, out=self.out)
        private = self.w * 3
        private.add_(1)
        return x * (self.w * self.count) + self.out.exp() + private


def test_tensors_written_in_place_are_not_folded():
    case = traced(Counting(), torch.randn(2, 3), shapes=False)
    assert not case.run(fold_constants)
    assert not folded(case)
    assert {"add_", "exp"} <= set(case.methods())


def test_a_constant_the_model_returns_is_kept():
    """A caller may write into what the model returns: as a buffer, that would change the next forward."""
    model = Lambda(lambda s, x: (x * (s.w + 1), (s.w * 2).view(-1)))
    model.w = nn.Parameter(torch.randn(3))
    case = traced(model, torch.randn(2, 3))
    assert case.run(fold_constants).changed == 1  # s.w + 1 only
    assert case.refused("constant kept: mul, view of w: the model returns it")
    case.assert_exact()


def test_a_tensor_handed_to_untraced_code_is_not_folded():
    """A module fx did not trace into may write its argument in place."""

    class Opaque(nn.Identity):  # not a torch.nn module: its code is the model's
        pass

    Opaque.__module__ = __name__
    model = Lambda(lambda s, x: x + s.m(s.w * 2) + s.w * 3, m=nn.Identity())
    model.w = nn.Parameter(torch.randn(3))
    case = traced(model, torch.randn(2, 3))
    case.gm.m = Opaque()  # as a leaf fx did not trace into
    assert case.run(fold_constants).changed == 1  # s.w * 3, not s.w * 2
    [read] = folded(case)
    assert [u.target for u in read.users] == [operator.add]
    case.assert_exact()


def test_a_batch_norm_updating_running_statistics_is_not_folded():
    model = Lambda(lambda s, x: x + F.batch_norm(s.w, s.mean, s.var, training=True))
    model.w = nn.Parameter(torch.randn(4, 3))
    model.register_buffer("mean", torch.zeros(3))
    model.register_buffer("var", torch.ones(3))
    case = traced(model, torch.randn(4, 3), shapes=False)
    assert not case.run(fold_constants)
    assert F.batch_norm in case.functions()


def test_a_bias_expanded_to_an_activation_is_refused_with_its_reason():
    def forward(s, x):
        return x + (s.b * s.g).view(1, -1, 1, 1).expand(1, 4, 256, 256).contiguous()

    model = Lambda(forward)
    model.b = nn.Parameter(torch.randn(4))
    model.g = nn.Parameter(torch.randn(4))
    case = traced(model, torch.randn(1, 4, 256, 256))
    assert case.run(fold_constants).changed == 1  # what it is computed from still folds
    assert "contiguous" in case.methods() and "expand" in case.methods()
    [read] = folded(case)
    assert tuple(case.gm.get_buffer(read.target).shape) == (1, 4, 1, 1)  # (b * g).view(...): a view of a product
    [reason] = case.reasons
    assert reason.startswith("constant kept: mul, view, expand, contiguous of b, g: its 2.0 MiB would be 32768x")
    assert "more than 1.0 MiB only when at most 16x its inputs" in reason
    case.assert_exact()


def test_the_size_rule():
    rule = SizeRule()
    levit = 4 * 196 * 196 * 4, 4 * 196 * 4 + 196 * 196 * 8  # float32 (heads, N, N) from biases and int64 indices
    assert rule.refusal(*levit) is None
    assert rule.refusal(8 * MIB, 1 * MIB) is None  # 8x its inputs
    assert "would be 32x the 1.0 MiB" in rule.refusal(32 * MIB, 1 * MIB)
    assert "too large" in rule.refusal(65 * MIB, 65 * MIB)
    assert rule.refusal(MIB, 0) is None  # small: folds whatever it grows by
    case = traced(Biased(), torch.randn(2, 2, 9, 9))
    assert not case.run(fold_constants, sizes=SizeRule(max_bytes=100))
    assert case.refused("too large a buffer (a buffer holds at most 100 B")


def test_dtypes_follow_the_model_precision():
    """The new buffer's cast-back dtype: the subgraph run in each input's; integer results stay integer."""
    model = Lambda(lambda s, x: torch.gather(x + s.b * 2, 1, s.idx + 1))
    model.b = nn.Parameter(torch.randn(3))
    model.register_buffer("idx", torch.zeros(2, 2, dtype=torch.long))
    case = traced(model, torch.randn(2, 3))
    result = case.run(fold_constants, dtypes={"b": torch.float16, "idx": torch.int64})
    assert dict(result.buffer_dtypes) == {"b_folded": torch.float16, "idx_folded": torch.int64}
    assert case.gm.get_buffer("b_folded").dtype == torch.float64  # float64 while the pipeline folds
    case.assert_exact()


def test_a_float16_model_gets_a_float16_buffer():
    model = Biased().half().eval()
    x = torch.randn(2, 2, 9, 9).half()
    fused = reparam.fuse(model, (x,))
    buffers = {k: v for k, v in fused.state_dict().items() if k.endswith("_folded")}
    assert [v.dtype for v in buffers.values()] == [torch.float16]
    assert [tuple(v.shape) for v in buffers.values()] == [(2, 9, 9)]
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)  # the gather is exact in any precision
    fused32 = reparam.fuse(Biased().eval(), (x.float(),), dtype=torch.float16)
    assert fused32.attention_biases_folded.dtype == torch.float16


def test_the_fused_state_dict_holds_the_buffer():
    model = Biased().eval()
    x = torch.randn(2, 2, 9, 9)
    fused, report = reparam.fuse_with_report(model, (x,))
    state = fused.state_dict()
    assert "attention_biases_folded" in state and "attention_biases" not in state
    assert report.counts()[EVENT] == 1 and report.max_rel_error < 1e-12
    again = reparam.fuse(Biased().eval(), (x,))
    again.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(again(x), fused(x), rtol=0, atol=0)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-6, atol=1e-6)


def test_a_folded_weight_lets_collapse_lift_its_conv():
    """StdConv then ``+ 1``: the conv reads a buffer, and collapse folds the shift into one conv module."""
    model = Lambda(lambda s, x: s.conv(x) + 1, conv=StdConv()).eval()
    fused, report = reparam.fuse_with_report(model, (torch.randn(2, 3, 6, 6),))
    assert report.counts()[EVENT] == 1 and report.max_rel_error < 1e-12
    assert [type(m) for m in fused.children()] == [nn.Conv2d]


def _fused_graphs(fused: nn.Module) -> list:
    return [m for m in fused.modules() if isinstance(m, fx.GraphModule)]


@pytest.mark.parametrize("name", ["levit_128s", "levit_conv_128s", "efficientvit_m0"])
def test_timm_attention_biases_are_folded(name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    fused, report = reparam.fuse_with_report(model, (x,))
    attentions = [m for m in model.modules() if hasattr(m, "attention_bias_idxs")]
    assert attentions and report.counts()[EVENT] >= len(attentions)
    assert sum(gathers(g) for g in _fused_graphs(fused)) == 0
    assert not [k for k in fused.state_dict() if k.endswith("attention_biases")]
    assert report.max_rel_error < 1e-12  # float64 against the original: the folded values are exact
    with torch.no_grad():
        want = model(x)
        assert ((fused(x) - want).norm() / want.norm()).item() < 1e-4


def test_timm_scaled_std_conv_weights_are_folded():
    timm = pytest.importorskip("timm")
    from timm.layers import ScaledStdConv2d

    model = timm.create_model("nf_regnet_b1", pretrained=False).eval()
    convs = [m for m in model.modules() if isinstance(m, ScaledStdConv2d)]
    x = torch.randn(1, 3, 224, 224)
    fused, report = reparam.fuse_with_report(model, (x,))
    assert report.counts()[EVENT] == len(convs) > 0  # one standardised weight per conv
    assert all(F.batch_norm not in [n.target for n in g.graph.nodes] for g in _fused_graphs(fused))
    assert report.max_rel_error < 1e-12
