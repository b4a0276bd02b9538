"""Deployment families: does ``reparam.fuse`` work, exactly, on detectors and segmenters?

The families: ultralytics YOLO (v8 detect / seg / pose, 11, v9t, v10n, RT-DETR), segmentation_models_pytorch
(resnet18 encoders) and torchvision's segmentation and detection models.  Small configurations, random weights
(``pretrained=False``, ``encoder_weights=None``, yaml configs: nothing is downloaded), non-trivial statistics on
every BatchNorm (``torchvision.ops.FrozenBatchNorm2d`` included), small inputs.  For each model this measures

* exactness: every output tensor of the fused float32 model against the float32 original and of the fused float64
  model against the float64 original (relative L2 error per tensor), and the tensors entering post-processing
  (``Case.probes``, recorded with hooks).  Outputs that passed non-maximum suppression or top-k (torchvision
  detections, RT-DETR's queries) are not compared in float32, where a 1e-7 change in a score may legitimately
  reorder or swap boxes, and in float64 by what exact score ties cannot change (:func:`detection_error`);
* executed convolutions and normalisations (:func:`reparam.stats.count_kernels`, :func:`reparam.stats.count_norms`:
  batch norms plus constant channel affines such as FrozenBatchNorm2d) before and after, and after the peer's own
  deploy path: ultralytics' ``model.fuse()`` (:func:`ultralytics_deploy`), else plain conv+BN folding in the style of
  ``torch.fx.experimental.optimization.fuse`` (:func:`folding_reference`: every normalisation that reads a conv
  output nothing else reads is gone, the convs stay);
* fuse time.

    python benchmarks/deploy_coverage.py                  # every case, markdown on stdout
    python benchmarks/deploy_coverage.py --out docs/coverage.md   # rewrite the section between the deploy markers
    python benchmarks/deploy_coverage.py ultralytics:yolov8n.yaml smp:Unet
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_map

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics: no update checks, no downloads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import reparam  # noqa: E402
from reparam.stats import count_kernels, count_norms, relative_error  # noqa: E402


def _coverage():
    """benchmarks/coverage.py, loaded by path (``import coverage`` may find coverage.py, the package)."""
    name = "reparam_coverage"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", "coverage.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


FP32_TOL = 1e-4  # float32 fused vs float32 original, per output tensor
FP64_TOL = 1e-9
DETECTION_SIZES = ((3, 96, 128), (3, 128, 96))  # two images of different shapes: the transform batches them


# ----------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One model of a family.

    ``build()`` returns the model in eval mode with random weights; ``inputs()`` its example inputs (a tuple of
    positional arguments).  ``peer``: ``"ultralytics"`` (compare with ``model.fuse()``) or ``"fx"`` (conv+BN folding).
    ``probes``: ``(submodule name, "input" | "output")`` pairs whose tensors enter post-processing (NMS, top-k);
    ``detections``: for a model whose outputs passed NMS / top-k, a function from its output to one
    ``(boxes, scores, labels)`` per image (compared by :func:`detection_error`).  ``slow``: left out of the CI slice.
    """

    name: str
    family: str
    package: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    peer: str = "fx"
    probes: tuple = ()
    detections: Optional[Callable[[Any], list]] = None
    slow: bool = True


def _images(batch: int = 2, size: int = 64) -> Callable[[], tuple]:
    return lambda: (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)),)


def _image_list() -> tuple:
    g = torch.Generator().manual_seed(1)
    return ([torch.rand(shape, generator=g) for shape in DETECTION_SIZES],)


def _ultralytics(cfg: str, task: str = "DetectionModel") -> Callable[[], nn.Module]:
    def build():
        from ultralytics.nn import tasks

        return getattr(tasks, task)(cfg, verbose=False).eval()

    return build


def _smp(arch: str) -> Callable[[], nn.Module]:
    def build():
        import segmentation_models_pytorch as smp

        return smp.create_model(arch, encoder_name="resnet18", encoder_weights=None, classes=3).eval()

    return build


def _torchvision(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build():
        import torchvision

        return torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=3, **kwargs).eval()

    return build


