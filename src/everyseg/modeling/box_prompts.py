"""Masks for given boxes ("box prompts", Deep-MAC), the part every detector shares: check the
prompts, run the transform and backbone, map the boxes to the features' pixels and the masks
back to the image's. Each detector supplies only how it classes and segments the boxes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import resize_boxes

from everyseg.modeling.paste import unpasted

# (images, features, per-image (N_i, 4) boxes in the transformed images' pixels, per-image
# (N_i,) labels or None) -> per image {"boxes", "labels", "scores", "masks" (N_i, 1, M, M)}
SegmentBoxes = Callable[
    [ImageList, dict[str, Tensor], list[Tensor], list[Tensor] | None], list[dict[str, Tensor]]
]


@dataclass
class ImageFeatures:
    """Images run once through a detector's transform and backbone, for any number of box
    prompts after (SAM's set_image): `masks_for_boxes` takes it in place of the images."""

    images: ImageList  # the transformed (resized, normalised, padded) batch
    features: dict[str, Tensor]  # {level: (B, C, H_l, W_l)}
    sizes: list[tuple[int, int]]  # each image's (H, W) before the transform

    def __len__(self) -> int:
        return len(self.sizes)


def encode_images(
    *, transform: nn.Module, backbone: nn.Module, images: Sequence[Tensor]
) -> ImageFeatures:
    """(3, H, W) float images -> their ImageFeatures."""
    transformed, _ = transform(list(images))
    return ImageFeatures(
        images=transformed,
        features=backbone(transformed.tensors),
        sizes=[(image.shape[-2], image.shape[-1]) for image in images],
    )


def check_box_prompts(
    boxes: Tensor, labels: Tensor | None, *, image_size: tuple[int, int], num_classes: int
) -> tuple[Tensor, Tensor | None]:
    """One image's (N, 4) xyxy float boxes in its pixels, clipped to the image, and its (N,)
    labels. Raises ValueError for boxes that are not finite, not (N, 4), not x1 > x0 and
    y1 > y0, or that miss the image entirely, and for labels outside 1..K (`num_classes` is
    K + 1, with the background)."""
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as X0 Y0 X1 Y1, got {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise ValueError(f"boxes must be finite numbers, got {boxes.tolist()}")
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"box {i} {[x0, y0, x1, y1]}: needs X1 > X0 and Y1 > Y0")
    height, width = image_size
    clipped = boxes.float().clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
    outside = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if outside.any():
        i = int(outside.nonzero()[0])
        raise ValueError(
            f"box {i} {boxes[i].tolist()} lies outside the {width} x {height} (W x H) image"
        )
    if labels is None:
        return clipped, None
    return clipped, _check_labels(labels, num_boxes=len(boxes), num_classes=num_classes)


def _check_labels(labels: Tensor, *, num_boxes: int, num_classes: int) -> Tensor:
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers in 1..{num_classes - 1}, got {labels.tolist()}")
    if labels.shape != (num_boxes,):
        raise ValueError(f"{num_boxes} boxes need {num_boxes} labels, got {tuple(labels.shape)}")
    bad = (labels < 1) | (labels >= num_classes)
    if bad.any():
        raise ValueError(
            f"labels must be in 1..{num_classes - 1} (the run's classes), got {labels.tolist()}"
        )
    return labels.long()


def masks_for_box_prompts(
    *,
    transform: nn.Module,
    backbone: nn.Module,
    images: Sequence[Tensor] | ImageFeatures,
    boxes: Sequence[Tensor],
    labels: Sequence[Tensor] | None,
    num_classes: int,
    segment: SegmentBoxes,
    paste: bool = True,
) -> list[dict[str, Tensor]]:
    """Per image: (3, H, W) image, (N_i, 4) boxes in its pixels, optional (N_i,) labels ->
    {"boxes" (clipped to the image), "labels", "scores", "masks" (N_i, 1, H, W)}, or with
    `paste=False` "box_masks" (N_i, 1, M, M) in the boxes instead of "masks". `images` may be
    their ImageFeatures (encode_images), which the backbone then does not recompute."""
    if len(boxes) != len(images) or (labels is not None and len(labels) != len(images)):
        raise ValueError("give one boxes tensor (and one labels tensor) per image")
    if not isinstance(images, ImageFeatures):
        images = encode_images(transform=transform, backbone=backbone, images=images)
    sizes, transformed, features = images.sizes, images.images, images.features
    device = transformed.tensors.device
    given_labels = [None] * len(images) if labels is None else labels
    checked = [
        check_box_prompts(b, lab, image_size=s, num_classes=num_classes)
        for b, lab, s in zip(boxes, given_labels, sizes)
    ]
    boxes = [b.to(device) for b, _ in checked]
    if labels is not None:  # then check_box_prompts returned every image's labels
        labels = [lab.to(device) for _, lab in checked if lab is not None]
    rois = [resize_boxes(b, s, t) for b, s, t in zip(boxes, sizes, transformed.image_sizes)]
    detections = segment(transformed, features, rois, labels)
    if not paste:
        detections = unpasted(detections, transformed.image_sizes, sizes)
    for detection, image_boxes, size in zip(detections, boxes, sizes):
        # the given boxes, not their round trip through the transform's scaling
        detection["boxes"] = image_boxes
        if paste:
            detection["masks"] = paste_masks_in_image(detection["masks"], image_boxes, size)
    return detections
