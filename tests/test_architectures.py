"""reparam.architectures: models built by name (zoo, timm, torchvision) with random weights."""

import sys

import pytest
import torch

from reparam import architectures, errors


# ------------------------------------------------------------------------------------------ architectures


def test_build_zoo_model():
    model = architectures.build_model("repvgg_digits", num_classes=3)
    assert not model.training
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert architectures.default_input_shape("repvgg_digits") == (1, 1, 8, 8)
    assert "repvgg_digits" in architectures.zoo_names()


def test_unknown_zoo_model_suggests():
    with pytest.raises(errors.UnknownArchError, match="Did you mean repvgg_a0.*reparam list"):
        architectures.build_model("repvgg_a00")
    with pytest.raises(errors.UnknownArchError, match="unknown architecture source 'keras'"):
        architectures.build_model("keras:resnet")
    with pytest.raises(errors.UnknownArchError, match="missing model name"):
        architectures.build_model("timm:")


def test_build_timm_and_torchvision_models():
    pytest.importorskip("timm")
    model = architectures.build_model("timm:test_byobnet", num_classes=5)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert architectures.default_input_shape("timm:test_byobnet", model) == (1, 3, 160, 160)
    with pytest.raises(errors.UnknownArchError, match="Did you mean timm:test_byobnet"):
        architectures.build_model("timm:test_byobnett")
    pytest.importorskip("torchvision")
    model = architectures.build_model("torchvision:squeezenet1_0", num_classes=4)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    assert architectures.default_input_shape("torchvision:squeezenet1_0", model) is None
    with pytest.raises(errors.UnknownArchError, match="torchvision.models.list_models"):
        architectures.build_model("torchvision:no_such_net")


def test_missing_third_party_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(errors.UnknownArchError, match="timm is not installed.*pip install timm"):
        architectures.build_model("timm:resnet18")
