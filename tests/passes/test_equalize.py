"""reparam.passes.equalize on small graphs: producer / consumer layers joined by positively homogeneous ops get
balanced per-channel weight ranges (the function unchanged), residual adds share one scale vector, and every
producer whose output reaches something that does not commute with a per-channel scale is refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reparam.passes.equalize import equalize_graph, find_links

from .conftest import Lambda, Lambda2, conv, traced


def equalize(case):
    """``equalize_graph`` with refusals going to the case's report; returns its links."""
    links, _, _ = equalize_graph(case.gm, case.report.refuse)
    return links


def skewed(layer: nn.Module, seed: int = 0) -> nn.Module:
    """``layer`` with output channels of very different ranges (what equalization is for)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        spread = torch.logspace(-2, 2, layer.weight.shape[0], dtype=layer.weight.dtype)
        layer.weight.mul_(spread[torch.randperm(len(spread), generator=g)].reshape(-1, *[1] * (layer.weight.dim() - 1)))
    return layer


def out_range(layer) -> torch.Tensor:
    return layer.weight.detach().abs().flatten(1).amax(1)


def in_range(layer) -> torch.Tensor:
    return layer.weight.detach().abs().transpose(0, 1).flatten(1).amax(1)


@pytest.mark.parametrize(
    "nd,between",
    [(2, nn.ReLU()), (2, nn.MaxPool2d(2)), (1, nn.LeakyReLU(0.1)), (3, nn.Identity()), (2, nn.AvgPool2d(2))],
)
def test_a_producer_and_its_consumer_get_balanced_ranges(nd, between):
    model = nn.Sequential(skewed(conv(nd, 3, 6, 3, 1, 1)), between, conv(nd, 6, 4, 3, 1, 1))
    case = traced(model, torch.randn((2, 3) + (6,) * nd))
    links = equalize(case)
    assert [link.producer.target for link in links] == ["0"]
    first, second = case.gm.get_submodule("0"), case.gm.get_submodule("2")
    torch.testing.assert_close(out_range(first), in_range(second), rtol=1e-9, atol=0)
    assert not case.report.refusals
    case.assert_exact()


@pytest.mark.parametrize(
    "flatten", [nn.Flatten(), Lambda(lambda s, x: torch.flatten(x, 1)), Lambda(lambda s, x: x.flatten(1))]
)
def test_a_flattened_producer_is_balanced_against_the_linear_reading_it(flatten):
    model = nn.Sequential(skewed(nn.Conv2d(3, 4, 3)), nn.ReLU(), nn.AdaptiveAvgPool2d(2), flatten, nn.Linear(16, 5))
    case = traced(model, torch.randn(2, 3, 6, 6))
    (link,) = equalize(case)
    assert link.uses[0].span.flattened
    case.assert_exact()


def test_a_spatial_mean_keeps_the_channels():
    model = Lambda(
        lambda s, x: s.lin(torch.relu(s.conv(x)).mean((2, 3))), conv=skewed(nn.Conv2d(3, 4, 3)), lin=nn.Linear(4, 2)
    )
    case = traced(model, torch.randn(2, 3, 5, 5))
    (link,) = equalize(case)
    assert [use.node.target for use in link.uses] == ["lin"] and not link.uses[0].span.flattened
    case.assert_exact()


def test_a_depthwise_consumer_is_rescaled_channel_by_channel():
    model = nn.Sequential(skewed(nn.Conv2d(3, 6, 1)), nn.ReLU(), nn.Conv2d(6, 6, 3, 1, 1, groups=6))
    case = traced(model, torch.randn(2, 3, 5, 5))
    assert [link.producer.target for link in equalize(case)] == ["0"]
    # a depthwise conv reads input channel c with its filter c alone
    torch.testing.assert_close(
        out_range(case.gm.get_submodule("0")), out_range(case.gm.get_submodule("2")), rtol=1e-9, atol=0
    )
    case.assert_exact()


def test_concatenated_producers_are_read_at_their_offsets():
    def forward(s, x):
        return s.c(torch.cat([torch.relu(s.a(x)), s.b(x)], 1))

    model = Lambda(forward, a=skewed(nn.Conv2d(3, 4, 1)), b=skewed(nn.Conv2d(3, 2, 1), 1), c=nn.Conv2d(6, 5, 3))
    case = traced(model, torch.randn(2, 3, 6, 5))
    links = equalize(case)
    assert sorted(link.producer.target for link in links) == ["a", "b"]
    offsets = {link.producer.target: link.uses[0].span.offset for link in links}
    assert offsets == {"a": 0, "b": 4}
    case.assert_exact()


def test_a_channel_split_reaches_both_readers():
    def forward(s, x):
        left, right = torch.split(s.a(x), [2, 4], 1)
        return s.b(left), s.c(right)

    model = Lambda(forward, a=skewed(nn.Conv2d(3, 6, 1)), b=nn.Conv2d(2, 3, 1), c=nn.Conv2d(4, 3, 1))
    case = traced(model, torch.randn(2, 3, 4, 5))
    (link,) = equalize(case)
    assert sorted(use.node.target for use in link.uses) == ["b", "c"]
    case.assert_exact()


def test_residual_adds_join_their_producers_into_one_scale_vector():
    def forward(s, x):
        y = s.a(x) + s.b(x)
        return s.c(torch.relu(y))

    model = Lambda(forward, a=skewed(nn.Conv2d(3, 4, 3, 1, 1)), b=nn.Conv2d(3, 4, 1), c=nn.Conv2d(4, 2, 1))
    case = traced(model, torch.randn(2, 3, 5, 5))
    (link,) = equalize(case)
    assert sorted(node.target for node, _ in link.producers) == ["a", "b"]
    case.assert_exact()


def test_the_last_layer_is_not_a_producer_and_not_a_refusal():
    case = traced(nn.Sequential(nn.Conv2d(3, 4, 1)), torch.randn(2, 3, 4, 4))
    assert find_links(case.gm, case.report.refuse) == []
    assert not case.report.refusals


@pytest.mark.parametrize(
    "forward,reason",
    [
        (lambda s, x: s.b(F.silu(s.a(x))), "read by silu: silu is not known to be scale-equivariant"),
        (lambda s, x: s.b(s.act(s.a(x))), "read by act: ReLU6 is not positively homogeneous per channel"),
        (lambda s, x: s.b(torch.cat([s.a(x), s.a2(x)], 2)), "concatenates along axis 2, not channels"),
        (lambda s, x: s.b(s.a(x) + x[:, :1]), "a residual add's other operand comes from getitem"),
        (lambda s, x: s.b(s.a(x)).mean(1, keepdim=True) + s.a(x).mean(), "called more than once (shared weights)"),
        (lambda s, x: s.b(y := s.a(x)) + y.sum(), ": sum is not known to be scale-equivariant"),
        (lambda s, x: s.lin(torch.flatten(s.a(x), 0).reshape(2, -1)), "flattens from axis 0"),
        (lambda s, x: s.b(s.a(x).mean(1, keepdim=True).expand(-1, 4, -1, -1)), "mean over 1 mixes channels"),
        (lambda s, x: s.b8(torch.cat([y := s.a(x), y], 1)), "cat reads it twice"),
        (lambda s, x: s.b(torch.cat(torch.split(s.a(x), 2, 1), 1)), "split's pieces are read as a whole by cat"),
        (lambda s, x: s.b(torch.split(s.a(x), 2, 2)[0]), "split splits other than along channels"),
        (lambda s, x: s.b(s.a(x) + s.one(x)), "residual operand one has 1 channels, not 4"),
    ],
)
def test_a_producer_whose_output_is_not_scale_equivariant_is_refused(forward, reason):
    model = Lambda(
        forward,
        a=nn.Conv2d(3, 4, 1),
        a2=nn.Conv2d(3, 4, 1),
        b=nn.Conv2d(4, 4, 1),
        act=nn.ReLU6(),
        lin=nn.Linear(64, 3),
        b8=nn.Conv2d(8, 4, 1),
        one=nn.Conv2d(3, 1, 1),
    )
    case = traced(model, torch.randn(2, 3, 4, 4))
    weights = {k: v.clone() for k, v in case.gm.state_dict().items()}
    equalize(case)
    assert case.refused(reason), case.reasons
    assert torch.equal(case.gm.get_submodule("a").weight, weights["a.weight"])  # the refused producer is untouched
    case.assert_exact()


def test_a_residual_add_of_the_model_input_is_refused():
    model = Lambda2(lambda s, x, y: s.b(s.a(x) + y), a=nn.Conv2d(3, 4, 1), b=nn.Conv2d(4, 2, 1))
    case = traced(model, torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4))
    assert equalize(case) == []
    assert case.refused("a residual add's other operand comes from the model input, which cannot be rescaled")
    case.assert_exact()