def _fcos_resnet18_frozen_bn() -> nn.Module:
    """FCOS as ``torchvision.models.detection.fcos_resnet50_fpn`` builds it for pretrained backbones (FrozenBatchNorm2d,
    P6/P7 from P5), on a ResNet-18."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    backbone = resnet_fpn_backbone(
        backbone_name="resnet18",
        weights=None,
        norm_layer=FrozenBatchNorm2d,
        trainable_layers=3,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    return FCOS(backbone, num_classes=3, min_size=128, max_size=128, score_thresh=1e-3).eval()


def _torchvision_detections(output: list) -> list:
    return [(d["boxes"], d["scores"], d["labels"]) for d in output]


def _rtdetr_detections(output: tuple) -> list:
    """RT-DETR's ``(batch, k, 6)`` predictions, ``[cx, cy, w, h, score, class]`` for its top-k queries."""
    y = output[0]
    corners = lambda p: torch.cat([p[:, :2] - p[:, 2:4] / 2, p[:, :2] + p[:, 2:4] / 2], 1)  # noqa: E731
    return [(corners(p), p[:, 4], p[:, 5]) for p in y]


_HEAD = (("backbone", "output"), ("head", "output"))
_TV_DET = {"probes": _HEAD, "detections": _torchvision_detections}

CASES = [
    Case(
        "ultralytics:yolov8n.yaml",
        "ultralytics",
        "ultralytics",
        _ultralytics("yolov8n.yaml"),
        _images(),
        peer="ultralytics",
        slow=False,
    ),
    Case(
        "ultralytics:yolov8n-seg.yaml",
        "ultralytics",
        "ultralytics",
        _ultralytics("yolov8n-seg.yaml", "SegmentationModel"),
        _images(),
        peer="ultralytics",
    ),
    Case(
        "ultralytics:yolov8n-pose.yaml",
        "ultralytics",
        "ultralytics",
        _ultralytics("yolov8n-pose.yaml", "PoseModel"),
        _images(),
        peer="ultralytics",
    ),
    Case(
        "ultralytics:yolo11n.yaml",
        "ultralytics",
        "ultralytics",
        _ultralytics("yolo11n.yaml"),
        _images(),
        peer="ultralytics",
    ),
    Case(
        "ultralytics:yolov9t.yaml",
        "ultralytics",
        "ultralytics",
        _ultralytics("yolov9t.yaml"),
        _images(),
        peer="ultralytics",
    ),
    Case(
        "ultralytics:yolov10n.yaml",
        "ultralytics",
        "ultralytics",
        _ultralytics("yolov10n.yaml"),
        _images(),
        peer="ultralytics",
    ),
    Case(
        "ultralytics:rtdetr-l.yaml",
        "ultralytics",
        "ultralytics",
        _ultralytics("rtdetr-l.yaml", "RTDETRDetectionModel"),
        _images(),
        peer="ultralytics",
        probes=(("model.28", "input"),),
        detections=_rtdetr_detections,
    ),
    Case("smp:Unet", "segmentation_models_pytorch", "segmentation_models_pytorch", _smp("Unet"), _images(), slow=False),
    *(
        Case(f"smp:{arch}", "segmentation_models_pytorch", "segmentation_models_pytorch", _smp(arch), _images())
        for arch in ("FPN", "DeepLabV3Plus", "Linknet", "PSPNet", "UnetPlusPlus")
    ),
    Case(
        "smp:PAN", "segmentation_models_pytorch", "segmentation_models_pytorch", _smp("PAN"), _images(size=128)
    ),  # its pyramid pools a 64x64 input's 2x2 features to nothing
    Case(
        "tv:lraspp_mobilenet_v3_large",
        "torchvision segmentation",
        "torchvision",
        _torchvision("lraspp_mobilenet_v3_large"),
        _images(),
        slow=False,
    ),
    Case(
        "tv:deeplabv3_mobilenet_v3_large",
        "torchvision segmentation",
        "torchvision",
        _torchvision("deeplabv3_mobilenet_v3_large"),
        _images(),
    ),
    Case("tv:fcn_resnet50", "torchvision segmentation", "torchvision", _torchvision("fcn_resnet50"), _images()),
    Case(
        "tv:ssdlite320_mobilenet_v3_large",
        "torchvision detection",
        "torchvision",
        _torchvision("ssdlite320_mobilenet_v3_large"),
        _image_list,
        **_TV_DET,
        slow=False,
    ),
    Case(
        "tv:fasterrcnn_mobilenet_v3_large_320_fpn",
        "torchvision detection",
        "torchvision",
        _torchvision("fasterrcnn_mobilenet_v3_large_320_fpn"),
        _image_list,
        probes=(("backbone", "output"), ("rpn.head", "output")),
        detections=_torchvision_detections,
    ),
    Case(
        "tv:retinanet_resnet50_fpn",
        "torchvision detection",
        "torchvision",
        _torchvision("retinanet_resnet50_fpn", min_size=128, max_size=128, score_thresh=1e-3),
        _image_list,
        **_TV_DET,
    ),  # a random head's scores sit near its prior 0.01: the default threshold 0.05 keeps none
    Case(
        "tv:fcos_resnet18_fpn (FrozenBatchNorm2d)",
        "torchvision detection",
        "torchvision",
        _fcos_resnet18_frozen_bn,
        _image_list,
        **_TV_DET,
    ),
]
BY_NAME = {c.name: c for c in CASES}


