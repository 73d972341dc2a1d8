"""Pretrain a from-scratch trunk on the training set's own box crops, before the detector.

A randomly initialised ResNet + FPN learns to tell the classes apart only slowly inside a
detector: its box head sees a few objects per image through a 7 x 7 pool, and on a CPU budget
it ends near the class prior (docs/results.md, "The detector at CPU scale"). The same trunk
run as a plain classifier on the ground-truth boxes' crops, each resized to `crop_size`, sees
many objects per step at one scale and learns the classes in a few hundred steps. Starting the
detector from that trunk is supervised pretraining on the target data's boxes (every class
has boxes, so partial supervision withholds nothing from it); it is the stand-in for
ImageNet weights where they cannot be had.

Only the trunk's weights are kept: the linear classifier on top is thrown away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align
from tqdm import tqdm

from everyseg.config import TrunkPretrainConfig
from everyseg.modeling.backbone import C4Backbone
from everyseg.modeling.detector import IMAGENET_MEAN, IMAGENET_STD


def pretrain_trunk(
    backbone: nn.Module,
    dataset,
    cfg: TrunkPretrainConfig,
    *,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> dict[str, float]:
    """Train `backbone`'s trunk (in place) to classify the crops of `dataset`'s boxes.

    `dataset` yields (image (3, H, W) in [0, 1], target with "boxes" (N, 4) and "labels"
    (N,) in 1..K) as data.coco.CocoInstances does. Every trunk stage is trained, frozen or
    not: a random stage is worth freezing only once it has learnt something, so
    `model.backbone.trainable_layers` applies to the detector's training after this. The
    global random streams are left as they were, so the detector's training draws the same
    numbers with or without this stage. Returns the last tenth of the steps' mean loss and
    accuracy, and the number of crops.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        crops, labels = collect_crops(dataset, cfg, seed=seed, progress=progress)
        num_classes = len(dataset.class_names)
        classifier = _CropClassifier(backbone, num_classes=num_classes).to(device)
        frozen = [p for p in backbone.parameters() if not p.requires_grad]
        for parameter in frozen:
            parameter.requires_grad_(True)
        try:
            return _fit(classifier, crops, labels, cfg, device=device, progress=progress)
        finally:
            for parameter in frozen:
                parameter.requires_grad_(False)


def collect_crops(dataset, cfg: TrunkPretrainConfig, *, seed: int, progress: bool = True):
    """Up to cfg.max_crops box crops from images in a seeded random order: ((N, 3, S, S)
    normalised as the detector normalises its images, (N,) labels in 0..K-1)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    crops: list[Tensor] = []
    labels: list[Tensor] = []
    count = 0
    wanted = min(cfg.max_crops, sum(dataset.instances_per_class().values()))
    bar = tqdm(total=wanted, desc="trunk crops", disable=not progress, leave=False)
    with bar:
        for index in order.tolist():
            image, target = dataset[index]
            boxes = target["boxes"]
            if len(boxes) == 0:
                continue
            crops.append(_crop(image, boxes, cfg.crop_size))
            labels.append(target["labels"] - 1)
            bar.update(min(len(boxes), cfg.max_crops - count))
            count += len(boxes)
            if count >= cfg.max_crops:
                break
    if not crops:
        where = getattr(dataset, "json_path", "the training data")
        raise ValueError(
            f"train.trunk_pretrain: {where} has no boxes to crop; set train.trunk_pretrain=null"
        )
    return torch.cat(crops)[: cfg.max_crops], torch.cat(labels)[: cfg.max_crops]


def _crop(image: Tensor, boxes: Tensor, size: int) -> Tensor:
    """(3, H, W) image, (N, 4) boxes -> (N, 3, size, size) crops, ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    normalised = ((image - mean) / std)[None]
    return roi_align(normalised, [boxes], output_size=size, sampling_ratio=2, aligned=True)


class _CropClassifier(nn.Module):
    """The trunk's last stage (C5), average-pooled, into a linear classifier. Works on every
    backbone whose `body` returns the ResNet stages by name (FPN, FCN) and on C4's."""

    def __init__(self, backbone: nn.Module, *, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        last_stage = backbone.res5 if isinstance(backbone, C4Backbone) else backbone.body
        assert isinstance(last_stage, nn.Module)
        convs = [m for m in last_stage.modules() if isinstance(m, nn.Conv2d)]
        self.fc = nn.Linear(convs[-1].out_channels, num_classes)

    def forward(self, crops: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, K) class logits."""
        backbone = self.backbone
        if isinstance(backbone, C4Backbone):
            last = backbone.res5(backbone.body(crops)["0"])
        else:
            body = backbone.body
            assert isinstance(body, nn.Module)
            last = list(body(crops).values())[-1]
        return self.fc(last.mean((2, 3)))


def _fit(
    classifier: _CropClassifier,
    crops: Tensor,
    labels: Tensor,
    cfg: TrunkPretrainConfig,
    *,
    device: torch.device,
    progress: bool,
) -> dict[str, float]:
    """AdamW with a one-cycle schedule peaking at cfg.lr; random batches, random flips."""
    trainable = [p for p in classifier.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1
    )
    classifier.train()
    losses: list[float] = []
    right: list[float] = []
    for _ in tqdm(range(cfg.steps), desc="trunk pretrain", disable=not progress):
        picks = torch.randint(len(labels), (cfg.batch_size,))
        batch = crops[picks]
        flip = torch.rand(cfg.batch_size) < 0.5
        batch[flip] = batch[flip].flip(3)
        batch, target = batch.to(device), labels[picks].to(device)
        logits = classifier(batch)  # (B, K)
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        right.append((logits.argmax(1) == target).float().mean().item())
    tail = slice(-max(1, cfg.steps // 10), None)
    return {
        "loss": sum(losses[tail]) / len(losses[tail]),
        "accuracy": sum(right[tail]) / len(right[tail]),
        "crops": float(len(labels)),
    }
