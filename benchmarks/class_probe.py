"""Can a network learn the synthetic shapes' classes from their true boxes, and how fast?

Two probes on a COCO-format data set (e.g. the demo's data), both at 1 thread:

    python benchmarks/class_probe.py detector DATA --steps 400 --lr 0.02 [--set k=v ...]
    python benchmarks/class_probe.py crops DATA --steps 500 --lr 1e-3 --size 32

`detector` trains `baseline-tiny`'s own backbone, FPN and box head (as `--set` and the
flags change them) on the ground-truth boxes alone (each box and 3 jittered copies, cross
entropy over the classes; no RPN, no background), 4 images a step, and prints the class
accuracy on the val set's true boxes every 100 steps. `crops` trains a plain GroupNorm
ResNet-18 on the true boxes' crops resized to SIZE x SIZE (AdamW, 64 crops a step, flips).
If `crops` learns and `detector` does not, the features the box head pools are the problem,
not the data.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign

from everyseg.config import load_config
from everyseg.data.build import build_dataset
from everyseg.data.coco import collate
from everyseg.engine.optim import build_optimizer, build_scheduler
from everyseg.modeling.backbone import FPN_LEVELS
from everyseg.modeling.detector import build_model


def probe_detector(args) -> None:
    data = Path(args.data)
    overrides = [
        f"data.train_json={data}/annotations/train.json",
        f"data.train_images={data}/train",
        f"data.val_json={data}/annotations/val.json",
        f"data.val_images={data}/val",
        f"train.lr={args.lr}",
        f"train.steps={args.schedule_steps or args.steps}",
        "data.num_workers=0",
        *args.set,
    ]
    cfg = load_config("baseline-tiny", overrides)
    train, val = build_dataset(cfg.data, split="train"), build_dataset(cfg.data, split="val")
    d = cfg.data
    model = build_model(
        cfg.model,
        num_classes=len(train.class_names) + 1,
        class_names=train.class_names,
        min_size=d.min_size,
        max_size=d.max_size,
        test_min_size=d.test_min_size,
    )
    heads = model.roi_heads
    channels = cfg.model.backbone.fpn_channels
    if args.canonical_scale:
        heads.box_roi_pool = MultiScaleRoIAlign(
            FPN_LEVELS, 7, sampling_ratio=2, canonical_scale=args.canonical_scale
        )
    if args.fpn_gn:
        old = model.backbone.fpn
        model.backbone.fpn = FeaturePyramidNetwork(
            [block[0].in_channels for block in old.inner_blocks],
            channels,
            extra_blocks=old.extra_blocks,
            norm_layer=partial(nn.GroupNorm, 32),
        )
    if args.conv_channels:
        gn = partial(nn.GroupNorm, 32)
        convs = [args.conv_channels] * 4
        heads.box_head = FastRCNNConvFCHead((channels, 7, 7), convs, [256], norm_layer=gn)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)

    def logits(images, targets, copies: int):
        images, targets = model.transform(images, targets)
        features = model.backbone(images.tensors)
        boxes = [_jitter(t["boxes"], copies) for t in targets]
        labels = torch.cat([t["labels"].repeat(copies + 1) for t in targets])
        pooled = heads.box_roi_pool(features, boxes, images.image_sizes)
        return heads.box_predictor(heads.box_head(pooled))[0], labels  # (R, K+1), (R,)

    def accuracy() -> float:
        model.eval()
        right = total = 0
        with torch.no_grad():
            for start in range(0, len(val), 8):
                items = [val[(j, 0)] for j in range(start, min(start + 8, len(val)))]
                scores, labels = logits(*collate(items), 0)
                right += (scores[:, 1:].argmax(1) + 1 == labels).sum().item()
                total += len(labels)
        model.train()
        return right / total

    generator = torch.Generator().manual_seed(0)
    tic = time.perf_counter()
    for step in range(args.steps):
        picks = torch.randint(len(train), (4,), generator=generator).tolist()
        scores, labels = logits(*collate([train[(i, step)] for i in picks]), 3)
        loss = F.cross_entropy(scores, labels)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
        optimizer.step()
        scheduler.step()
        if (step + 1) % 100 == 0:
            _report(step, loss, accuracy(), tic)


def _jitter(boxes: torch.Tensor, copies: int) -> torch.Tensor:
    """(N, 4) boxes and `copies` copies shifted by 6 % of their size: (N * (copies + 1), 4)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    scale = torch.stack([w, h, w, h], 1)
    shifted = [boxes + 0.06 * torch.randn_like(boxes) * scale for _ in range(copies)]
    return torch.cat([boxes, *shifted])


def _crops(data: Path, split: str, size: int):
    """The true boxes' crops as (N, 3, size, size) floats in [0, 1], labels (N,), classes."""
    coco = json.loads((data / "annotations" / f"{split}.json").read_text())
    files = {image["id"]: image["file_name"] for image in coco["images"]}
    index = {c["id"]: i for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    images, crops, labels = {}, [], []
    for ann in coco["annotations"]:
        name = files[ann["image_id"]]
        if name not in images:
            images[name] = Image.open(data / split / name).convert("RGB")
        x, y, w, h = ann["bbox"]
        box = (int(x), int(y), int(np.ceil(x + w)), int(np.ceil(y + h)))
        crops.append(np.asarray(images[name].crop(box).resize((size, size), Image.BILINEAR)))
        labels.append(index[ann["category_id"]])
    pixels = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    return pixels, torch.tensor(labels), len(index)


def probe_crops(args) -> None:
    data = Path(args.data)
    train_x, train_y, classes = _crops(data, "train", args.size)
    val_x, val_y, _ = _crops(data, "val", args.size)
    net = torchvision.models.resnet18(num_classes=classes, norm_layer=lambda c: nn.GroupNorm(32, c))
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    tic = time.perf_counter()
    for step in range(args.steps):
        picks = torch.randint(len(train_y), (64,))
        x = train_x[picks]
        x = torch.where(torch.rand(64, 1, 1, 1) < 0.5, x.flip(3), x)
        loss = F.cross_entropy(net(x), train_y[picks])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            net.eval()
            with torch.no_grad():
                acc = (net(val_x).argmax(1) == val_y).float().mean().item()
            net.train()
            _report(step, loss, acc, tic)


def _report(step: int, loss: torch.Tensor, acc: float, tic: float) -> None:
    elapsed = time.perf_counter() - tic
    print(f"step {step + 1} loss {loss.item():.3f} val accuracy {acc:.3f} ({elapsed:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=["detector", "crops"])
    parser.add_argument("data", help="a COCO-format folder as `everyseg synth` writes")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--size", type=int, default=32, help="crops: the crops' side")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--schedule-steps", type=int, help="detector: the cosine's length")
    parser.add_argument("--canonical-scale", type=int, help="detector: box RoIs on P2-P5")
    parser.add_argument("--conv-channels", type=int, help="detector: 4 conv+GN box head")
    parser.add_argument("--fpn-gn", action="store_true", help="detector: GroupNorm in the FPN")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    (probe_detector if args.probe == "detector" else probe_crops)(args)


if __name__ == "__main__":
    main()
