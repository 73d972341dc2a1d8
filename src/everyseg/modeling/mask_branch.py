"""The mask branch's glue, the same behind every detector: RoI pooling -> mask head -> loss on
training crops, or -> probabilities for given boxes.

The pooler and the head stay attributes of the detector part that owns them (their
state-dict keys are `roi_heads.mask_head.*` in R-CNN, `mask_head.*` in FCOS, and torchvision
weights load by those names), so these are functions of them rather than a module of its own.
Boxes are in the transformed images' pixels, as the FPN features are.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from everyseg.data.compact_masks import batch_targets
from everyseg.modeling.mask_heads import MaskHead

MASK_ROIS = ("proposals", "gt", "both")


def mask_training_loss(
    *,
    roi_pool: nn.Module,
    head: MaskHead,
    features: dict[str, Tensor],
    crops: list[tuple[Tensor, Tensor]],
    targets: list[dict[str, Tensor]],
    image_shapes: list[tuple[int, int]],
    resolution: int,
) -> Tensor:
    """The head's loss on per-image training crops: (R_i, 4) boxes and (R_i,) indices of the
    ground-truth instances (all with a mask) they cut their M x M targets from."""
    rois = [boxes for boxes, _ in crops]
    labels = torch.cat([t["labels"][idxs] for t, (_, idxs) in zip(targets, crops)])  # (R,)
    mask_targets = batch_mask_targets(targets, crops, image_shapes, resolution=resolution)
    roi_features = roi_pool(features, rois, image_shapes)  # (R, C, S, S)
    logits = head(roi_features, labels)  # (R, M, M), or (R, K + 1, M, M) for softmax
    return head.loss(logits, mask_targets, labels)


def batch_mask_targets(
    targets: list[dict],
    crops: list[tuple[Tensor, Tensor]],
    image_shapes: list[tuple[int, int]],
    *,
    resolution: int,
) -> Tensor:
    """(R, M, M) targets of every image's crops, in order: all images at once when the
    loader sent compact masks (data/compact_masks.py's batch_targets), else image by image."""
    if targets and all("compact_masks" in t for t in targets):
        return batch_targets(
            [t["compact_masks"] for t in targets],
            [boxes for boxes, _ in crops],
            [idxs for _, idxs in crops],
            resolution=resolution,
            image_sizes=image_shapes,
        )
    return torch.cat(
        [
            roi_mask_targets(t, boxes, idxs, resolution=resolution, image_size=size)
            for t, (boxes, idxs), size in zip(targets, crops, image_shapes)
        ]
    )


def roi_mask_targets(
    target: dict, boxes: Tensor, idxs: Tensor, *, resolution: int, image_size: tuple[int, int]
) -> Tensor:
    """(R, M, M) targets of one image's (R, 4) boxes, each cut from instance idxs[r]'s mask.

    Masks come as everyseg's loader sends them, `compact_masks` (polygons and RLE at the
    original image size, drawn here only where the RoIs read), or as torchvision's dense
    `masks` (N, H, W), which the model's transform has already resized to `image_size`; both
    give the same targets (data/compact_masks.py).
    """
    if "compact_masks" in target:
        return target["compact_masks"].crop_and_resize(
            boxes, idxs, resolution=resolution, image_size=image_size
        )
    return project_masks_on_boxes(target["masks"], boxes, idxs, resolution)


def mask_probabilities(
    *,
    roi_pool: nn.Module,
    head: MaskHead,
    features: dict[str, Tensor],
    boxes: list[Tensor],
    labels: list[Tensor],
    image_shapes: list[tuple[int, int]],
) -> list[Tensor]:
    """Per image (N_i, 4) boxes and their (N_i,) labels -> (N_i, 1, M, M) foreground
    probabilities in each box (a class-agnostic head ignores the labels)."""
    roi_features = roi_pool(features, boxes, image_shapes)  # (N, C, S, S)
    probs = head.predict(roi_features, torch.cat(labels))  # (N, 1, M, M)
    if len(boxes) == 1:  # a traced export sees one image of any number of boxes
        return [probs]
    return list(probs.split([len(b) for b in boxes]))


def gt_mask_crops(target: dict[str, Tensor], *, jitter: float = 0.0) -> tuple[Tensor, Tensor]:
    """One image's ground-truth boxes (R, 4) of instances with a mask, and their indices (R,)."""
    keep = torch.where(target["has_mask"])[0]
    return jitter_boxes(target["boxes"][keep], jitter=jitter), keep


def jitter_boxes(boxes: Tensor, *, jitter: float) -> Tensor:
    """(N, 4) xyxy -> each side moved by up to `jitter` x the box's width/height.

    Deep-MAC's small jitter keeps the head from relying on crops that fit exactly, as
    detections at test time never do.
    """
    if jitter == 0 or boxes.numel() == 0:
        return boxes
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    jittered = boxes + (torch.rand_like(boxes) * 2 - 1) * jitter * size
    # a jittered box never collapses: keep x1 > x0 and y1 > y0
    jittered[:, 2:] = torch.maximum(jittered[:, 2:], jittered[:, :2] + 1)
    return jittered
