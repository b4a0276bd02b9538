"""Training-time model zoo (shipped as ``reparam.models``).

Only training-time definitions live here: multi-branch blocks and the networks built from them.
Deployment (merging the branches into plain convolutions) is :func:`reparam.fuse`'s job.

    >>> import reparam.models as zoo
    >>> model = zoo.create("repvgg_a0")          # official RepVGG-A0 training layout
    >>> "mobileone_s0" in zoo.names()
    True
"""

from . import mobileone, repvgg, resnet_variants, resnext  # noqa: F401  (importing registers the models)
from .blocks import (
    ACBlock,
    ConvBN,
    DiverseBranchBlock,
    MobileOneBlock,
    QARepVGGBlock,
    RepLKBlock,
    RepVGGBlock,
    RepVGGSqueezeExcite,
    SqueezeExcite,
)
from .mobileone import MobileOne
from .registry import ModelSpec, create, names, register, spec
from .repvgg import RepVGG
from .resnet_variants import BasicBlock, ResNet18
from .resnext import MultiPathBottleneck, MultiPathResNeXt

__all__ = [
    "create",
    "names",
    "spec",
    "register",
    "ModelSpec",
    "ConvBN",
    "SqueezeExcite",
    "RepVGGSqueezeExcite",
    "RepVGGBlock",
    "MobileOneBlock",
    "ACBlock",
    "DiverseBranchBlock",
    "QARepVGGBlock",
    "RepLKBlock",
    "RepVGG",
    "MobileOne",
    "ResNet18",
    "BasicBlock",
    "MultiPathBottleneck",
    "MultiPathResNeXt",
]