def available(case: Case) -> bool:
    """Whether the package the case needs is installed."""
    return importlib.util.find_spec(case.package) is not None


def randomize_norms_(model: nn.Module, seed: int = 0) -> nn.Module:
    """:func:`coverage.randomize_batchnorm_`'s statistics on every BatchNorm and FrozenBatchNorm2d (in place)."""
    _coverage().randomize_batchnorm_(model, seed)
    try:
        from torchvision.ops import FrozenBatchNorm2d
    except ImportError:
        return model
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bn in frozen:
            n = bn.weight.shape
            bn.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            bn.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
            bn.weight.copy_(0.5 + torch.rand(n, generator=g))
            bn.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model


def build(case: Case, seed: int = 0) -> tuple[nn.Module, tuple]:
    """(model in eval mode with random weights and norms, example inputs) of ``case``."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomize_norms_(case.build(), seed)
    return model.eval(), case.inputs()


# ----------------------------------------------------------------------------------------------- running


def clone(tree: Any) -> Any:
    """Detached copies of the tensors in ``tree`` (any pytree)."""
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree)


def to_float64(tree: Any) -> Any:
    """Float64 copies of the floating tensors in ``tree``."""
    return tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)


def run(model: nn.Module, inputs: tuple, probes: tuple = ()) -> tuple[Any, dict]:
    """(output, {probe name: its tensors}) of one forward pass on copies of ``inputs``.

    A probe records the positional inputs (``"input"``) or the output of the named submodule at its first call;
    a name the model lacks, or a submodule that is not called, raises an AssertionError naming it.
    """
    seen: dict = {}
    handles = []
    for name, what in probes:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AssertionError(
                f"{type(model).__name__} has no submodule {name!r} to compare pre-NMS tensors at"
            ) from None
        if what == "input":
            hook = lambda m, args, name=name: seen.setdefault(name, clone(args))  # noqa: E731
            handles.append(module.register_forward_pre_hook(hook))
        else:
            hook = lambda m, args, out, name=name: seen.setdefault(name, clone(out))  # noqa: E731
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            output = model(*clone(inputs))
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, _ in probes if name not in seen]
    assert not missing, f"submodules {missing} were not called"
    return output, seen


def structure(tree: Any) -> tuple:
    """(pytree spec, dtypes of the tensor leaves): container types (OrderedDict, list vs tuple), dict keys, dtypes."""
    leaves, spec = tree_flatten(tree)
    return spec, [t.dtype if isinstance(t, torch.Tensor) else type(t) for t in leaves]


def check_structure(got: Any, want: Any, what: str = "outputs") -> None:
    """Raise a ValueError saying how ``what`` (the outputs, a probe) of the fused model differ from the original's
    in containers or dtypes (see :func:`structure`)."""
    (got_spec, got_types), (want_spec, want_types) = structure(got), structure(want)
    if got_spec != want_spec:
        flat = lambda spec: " ".join(str(spec).split())  # noqa: E731
        raise ValueError(f"the fused model's {what} are structured differently: {flat(got_spec)} vs {flat(want_spec)}")
    if got_types != want_types:
        diff = sorted({f"{a} instead of {b}" for a, b in zip(got_types, want_types, strict=False) if a != b})
        raise ValueError(f"the fused model's {what} have other dtypes: {', '.join(diff)}")


def leaf_errors(got: Any, want: Any) -> dict:
    """``{leaf path: relative L2 error}`` over the floating tensor leaves of two outputs of the same structure
    (:func:`reparam.stats.relative_error`, in float64; ``inf`` for a leaf whose shape differs)."""
    errors = {}
    for (path, a), (_, b) in zip(tree_flatten_with_path(got)[0], tree_flatten_with_path(want)[0], strict=False):
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            same = isinstance(a, torch.Tensor) and a.shape == b.shape
            errors[keystr(path) or "output"] = relative_error(a, b) if same else float("inf")
    return errors


TIE = 1e-12  # detection_error: scores this close (relative) are a tie that rounding may break either way


def _ties(scores: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """For each score, how many of ``others`` lie within :data:`TIE` of it (relative)."""
    return ((others[None, :] - scores[:, None]).abs() <= TIE * scores.abs()[:, None]).sum(1)


def detection_error(got: list, want: list) -> float:
    """Worst relative difference between two models' detections after NMS / top-k, per image.

    ``got`` / ``want``: one ``(boxes, scores, labels)`` per image (``Case.detections``).  NMS and top-k break exact
    score ties arbitrarily, and random nets have many (saturated activations): rounding noise of 1e-16 then
    reorders tied detections, lets NMS keep the other of two overlapping tied boxes, and that may suppress or free a
    third.  So the comparison is of what ties cannot change: the same number of detections, the same scores
    (sorted, relative error), the same number per label, and for every detection whose score ties with no other
    (:data:`TIE`, in either model), the same box (error relative to the largest coordinate) and label.  ``inf``
    when counts or labels differ or an untied detection has no partner.  Box regressions themselves are compared
    before post-processing (``Case.probes``).
    """
    worst = 0.0
    for (gb, gs, gl), (wb, ws, wl) in zip(got, want, strict=False):
        if gs.shape != ws.shape or not torch.equal(torch.sort(gl).values, torch.sort(wl).values):
            return float("inf")
        if ws.numel() == 0:
            continue
        gb, gs, wb, ws = gb.double(), gs.double(), wb.double(), ws.double()
        sorted_gap = (torch.sort(gs).values - torch.sort(ws).values).abs() / ws.abs().max()
        worst = max(worst, float(sorted_gap.max()))
        untied = torch.nonzero((_ties(ws, ws) == 1) & (_ties(ws, gs) == 1)).flatten()
        partner = ((gs[None, :] - ws[untied, None]).abs() <= TIE * ws[untied].abs()[:, None]).float().argmax(1)
        if len(untied) and not bool(torch.all(gl[partner] == wl[untied])):
            return float("inf")
        if len(untied):
            scale = wb.abs().max().clamp_min(1.0)
            worst = max(worst, float((gb[partner] - wb[untied]).abs().max() / scale))
    return worst


def worst_error(got: Any, want: Any) -> float:
    """The largest of :func:`leaf_errors` (0.0 without floating leaves)."""
    return max(leaf_errors(got, want).values(), default=0.0)


# ----------------------------------------------------------------------------------------------- peers


def ultralytics_deploy(model: nn.Module) -> nn.Module:
    """ultralytics' own deploy path, ``model.fuse()`` (conv+BN folding, RepConv / RepVGGDW merging), on a copy.

    Its head-branch removal is switched off: ``Detect.fuse`` drops the one-to-one (or one-to-many) head of an
    end-to-end model (YOLOv10), which changes what the model returns, so it is no rewrite of the same function.
    """
    from ultralytics.nn.modules.head import Detect

    deploy = copy.deepcopy(model)
    for module in deploy.modules():
        if isinstance(module, Detect):
            module.fuse = lambda: None  # an instance attribute shadows the method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return deploy.fuse(verbose=False).eval()


def kernel_counts(model: nn.Module, inputs: tuple) -> dict:
    """``{"conv", "norm", "foldable"}``: convolutions, normalisations (batch norms and constant channel affines)
    executed in one forward pass, and how many of the norms read a conv output nothing else reads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kernels = count_kernels(model, clone(inputs))
        norms = count_norms(model, clone(inputs))
    return {
        "conv": kernels["conv"],
        "norm": norms["batch_norm"] + norms["channel_affine"],
        "foldable": norms["foldable"],
    }


