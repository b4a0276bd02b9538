"""Write ultralytics-style files with random weights, to try ``reparam convert`` on YOLO without a download.

    python examples/yolo_checkpoint.py best.pt                      # a trainer checkpoint (EMA model, float16)
    python examples/yolo_checkpoint.py weights.pth --cfg yolo11n-seg.yaml --state-dict   # a plain state dict

The checkpoint is laid out as ultralytics' trainer saves ``runs/detect/train/weights/best.pt``: a dict whose
``ema`` entry is the pickled model in float16 with its hyperparameters attached, ``model`` None, ``train_args``.
BatchNorm statistics are randomised so that folding them is not trivial.  Needs ``pip install ultralytics``.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch


def build(cfg: str, imgsz: int) -> torch.nn.Module:
    """The ultralytics model of ``cfg`` (a shipped yaml) with random weights and BatchNorm statistics."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import guess_model_task, yaml_model_load
    from ultralytics.nn import tasks

    task = guess_model_task(yaml_model_load(cfg))
    model_class = {
        "detect": tasks.DetectionModel,
        "segment": tasks.SegmentationModel,
        "pose": tasks.PoseModel,
        "obb": tasks.OBBModel,
        "classify": tasks.ClassificationModel,
    }[task]
    torch.manual_seed(0)
    model = model_class(cfg, verbose=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.copy_(0.1 * torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(0.5 + 1.5 * torch.rand(bn.num_features, generator=g))
    model.args = get_cfg(overrides={"imgsz": imgsz})
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="file to write, e.g. best.pt")
    parser.add_argument("--cfg", default="yolov8n.yaml", help="ultralytics model yaml (default yolov8n.yaml)")
    parser.add_argument("--imgsz", type=int, default=640, help="training image size recorded (default 640)")
    parser.add_argument("--state-dict", action="store_true", help="write model.state_dict() instead of a checkpoint")
    args = parser.parse_args()
    model = build(args.cfg, args.imgsz)
    if args.state_dict:
        torch.save(model.state_dict(), args.out)
    else:
        torch.save(
            {
                "epoch": -1,
                "best_fitness": None,
                "model": None,
                "ema": copy.deepcopy(model).half(),
                "updates": 0,
                "optimizer": None,
                "train_args": dict(vars(model.args)),
                "train_metrics": {},
                "date": None,
                "version": None,
            },
            args.out,
        )
    print(f"wrote {args.out} ({args.cfg}, random weights)")


if __name__ == "__main__":
    main()
