"""Paired image/target transforms (image files are read by `everyseg.data.images`).

Targets follow the torchvision detection convention: `boxes` (N, 4) xyxy in absolute pixels
and `masks` (N, H, W), or, from `CocoInstances`, `compact_masks` (data.compact_masks).
Resizing is not done here: the model's `GeneralizedRCNNTransform` resizes (and multi-scales)
images and targets together.
"""

from __future__ import annotations

import torch
from torch import Tensor


def hflip(image: Tensor, target: dict) -> tuple[Tensor, dict]:
    """Mirror an image and its target left-right.

    image: (C, H, W). target: `boxes` (N, 4) xyxy pixels, optional `masks` (N, H, W) and
    `compact_masks` (CompactMasks); other keys are passed through. Returns new tensors and
    masks; the inputs are not modified.
    """
    width = image.shape[-1]
    out = dict(target)
    boxes = target["boxes"]
    # x0' = W - x1 and x1' = W - x0: pixel edges mirror about the image's right edge W.
    out["boxes"] = torch.stack(
        [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
    )
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    if "compact_masks" in target:
        out["compact_masks"] = target["compact_masks"].hflip()
    return image.flip(-1), out
