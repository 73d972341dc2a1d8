"""Time per training step: everyseg's Mask R-CNN against torchvision's MaskRCNN.

Both models are built with the same sizes from one everyseg config and start from the same
weights (everyseg's is `from_torchvision(tv)`); they train on the same batches, alternating
step by step so both see the same machine load. Two settings: every instance has a mask
(identical work expected) and half the classes box-only (everyseg runs the mask head only on
RoIs with a mask; torchvision has no notion of it and trains their empty masks as background).

    python benchmarks/train_speed.py                       # maskrcnn-tiny on synthetic data
    python benchmarks/train_speed.py --preset maskrcnn --size 800 --device cuda

The last line prints the ratios (everyseg time / torchvision time; below 1 is faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from everyseg.config import load_config
from everyseg.data.build import build_dataset
from everyseg.data.coco import collate
from everyseg.data.synthetic import generate
from everyseg.engine.train import to_device
from everyseg.modeling.detector import build_model, from_torchvision


def torchvision_twin(cfg, num_classes: int) -> MaskRCNN:
    """torchvision's MaskRCNN with every size taken from an everyseg config."""
    d = cfg.data
    sizes = dict(min_size=d.min_size, max_size=d.max_size, test_min_size=d.test_min_size)
    parts = build_model(cfg.model, num_classes=num_classes, **sizes)
    r, b, m = cfg.model.rpn, cfg.model.box_head, cfg.model.mask_head
    heads = parts.roi_heads
    return MaskRCNN(
        parts.backbone,
        min_size=tuple(cfg.data.min_size),
        max_size=cfg.data.max_size,
        rpn_anchor_generator=parts.rpn.anchor_generator,
        rpn_head=parts.rpn.head,
        rpn_pre_nms_top_n_train=r.pre_nms_top_n_train,
        rpn_post_nms_top_n_train=r.post_nms_top_n_train,
        rpn_batch_size_per_image=r.batch_size_per_image,
        box_roi_pool=heads.box_roi_pool,
        box_head=heads.box_head,
        box_predictor=heads.box_predictor,
        box_batch_size_per_image=b.batch_size_per_image,
        mask_roi_pool=heads.mask_roi_pool,
        mask_head=MaskRCNNHeads(cfg.model.backbone.fpn_channels, [m.channels] * m.num_convs, 1),
        mask_predictor=MaskRCNNPredictor(m.channels, m.channels, num_classes),
    )


def timed_step(model, optimizer, images, targets, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    losses = model(images, targets)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def measure(cfg, dataset, *, steps: int, warmup: int, device) -> tuple[float, float]:
    torch.manual_seed(0)
    tv = torchvision_twin(cfg, len(dataset.class_names) + 1)
    ours = from_torchvision(tv)
    models = {"torchvision": tv.to(device).train(), "everyseg": ours.to(device).train()}
    optimizers = {
        k: torch.optim.SGD(m.parameters(), lr=0.005, momentum=0.9) for k, m in models.items()
    }
    times = {k: [] for k in models}
    batch = cfg.train.batch_size
    for step in range(warmup + steps):
        items = [dataset[((step * batch + i) % len(dataset), step)] for i in range(batch)]
        images, targets = to_device(*collate(items), device)
        for name in models if step % 2 else reversed(models):
            torch.manual_seed(step)  # the same RoI sampling for both
            elapsed = timed_step(models[name], optimizers[name], images, targets, device)
            if step >= warmup:
                times[name].append(elapsed)
    return statistics.median(times["everyseg"]), statistics.median(times["torchvision"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="maskrcnn-tiny")
    parser.add_argument("--size", type=int, default=128, help="synthetic image side")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        paths = generate(tmp, num_train=64, num_val=1, size=args.size, seed=0, progress=False)
        overrides = [f"data.{k}={v}" for k, v in paths.items()]
        overrides += ["model.backbone.weights=null", f"data.min_size=[{args.size}]"]
        figures = []
        for label, mask_classes in (("all masks", "all"), ("half masks", "random:7:0")):
            cfg = load_config(args.preset, [*overrides, f"data.mask_classes={mask_classes}"])
            dataset = build_dataset(cfg.data, split="train")
            ours, tv = measure(cfg, dataset, steps=args.steps, warmup=args.warmup, device=device)
            print(f"{label}: everyseg {ours * 1e3:.1f} ms/step, torchvision {tv * 1e3:.1f} ms/step")
            figures.append(f"{label} {ours / tv:.3f}")
    print(
        f"train_speed {args.preset} {args.size}px {device.type}: everyseg/torchvision time "
        f"ratio: {'; '.join(figures)}"
    )


if __name__ == "__main__":
    main()
