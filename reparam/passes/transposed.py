"""fold_bn into transposed convolutions: ``BN(ConvTranspose(x)) -> ConvTranspose'(x)``.

A transposed convolution is linear with one output channel per column of its weight, so an inference
BatchNorm after it (``y = s[c] * z + t[c]``) scales that column and shifts the bias: exact, like the fold
into a convolution.  The affine algebra does not model transposed convolutions (their output grid is
the input's, spread), so this is its own small rule; the BatchNorm formula is :func:`reparam.affine.batchnorm`.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.conv import _ConvTransposeNd

from .. import affine as A
from ..lift import Constants, Lifter, NotAffine, OpKind, Unary
from ..match import called_module, is_transposed_conv
from ..proofs import same_origin
from ..report import Report, Rewrite
from . import PassResult
from .cleanup import regenerate
from .mutation import mutation_barriers, real_users


def fold_bn_into_transposed_convs(gm: fx.GraphModule, report: Report) -> PassResult:
    """before -> after: ``bn(deconv(x))`` -> ``deconv'(x)``; ``changed``: how many were folded.

    Precondition (else left as it is, with the reason): the BatchNorm uses running statistics, reads the
    transposed conv's output and is its only reader, and neither is an in-place barrier.
    """
    modules = dict(gm.named_modules())
    lifter = Lifter(gm, Constants(gm))
    barriers = mutation_barriers(gm).barriers
    created = []
    for node in list(gm.graph.nodes):
        source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        deconv = called_module(source, modules) if source is not None else None
        if source is None or not is_transposed_conv(deconv):
            continue
        try:
            op = lifter.lift(node)
        except (NotAffine, A.Refusal):  # not an affine op of it (a refusal is collapse's to report)
            continue
        if not isinstance(op, Unary) or op.kind is not OpKind.BATCHNORM or op.source is not source or op.affine is None:
            continue
        if real_users(source) != [node] or node in barriers or source in barriers:
            report.refuse(
                str(source.target), "BatchNorm after a transposed conv kept: the conv output has other readers"
            )
            continue
        where = str(source.target)
        name = f"{source.target}_bn"
        gm.add_submodule(name, _folded(deconv, op.affine))
        created.append(name)
        source.target = name
        same_origin(source, node)  # it computes what the BatchNorm computed
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        report.rewrites.append(Rewrite(where, "transposed conv, batchnorm", "transposed conv", ("fold_bn",)))
    if created:
        gm.graph.lint()
        regenerate(gm)
        gm.delete_all_unused_submodules()
    return PassResult(len(created), tuple(created))


def _folded(deconv: _ConvTransposeNd, bn: A.Affine) -> _ConvTransposeNd:
    """``deconv`` with the BatchNorm ``bn``'s per-channel scale in its weight columns and its shift in the bias."""
    scale = bn.weight.reshape(-1)
    shift = bn.bias if bn.bias is not None else torch.zeros_like(scale)
    weight = deconv.weight.detach().to(torch.float64)
    cin, cout_per_group = weight.shape[0], weight.shape[1]
    groups = deconv.groups
    # column j of input row r feeds output channel (r // (cin / groups)) * (cout / groups) + j
    channel = (torch.arange(cin)[:, None] // (cin // groups)) * cout_per_group + torch.arange(cout_per_group)
    column_scale = scale[channel].reshape(cin, cout_per_group, *([1] * (weight.dim() - 2)))
    bias = deconv.bias.detach().to(torch.float64) if deconv.bias is not None else torch.zeros_like(scale)
    folded = copy.deepcopy(deconv)
    folded.weight = nn.Parameter((weight * column_scale).to(deconv.weight.dtype), requires_grad=False)
    folded.bias = nn.Parameter((bias * scale + shift).to(deconv.weight.dtype), requires_grad=False)
    return folded