def folding_reference(before: dict) -> dict:
    """What plain conv+BN folding leaves of ``before`` (:func:`kernel_counts` of the original): the same convs, the
    normalisations that do not directly follow a single-use conv."""
    return {"conv": before["conv"], "norm": before["norm"] - before["foldable"]}


def peer_counts(case: Case, model: nn.Module, inputs: tuple, before: dict) -> tuple[dict, str]:
    """(kernel counts after the peer's deploy path, its label)."""
    if case.peer == "ultralytics":
        return kernel_counts(ultralytics_deploy(model), inputs), "ultralytics fuse()"
    return folding_reference(before), "conv+BN folding"


# ----------------------------------------------------------------------------------------------- measuring


@dataclass
class Row:
    """One case's measurements (None: not measured, because an earlier step failed)."""

    name: str
    family: str
    err32: Optional[float] = None
    err64: Optional[float] = None
    before: Optional[dict] = None
    after: Optional[dict] = None
    peer: Optional[dict] = None
    peer_label: str = ""
    fuse_s: Optional[float] = None
    error: str = ""

    @property
    def exact(self) -> bool:
        return (
            not self.error
            and self.err32 is not None
            and self.err32 <= FP32_TOL
            and self.err64 is not None
            and self.err64 <= FP64_TOL
        )


