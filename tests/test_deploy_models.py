"""``reparam.fuse`` on deployment models: ultralytics YOLO, segmentation_models_pytorch, torchvision segmentation
and detection.

The cases (small configurations, random weights, random statistics on every BatchNorm and FrozenBatchNorm2d,
nothing downloaded) and the measuring code live in ``benchmarks/deploy_coverage.py``, which also renders their
table in docs/coverage.md.  For every case:

* ``reparam.fuse`` does not raise;
* the outputs have the original's structure (pytree spec: container types such as OrderedDict, list vs tuple,
  dict keys) and dtypes, in float32 and in float64;
* float32: every output tensor within 1e-4 (relative L2) of the float32 original.  Outputs after NMS / top-k
  (torchvision detections, RT-DETR's queries) are not compared in float32: a change of 1e-7 in a score can
  legitimately reorder or swap boxes.  The tensors entering post-processing are compared instead (``Case.probes``:
  the backbone and head outputs, RT-DETR's decoder inputs, recorded with hooks on the fused model's submodules of
  the same name);
* float64: every probe within 1e-9 of the float64 original, and every output tensor; after NMS / top-k, the same
  detections (boxes, scores within 1e-9, labels), matched one to one: exact score ties, which a random net has
  many of (anchors over a border), may come in any order, as NMS and top-k order them arbitrarily;
* the input model is untouched: state dict bit-identical, same module types, same plain tensor attributes, same mode;
* executed convolutions and normalisations (batch norms plus constant channel affines such as FrozenBatchNorm2d,
  counted on ATen ops) are no more than after the peer's own deploy path: ultralytics' ``model.fuse()``, else plain
  conv+BN folding (every normalisation reading a conv output nothing else reads is gone, no conv added).

The CI slice keeps one small case per family (two for smp: Unet, and FPN whose decoder reads the encoder's
``output_stride``); the others are ``slow`` (``python -m pytest tests/test_deploy_models.py -m slow``).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import warnings

import pytest
import torch

import reparam

_SPEC = importlib.util.spec_from_file_location(
    "reparam_deploy_coverage", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "deploy_coverage.py")
)
D = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = D  # dataclasses look their module up there
_SPEC.loader.exec_module(D)

CI_SLICE = {
    "ultralytics:yolov8n.yaml",
    "smp:Unet",
    "smp:FPN",
    "tv:lraspp_mobilenet_v3_large",
    "tv:ssdlite320_mobilenet_v3_large",
}
_INSTALL = {
    "ultralytics": "ultralytics",
    "segmentation_models_pytorch": "segmentation-models-pytorch",
    "torchvision": "torchvision",
}


def _param(case):
    marks = [
        pytest.mark.skipif(
            not D.available(case), reason=f"{case.package} is not installed (pip install {_INSTALL[case.package]})"
        )
    ]
    if case.name not in CI_SLICE:
        marks.append(pytest.mark.slow)
    return pytest.param(case, marks=marks, id=case.name)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _snapshot(model) -> dict:
    """What fusing must leave alone: mode, state dict (bit for bit), module types, plain tensor attributes
    (ultralytics' Detect caches its anchors and strides in them)."""
    return {
        "training": model.training,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(name, type(m)) for name, m in model.named_modules()],
        "attributes": {
            (name, attr): value.detach().clone()
            for name, m in model.named_modules()
            for attr, value in vars(m).items()
            if isinstance(value, torch.Tensor)
        },
    }


def _same_tensors(now: dict, then: dict) -> list:
    """Keys whose tensors differ in presence, dtype or bits."""
    keys = set(now) | set(then)
    return sorted(
        str(k)
        for k in keys
        if k not in now or k not in then or now[k].dtype != then[k].dtype or not torch.equal(now[k], then[k])
    )


class Fused:
    """One case, fused once in float32: the model, its inputs, its snapshot, the fused model or the error."""

    def __init__(self, case):
        self.case = case
        self.model, self.inputs = D.build(case)
        self.want, self.want_probes = D.run(self.model, self.inputs, case.probes)
        self.snapshot = _snapshot(self.model)
        try:
            self.fused, self.error = reparam.fuse(self.model, self.inputs), None
        except Exception as err:  # noqa: BLE001  kept and re-raised by get(): every test of the case reports it
            self.fused, self.error = None, err

    def get(self):
        """The fused model; re-raises fuse's error so that every test of the case fails with it."""
        if self.error is not None:
            raise self.error
        return self.fused


@pytest.fixture(scope="module", params=[_param(c) for c in D.CASES])
def fused(request):
    """Module-scoped so that each case is built and fused once and its tests run together."""
    return Fused(request.param)


def _assert_same_structure(got, want, what: str = "outputs") -> None:
    """Same containers, keys and dtypes (:func:`deploy_coverage.check_structure`), as a test failure."""
    try:
        D.check_structure(got, want, what)
    except ValueError as err:
        pytest.fail(str(err))


def _assert_close(errors: dict, tol: float, what: str) -> None:
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= tol}
    assert not bad, f"{what}: relative L2 error above {tol:g} at {bad}"


def test_fuse_does_not_raise(fused):
    fused.get()


def test_structure_and_dtypes_float32(fused):
    got, got_probes = D.run(fused.get(), fused.inputs, fused.case.probes)
    _assert_same_structure(got, fused.want)
    for name, what in fused.case.probes:
        _assert_same_structure(got_probes[name], fused.want_probes[name], f"{name} {what}s")


def test_exact_in_float32(fused):
    got, got_probes = D.run(fused.get(), fused.inputs, fused.case.probes)
    if fused.case.detections is None:
        _assert_close(D.leaf_errors(got, fused.want), D.FP32_TOL, "outputs")
    for name, _ in fused.case.probes:
        _assert_close(D.leaf_errors(got_probes[name], fused.want_probes[name]), D.FP32_TOL, name)


