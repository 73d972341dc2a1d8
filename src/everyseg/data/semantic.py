"""Semantic label maps from COCO-format instance targets, partial supervision kept.

A pixel's label is 0 (background), a class in 1..K, or IGNORE (no loss, not scored):
  1. every pixel starts as background;
  2. a box-only instance (`has_mask` False) sets IGNORE over its box: which of those pixels
     are the object is unknown. The box, not the mask the file may hold for a class outside
     data.mask_classes: reading that mask would hand the model the very shapes partial
     supervision withholds. Every pixel the box touches is ignored (floor / ceil of its
     sides), so no object pixel is ever trained as background;
  3. instances with a mask paint their class on their mask's pixels, also inside a box-only
     instance's box: COCO masks are an object's visible pixels, so those are known. Larger
     masks first, then smaller ones over them (a small object in front of a large one keeps
     its pixels), equal areas in annotation-id order, so the map depends only on the
     annotations, never on their order in the file.
Crowd annotations never reach the targets (data/index.py skips them): their pixels are
labelled background.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

IGNORE = -1  # a label pixel without a loss or a score; F.cross_entropy's ignore_index


def semantic_labels(
    *,
    boxes: Tensor,
    labels: Tensor,
    masks: Tensor,
    has_mask: Tensor,
    ann_ids: Tensor,
    height: int,
    width: int,
) -> Tensor:
    """(H, W) int64 label map (module docstring) of N instances: `boxes` (N, 4) xyxy pixels,
    `labels` (N,) in 1..K, `masks` (N, H, W) binary, read only where `has_mask` (N,) bool,
    `ann_ids` (N,) the tie-break between equal areas."""
    out = torch.zeros((height, width), dtype=torch.int64)
    for box in boxes[~has_mask].tolist():
        x0, y0, x1, y1 = _touched(box, width=width, height=height)
        out[y0:y1, x0:x1] = IGNORE
    rows = torch.nonzero(has_mask).flatten().tolist()
    areas = masks[rows].flatten(1).sum(1).tolist() if rows else []
    order = sorted(zip(areas, rows), key=lambda a: (-a[0], int(ann_ids[a[1]])))
    for _, row in order:
        out[masks[row].bool()] = int(labels[row])
    return out


def target_labels(target: dict, *, height: int, width: int) -> Tensor:
    """The label map of a CocoInstances target (its `compact_masks`, or dense `masks`)."""
    masks = target["masks"] if "masks" in target else target["compact_masks"].to_dense()
    n = len(target["labels"])
    ann_ids = target.get("ann_ids", torch.arange(n))
    return semantic_labels(
        boxes=target["boxes"].cpu(),
        labels=target["labels"].cpu(),
        masks=masks.cpu(),
        has_mask=target["has_mask"].cpu(),
        ann_ids=ann_ids.cpu(),
        height=height,
        width=width,
    )


def _touched(box: list[float], *, width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel span [x0, x1) x [y0, y1) a box's area touches, clipped to the image."""
    x0, y0, x1, y1 = box
    return (
        min(max(math.floor(x0), 0), width),
        min(max(math.floor(y0), 0), height),
        min(max(math.ceil(x1), 0), width),
        min(max(math.ceil(y1), 0), height),
    )
