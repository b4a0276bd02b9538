"""Affine -> a plain torch.nn module (ConvNd, Linear, ChannelAffine), built without default init."""

from __future__ import annotations

import torch
import torch.nn as nn

from . import affine as A
from .modules import ChannelAffine

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_PADS = {1: nn.ConstantPad1d, 2: nn.ConstantPad2d, 3: nn.ConstantPad3d}


_WITHOUT_INIT: dict = {}  # torch.nn class -> its subclass whose reset_parameters does nothing


def _uninitialised(cls: type, *args, **kwargs) -> nn.Module:
    """``cls(*args, **kwargs)`` with meta-device parameters and no random initialisation (the caller assigns every
    parameter): built as a subclass whose ``reset_parameters`` does nothing, then made a plain ``cls``.  (The default
    init costs more than the rest of building the module, even on the meta device.)"""
    if cls not in _WITHOUT_INIT:
        _WITHOUT_INIT[cls] = type(f"Uninitialised{cls.__name__}", (cls,), {"reset_parameters": lambda self: None})
    module = _WITHOUT_INIT[cls](*args, device="meta", **kwargs)
    module.__class__ = cls
    return module


def _param(t: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(t.detach().to(dtype=dtype, device=device).contiguous(), requires_grad=False)


def device_of(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters live (the CPU for a module without any): where emitted modules go."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def no_single_module(a: A.Affine) -> A.Refusal:
    """Why :func:`to_module` has no module for ``a``."""
    return A.Refusal(f"no single module pads asymmetrically with {a.padding_mode}")


def module_for(a: A.Affine, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """:func:`to_module`, raising :func:`no_single_module` where it has none."""
    module = to_module(a, dtype, device)
    if module is None:
        raise no_single_module(a)
    return module


def to_module(a: A.Affine, dtype: torch.dtype, device: torch.device | str) -> nn.Module | None:
    """One module computing ``a``; None when no single plain module can (asymmetric non-zero padding).

    channelwise -> ChannelAffine; zero pad -> ConstantPadNd; channels-last -> Linear; otherwise ConvNd (asymmetric
    zero padding becomes ``Sequential(ConstantPadNd, ConvNd)``).  Parameters are cast to ``dtype`` after folding.
    """
    if a.kind.channelwise and not a.pads:
        scale = a.weight.reshape(-1).to(dtype=dtype, device=device)
        shift = None if a.bias is None or a.bias_is_zero() else a.bias.to(dtype=dtype, device=device)
        return ChannelAffine(scale, shift, a.nd)
    if a.kind is A.Kind.PAD:
        return _PADS[a.nd](A.torch_pads(a.pad_lo, a.pad_hi), 0.0)
    if a.layout.channels_last:
        dense = A.regroup(a, 1)
        m = _uninitialised(nn.Linear, dense.in_channels, dense.out_channels, bias=a.bias is not None)
        m.weight = _param(dense.weight, dtype, device)
        if a.bias is not None:
            m.bias = _param(a.bias, dtype, device)
        return m
    symmetric = a.pad_lo == a.pad_hi
    if not symmetric and a.padding_mode != "zeros":
        return None
    m = _uninitialised(
        _CONVS[a.nd],
        a.in_channels,
        a.out_channels,
        a.kernel,
        a.stride,
        a.pad_lo if symmetric else 0,
        a.dilation,
        a.groups,
        bias=a.bias is not None,
        padding_mode=a.padding_mode,
    )
    m.weight = _param(a.weight, dtype, device)
    if a.bias is not None:
        m.bias = _param(a.bias, dtype, device)
    if symmetric:
        return m
    return nn.Sequential(_PADS[a.nd](A.torch_pads(a.pad_lo, a.pad_hi), 0.0), m)
