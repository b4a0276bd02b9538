"""fold_bn into transposed convolutions (``reparam.passes.transposed``), alone and through ``reparam.fuse``."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn
from conftest import core_settings, count_ops, random_bn, rel_err
from hypothesis import given
from hypothesis import strategies as st

import reparam
from reparam.passes.transposed import fold_bn_into_transposed_convs
from reparam.report import Report
from reparam.trace import propagate_shapes

_DECONV = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@st.composite
def deconv_bn(draw):
    nd = draw(st.sampled_from([1, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    stride, k = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    deconv = _DECONV[nd](
        cin,
        cout,
        k,
        stride=stride,
        padding=draw(st.integers(0, (k - 1) // 2)),
        output_padding=draw(st.integers(0, stride - 1)),
        groups=groups,
        bias=draw(st.booleans()),
        dilation=1,
    )
    model = nn.Sequential(deconv, random_bn(_BN[nd](cout))).double().eval()
    x = torch.randn((2, cin) + (draw(st.integers(2, 5)),) * nd, dtype=torch.float64)
    return model, x


@given(case=deconv_bn())
@core_settings(60)
def test_bn_after_a_transposed_conv_folds_exactly(case):
    model, x = case
    gm = fx.symbolic_trace(copy.deepcopy(model))
    propagate_shapes(gm, (x,))  # as the pipeline does: BatchNorm1d needs its input's rank
    report = Report()
    assert fold_bn_into_transposed_convs(gm, report).changed == 1
    assert report.counts()["fold_bn"] == 1
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-12
    assert count_ops(gm, x)["bn"] == 0


def test_a_transposed_conv_with_another_reader_keeps_its_bn():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 4, 2, stride=2)
            self.bn = random_bn(nn.BatchNorm2d(4))

        def forward(self, x):
            y = self.up(x)
            return self.bn(y), y

    gm = fx.symbolic_trace(Shared().eval())
    report = Report()
    assert fold_bn_into_transposed_convs(gm, report).changed == 0
    assert any("other readers" in r.reason for r in report.refusals)


def test_fuse_folds_a_decoder_bn_into_its_upsampling():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 4, 2, stride=2),
        random_bn(nn.BatchNorm2d(4)),
        nn.ReLU(),
    ).eval()
    x = torch.randn(1, 3, 8, 8)
    fused = reparam.fuse(model, (x,))
    assert count_ops(fused, x)["bn"] == 0 and count_ops(fused, x)["conv"] == 2
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-5
