"""Masks left in their boxes, pasted one at a time: torchvision's `paste_masks_in_image`, pixel
for pixel, without its (N, 1, H, W) float tensor.

A detector's mask head predicts M x M probabilities in each box; the eval forward pastes all
of them into full-image float planes (torchvision's convention, kept for compatibility). For N
detections on a large image that is N x H x W x 4 bytes before anything is filtered, so
`detect` / `masks_for_boxes(paste=False)` return the M x M "box_masks" instead, and the
predictor and evaluation paste each kept mask into the only pixels it can reach: its region.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torchvision.models.detection.roi_heads import (
    expand_boxes,
    expand_masks,
    paste_mask_in_image,
)
from torchvision.models.detection.transform import resize_boxes, resize_keypoints

# (x0, y0, x1, y1) integer pixel bounds, x1 and y1 exclusive
Region = tuple[int, int, int, int]


def pasted_crops(
    box_masks: Tensor, boxes: Tensor, image_size: tuple[int, int]
) -> Iterator[tuple[Region, Tensor]]:
    """(N, 1, M, M) probabilities in (N, 4) xyxy boxes of an (H, W) image -> per mask, in
    order, its region and the (y1 - y0, x1 - x0) pasted probabilities there.

    The region is where torchvision's paste can write (the box grown by one mask pixel a
    side, rounded as it rounds, clipped to the image); everywhere else its mask is 0. Inside,
    the values are exactly `paste_masks_in_image`'s, computed by its own per-mask function.
    """
    padded, scale = expand_masks(box_masks, padding=1)  # (N, 1, M + 2, M + 2)
    grown = expand_boxes(boxes, scale).to(torch.int64).tolist()
    height, width = image_size
    for mask, (bx0, by0, bx1, by1) in zip(padded, grown):
        x0, y0 = min(max(bx0, 0), width), min(max(by0, 0), height)
        x1, y1 = max(min(bx1 + 1, width), x0), max(min(by1 + 1, height), y0)
        if x1 == x0 or y1 == y0:  # nothing of the box in the image (torchvision's paste fails)
            yield (x0, y0, x1, y1), box_masks.new_zeros(y1 - y0, x1 - x0)
            continue
        # the box in the region's pixels: torchvision's paste into a region-sized image
        shifted = [bx0 - x0, by0 - y0, bx1 - x0, by1 - y0]
        yield (x0, y0, x1, y1), paste_mask_in_image(mask[0], shifted, y1 - y0, x1 - x0)


def inside_box(box: Tensor, region: Region) -> Tensor:
    """(4,) xyxy box -> (y1 - y0, x1 - x0) bool over `region`: the pixels whose centres lie in
    the box (a prompt's box bounds its mask; the paste's padding spills a pixel or two)."""
    x0, y0, x1, y1 = region
    ys = torch.arange(y0, y1, device=box.device) + 0.5
    xs = torch.arange(x0, x1, device=box.device) + 0.5
    in_y = (ys >= box[1]) & (ys <= box[3])  # (h,)
    in_x = (xs >= box[0]) & (xs <= box[2])  # (w,)
    return in_y[:, None] & in_x[None, :]


def unpasted(
    detections: list[dict[str, Tensor]],
    image_sizes: list[tuple[int, int]],
    original_sizes: list[tuple[int, int]],
) -> list[dict[str, Tensor]]:
    """Eval detections in the transformed images' pixels -> in the original images' pixels,
    as the transform's postprocess does, but with each image's "masks" (N, 1, M, M) left in
    their boxes under the key "box_masks" (and "keypoints", when there are some, resized)."""
    for detection, size, original in zip(detections, image_sizes, original_sizes):
        detection["boxes"] = resize_boxes(detection["boxes"], size, original)
        detection["box_masks"] = detection.pop("masks")
        if "keypoints" in detection:
            detection["keypoints"] = resize_keypoints(detection["keypoints"], size, original)
    return detections