def test_exact_in_float64(fused):
    """Fused from the float64 model; outputs (post-processed ones included) and probes against it."""
    fused.get()  # the float32 fuse failed: so does this test, with its error
    model64, inputs64 = copy.deepcopy(fused.model).double(), D.to_float64(fused.inputs)
    want, want_probes = D.run(model64, inputs64, fused.case.probes)
    fused64 = reparam.fuse(model64, inputs64)
    got, got_probes = D.run(fused64, inputs64, fused.case.probes)
    _assert_same_structure(got, want)
    if fused.case.detections is None:
        _assert_close(D.leaf_errors(got, want), D.FP64_TOL, "outputs")
    else:  # the same detections, in any order among exact score ties
        err = D.detection_error(fused.case.detections(got), fused.case.detections(want))
        if not err <= D.FP64_TOL:  # as close as the original is to itself rounded differently (NMS over ties)?
            noise = D.own_detection_noise(fused.case, model64, inputs64, want)
            assert err <= noise, (
                f"detections: relative error {err:.2e} (inf: a detection without its partner), "
                f"the original's own float64 noise {noise:.2e}"
            )
    for name, what in fused.case.probes:
        _assert_same_structure(got_probes[name], want_probes[name], f"{name} {what}s")
        _assert_close(D.leaf_errors(got_probes[name], want_probes[name]), D.FP64_TOL, name)


def test_input_model_untouched(fused):
    fused.get()
    now, then = _snapshot(fused.model), fused.snapshot
    assert now["training"] == then["training"]
    assert now["types"] == then["types"]
    assert not _same_tensors(now["state"], then["state"]), "state dict changed"
    assert not _same_tensors(now["attributes"], then["attributes"]), "plain tensor attributes changed"


def test_no_more_kernels_than_the_peer(fused):
    model = fused.get()
    before = D.kernel_counts(fused.model, fused.inputs)
    after = D.kernel_counts(model, fused.inputs)
    peer, label = D.peer_counts(fused.case, fused.model, fused.inputs, before)
    assert after["conv"] <= min(before["conv"], peer["conv"]), (
        f"convs: {before['conv']} before, {after['conv']} after, {label}: {peer['conv']}"
    )
    assert after["norm"] <= peer["norm"], (
        f"norms: {before['norm']} before, {after['norm']} after, {label}: {peer['norm']}"
    )


def test_the_ci_slice_has_one_case_per_family():
    families = {c.family for c in D.CASES}
    assert {D.BY_NAME[n].family for n in CI_SLICE} == families
    assert {
        "ultralytics",
        "segmentation_models_pytorch",
        "torchvision segmentation",
        "torchvision detection",
    } == families


def test_norm_randomisation_reaches_frozen_batchnorm():
    """The FrozenBatchNorm2d case really has non-trivial statistics (their defaults fold to the identity)."""
    pytest.importorskip("torchvision")
    from torchvision.ops import FrozenBatchNorm2d

    model, _ = D.build(D.BY_NAME["tv:fcos_resnet18_fpn (FrozenBatchNorm2d)"])
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 20
    assert all(
        not torch.equal(m.running_var, torch.ones_like(m.running_var)) and m.running_mean.abs().sum() > 0
        for m in frozen
    )


def test_detection_error_forgives_tie_order_only():
    """Tied detections may swap (order, or which of two tied boxes NMS kept); scores, labels, counts and the boxes
    of untied detections must agree."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40], [50, 50, 60, 60]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.5, 0.5, 0.1], dtype=torch.float64)
    labels = torch.tensor([1, 2, 2, 1])
    want = [(boxes, scores, labels)]
    order = torch.tensor([0, 2, 1, 3])
    assert D.detection_error([(boxes[order], scores[order] + 1e-17, labels[order])], want) < 1e-15
    other_tied_box = boxes.clone()
    other_tied_box[1] += 1.0  # NMS kept the other of two tied boxes
    assert D.detection_error([(other_tied_box, scores, labels)], want) == 0.0
    moved = boxes.clone()
    moved[3] += 0.06  # an untied box: compared, relative to the largest coordinate (60)
    assert D.detection_error([(moved, scores, labels)], want) == pytest.approx(1e-3)
    assert D.detection_error([(boxes, scores * (1 + 1e-6), labels)], want) == pytest.approx(1e-6, rel=1e-3)
    assert D.detection_error([(boxes, scores, torch.tensor([1, 2, 2, 2]))], want) == float("inf")
    assert D.detection_error([(boxes[:3], scores[:3], labels[:3])], want) == float("inf")


@pytest.mark.skipif(
    importlib.util.find_spec("ultralytics") is None, reason="ultralytics is not installed (pip install ultralytics)"
)
def test_fused_yolo_runs_at_other_input_sizes():
    """YOLO runs at any multiple of 32: so does the fused model (Detect recomputes its cached anchors and strides
    for a new shape, in the model's dtype)."""
    model, inputs = D.build(D.BY_NAME["ultralytics:yolov8n.yaml"])
    fused = reparam.fuse(model, inputs)
    g = torch.Generator().manual_seed(2)
    for shape in ((1, 3, 96, 64), (3, 3, 64, 128), tuple(inputs[0].shape)):
        x = (torch.randn(shape, generator=g),)
        want, _ = D.run(model, x)
        got, _ = D.run(fused, x)
        _assert_same_structure(got, want, f"outputs at {shape}")
        _assert_close(D.leaf_errors(got, want), D.FP32_TOL, f"outputs at {shape}")