def float32_error(case: Case, model: nn.Module, fused: nn.Module, inputs: tuple) -> float:
    """Worst relative error in float32: of the outputs, or of the probes when the outputs passed NMS / top-k."""
    want, want_probes = run(model, inputs, case.probes)
    got, got_probes = run(fused, inputs, case.probes)
    check_structure(got, want)
    for name, what in case.probes:
        check_structure(got_probes[name], want_probes[name], f"{name} {what}s")
    if case.detections is not None:  # after NMS / top-k: only what enters post-processing compares in float32
        return max(worst_error(got_probes[name], want_probes[name]) for name, _ in case.probes)
    return worst_error(got, want)


def float64_error(case: Case, model: nn.Module, inputs: tuple) -> float:
    """Worst relative error of the float64 fused model (outputs and probes) against the float64 original."""
    m64, x64 = copy.deepcopy(model).double(), to_float64(inputs)
    fused64 = reparam.fuse(m64, x64)
    want, want_probes = run(m64, x64, case.probes)
    got, got_probes = run(fused64, x64, case.probes)
    check_structure(got, want)
    for name, what in case.probes:
        check_structure(got_probes[name], want_probes[name], f"{name} {what}s")
    err = output_error(case, got, want)
    if case.detections is not None and not err <= FP64_TOL:
        err = min(err, FP64_TOL) if err <= own_detection_noise(case, m64, x64, want) else err
    return max([err] + [worst_error(got_probes[n], want_probes[n]) for n, _ in case.probes])


def own_detection_noise(case: Case, model64: nn.Module, inputs64: Any, want: Any) -> float:
    """How far the float64 original's detections move when the original itself is rounded differently (every
    weight scaled by ``1 + 4 ulp``, :func:`reparam.verify.perturbed`): NMS over near-tied scores can keep another
    box.  A fused model whose detections are no further from the original than that counts as exact."""
    from reparam.verify import perturbed

    twin, _ = run(perturbed(model64), inputs64, ())
    return detection_error(case.detections(twin), case.detections(want))


def output_error(case: Case, got: Any, want: Any) -> float:
    """Worst relative error of the outputs: of the detections matched one to one (:func:`detection_error`) when
    they passed NMS / top-k, else of every tensor."""
    if case.detections is not None:
        return detection_error(case.detections(got), case.detections(want))
    return worst_error(got, want)


