"""Time per training step: everyseg's Mask R-CNN against torchvision's MaskRCNN.

Both models are built with the same sizes from one everyseg config and start from the same
weights (everyseg's is `from_torchvision(tv)`, laid out and optimised as everyseg's engine
does); they train on the same batches, alternating step by step so both see the same machine
load. Two settings: every instance has a mask
(identical work expected) and half the classes box-only (everyseg runs the mask head only on
RoIs with a mask; torchvision has no notion of it and trains their empty masks as background).

    python benchmarks/train_speed.py                       # maskrcnn-tiny on synthetic data
    python benchmarks/train_speed.py --preset maskrcnn --size 800 --device cuda
    python benchmarks/train_speed.py --threads 1 --profile # and everyseg's top costs

The last line prints the ratios (everyseg time / torchvision time; below 1 is faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from everyseg.config import load_config
from everyseg.data.build import build_dataset
from everyseg.data.coco import collate
from everyseg.data.synthetic import generate
from everyseg.engine.optim import build_optimizer
from everyseg.engine.train import to_device, training_layout
from everyseg.modeling.detector import build_model, from_torchvision


def torchvision_twin(cfg, num_classes: int) -> MaskRCNN:
    """torchvision's MaskRCNN with every size taken from an everyseg config."""
    d = cfg.data
    sizes = dict(min_size=d.min_size, max_size=d.max_size, test_min_size=d.test_min_size)
    parts = build_model(cfg.model, num_classes=num_classes, **sizes)
    r, b, m = cfg.model.rpn, cfg.model.box_head, cfg.model.mask_head
    heads = parts.roi_heads
    anchors = parts.rpn.anchor_generator
    return MaskRCNN(
        torchvision_stem(parts.backbone),
        min_size=tuple(cfg.data.min_size),
        max_size=cfg.data.max_size,
        # torchvision's own, not everyseg's cached one (`from_torchvision` gives that back)
        rpn_anchor_generator=AnchorGenerator(anchors.sizes, anchors.aspect_ratios),
        rpn_head=parts.rpn.head,
        rpn_pre_nms_top_n_train=r.pre_nms_top_n_train,
        rpn_post_nms_top_n_train=r.post_nms_top_n_train,
        rpn_batch_size_per_image=r.batch_size_per_image,
        box_roi_pool=torchvision_pooler(heads.box_roi_pool),
        box_head=heads.box_head,
        box_predictor=heads.box_predictor,
        box_batch_size_per_image=b.batch_size_per_image,
        mask_roi_pool=torchvision_pooler(heads.mask_roi_pool),
        mask_head=MaskRCNNHeads(cfg.model.backbone.fpn_channels, [m.channels] * m.num_convs, 1),
        mask_predictor=MaskRCNNPredictor(m.channels, m.channels, num_classes),
    )


def torchvision_stem(backbone: nn.Module) -> nn.Module:
    """An everyseg ResNet backbone with torchvision's stem order, ReLU then max pool
    (everyseg's trunk pools first, backbone.py `pool_before_relu`; `from_torchvision` swaps
    it back for everyseg's model)."""
    body = backbone.body
    if isinstance(body.maxpool, nn.Sequential):
        body.relu, body.maxpool = body.maxpool[1], body.maxpool[0]
    return backbone


def torchvision_pooler(pooler: MultiScaleRoIAlign) -> MultiScaleRoIAlign:
    """torchvision's own MultiScaleRoIAlign with an everyseg pooler's settings (everyseg's
    has a faster CPU backward; `from_torchvision` gives it back to everyseg's model)."""
    return MultiScaleRoIAlign(pooler.featmap_names, pooler.output_size, pooler.sampling_ratio)


def optimizers_of(cfg, models: dict[str, torch.nn.Module]) -> dict[str, torch.optim.Optimizer]:
    """Each library's SGD with the same settings (a learning rate that does not diverge from
    random weights): everyseg's engine builds its own (engine/optim.py: torch's fused
    kernel), torchvision's reference scripts call torch.optim.SGD as it comes."""
    settings = dataclasses.replace(cfg.train, optimizer="sgd", lr=0.005)
    optimizers = {}
    for name, model in models.items():
        if name == "everyseg":
            optimizers[name] = build_optimizer(model, settings)
        else:
            optimizers[name] = torch.optim.SGD(
                model.parameters(),
                lr=settings.lr,
                momentum=settings.momentum,
                weight_decay=settings.weight_decay,
            )
    return optimizers


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


def dense_targets(targets: list[dict]) -> list[dict]:
    """Targets as torchvision's MaskRCNN takes them: everyseg's loader sends the masks as
    polygons / RLE (`compact_masks`), torchvision wants them as (N, H, W) uint8 images."""
    return [{**t, "masks": t["compact_masks"].to_dense().to(t["boxes"].device)} for t in targets]


def profile_step(cfg, dataset, device) -> None:
    """everyseg's top costs in one training step (after a warm-up step), forward and
    backward apart."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    twin = torchvision_twin(cfg, len(dataset.class_names) + 1)
    model = training_layout(from_torchvision(twin).to(device), device)
    optimizer = optimizers_of(cfg, {"everyseg": model})["everyseg"]
    batch = cfg.train.batch_size
    items = [dataset[(i, 0)] for i in range(batch)]
    images, targets = to_device(*collate(items), device)
    timed_step(model.train(), optimizer, images, targets, device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timed_step(model, optimizer, images, targets, device)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def measure(cfg, dataset, *, steps: int, warmup: int, device) -> tuple[float, float]:
    torch.manual_seed(0)
    tv = torchvision_twin(cfg, len(dataset.class_names) + 1)
    ours = from_torchvision(tv)
    # everyseg's model as its training engine runs it (engine/train.py's training_layout)
    ours = training_layout(ours.to(device), device)
    models = {"torchvision": tv.to(device).train(), "everyseg": ours.train()}
    optimizers = optimizers_of(cfg, models)
    times = {k: [] for k in models}
    batch = cfg.train.batch_size
    for step in range(warmup + steps):
        items = [dataset[((step * batch + i) % len(dataset), step)] for i in range(batch)]
        images, targets = to_device(*collate(items), device)
        inputs = {"everyseg": targets, "torchvision": dense_targets(targets)}
        for name in models if step % 2 else reversed(models):
            torch.manual_seed(step)  # the same RoI sampling for both
            elapsed = timed_step(models[name], optimizers[name], images, inputs[name], device)
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
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        paths = generate(tmp, num_train=64, num_val=1, size=args.size, seed=0, progress=False)
        overrides = [f"data.{k}={v}" for k, v in paths.items()]
        overrides += ["model.backbone.weights=null", f"data.min_size=[{args.size}]"]
        figures = []
        for label, mask_classes in (("all masks", "all"), ("half masks", "random:7:0")):
            cfg = load_config(args.preset, [*overrides, f"data.mask_classes={mask_classes}"])
            dataset = build_dataset(cfg.data, split="train")
            if args.profile:
                profile_step(cfg, dataset, device)
            ours, tv = measure(cfg, dataset, steps=args.steps, warmup=args.warmup, device=device)
            print(f"{label}: everyseg {ours * 1e3:.1f} ms/step, torchvision {tv * 1e3:.1f} ms/step")
            figures.append(f"{label} {ours / tv:.3f}")
    print(
        f"train_speed {args.preset} {args.size}px {device.type} "
        f"{torch.get_num_threads()} threads: everyseg/torchvision time "
        f"ratio: {'; '.join(figures)}"
    )


if __name__ == "__main__":
    main()