def measure(case: Case) -> Row:
    """Every measurement of one case; an exception ends it, recorded in ``Row.error``."""
    row = Row(case.name, case.family)
    try:
        model, inputs = build(case)
        row.before = kernel_counts(model, inputs)
        row.peer, row.peer_label = peer_counts(case, model, inputs, row.before)
        start = time.perf_counter()
        fused = reparam.fuse(model, inputs)
        row.fuse_s = time.perf_counter() - start
        row.after = kernel_counts(fused, inputs)
        row.err32 = float32_error(case, model, fused, inputs)
        row.err64 = float64_error(case, model, inputs)
    except Exception as err:  # noqa: BLE001  a sweep over third-party models: the table says what broke
        text = str(err).strip().splitlines()
        row.error = f"{type(err).__name__}: {text[0][:160] if text else ''}"
    return row


# ----------------------------------------------------------------------------------------------- table

START, END = "<!-- deploy:start -->", "<!-- deploy:end -->"


def _counts(c: Optional[dict]) -> str:
    return f"{c['conv']}/{c['norm']}" if c else "-"


def _err(e: Optional[float]) -> str:
    return "-" if e is None else f"{e:.0e}"


def markdown(rows: list, command: str) -> str:
    """The section for docs/coverage.md: one line per model."""
    exact = sum(r.exact for r in rows)
    lines = [
        "## Detection and segmentation models",
        "",
        f"**{exact}/{len(rows)} fused exactly** (every output tensor within {FP32_TOL:.0e} of the float32 original "
        f"in float32, {FP64_TOL:.0e} of the float64 original in float64, and so are the tensors entering NMS / top-k; "
        "after NMS / top-k, float32 outputs are not compared, float64 detections by what exact score ties cannot "
        "change: counts, sorted scores, labels, boxes of untied detections; or no further from the original than the "
        "original rounded differently). Kernels: executed convolutions / normalisations (batch norms and constant "
        "channel affines such as FrozenBatchNorm2d). Peer: ultralytics' own `model.fuse()` (its head-branch removal, "
        "which changes the outputs, switched off), else plain conv+BN folding (what "
        "`torch.fx.experimental.optimization.fuse` removes: every norm reading a single-use conv output). Fuse time: "
        "wall seconds of `reparam.fuse` with its float64 verification, one thread.",
        "",
        "| model | family | exact | rel. err fp32 / fp64 | before | after | peer | peer after | fuse s | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = "yes" if r.exact else "**NO**"
        fuse = f"{r.fuse_s:.1f}" if r.fuse_s is not None else "-"
        lines.append(
            f"| {r.name} | {r.family} | {mark} | {_err(r.err32)} / {_err(r.err64)} | {_counts(r.before)} | "
            f"{_counts(r.after)} | {r.peer_label or '-'} | {_counts(r.peer)} | {fuse} | "
            f"{r.error.replace('|', '/')} |"
        )
    lines += [
        "",
        f"torch {torch.__version__}, {_coverage()._versions()}, {_package_versions()}; generated by `{command}`.",
        "",
    ]
    return "\n".join(lines)


def _package_versions() -> str:
    from reparam.packages import package_version

    found = [(package, package_version(package)) for package in ("ultralytics", "segmentation-models-pytorch")]
    return ", ".join(f"{package} {version}" for package, version in found if version is not None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help=f"case names (default: all): {', '.join(BY_NAME)}")
    parser.add_argument("--out", help="rewrite the section between the deploy markers of this markdown file")
    args = parser.parse_args(argv)
    unknown = [n for n in args.cases if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown cases {unknown}")
    torch.set_num_threads(1)
    cases = [BY_NAME[n] for n in args.cases] if args.cases else [c for c in CASES if available(c)]
    rows = []
    for case in cases:
        rows.append(measure(case))
        r = rows[-1]
        print(
            f"# {r.name}: {'exact' if r.exact else 'NOT EXACT'} {_err(r.err32)}/{_err(r.err64)} "
            f"{_counts(r.before)} -> {_counts(r.after)} peer {_counts(r.peer)} {r.error}",
            file=sys.stderr,
            flush=True,
        )
    table = markdown(rows, "python benchmarks/deploy_coverage.py" + (f" --out {args.out}" if args.out else ""))
    print(table)
    if args.out:
        _coverage().update_readme(args.out, table, START, END)
    return 0 if all(r.exact for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
