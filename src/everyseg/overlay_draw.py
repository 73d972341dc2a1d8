"""Overlays: an image with its instances' masks, boxes, captions (and keypoints) drawn on it,
as `everyseg predict`, the demo and training's TensorBoard images show them."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes

from everyseg.image_input import ImageLike, image_to_tensor
from everyseg.instances import BoxMasks, Instances
from everyseg.keypoint_draw import draw_instance_keypoints


def draw_overlay(
    image: ImageLike, instances: Instances, *, alpha: float = 0.45, min_side: int = 512
) -> Image.Image:
    """The image with each instance's mask, box, class name and score drawn on it, and its
    keypoints and skeleton when it has some.

    Small images are enlarged (nearest neighbour, integer factor) until their long side
    reaches `min_side`, so that captions stay readable on 128 px inputs.
    """
    canvas = (image_to_tensor(image) * 255).round().to(torch.uint8)  # (3, H, W)
    scale = max(1, math.ceil(min_side / max(canvas.shape[1:])))
    canvas = _enlarge(canvas, scale)
    if len(instances) == 0:
        return Image.fromarray(canvas.permute(1, 2, 0).numpy())
    colors = [_color(int(lab)) for lab in instances.labels]
    canvas = _paint_masks(canvas, instances.box_masks, colors, scale=scale, alpha=alpha)
    captions = [f"{n} {s:.2f}" for n, s in zip(instances.class_names, instances.scores)]
    boxes = torch.from_numpy(instances.boxes) * scale
    canvas = draw_bounding_boxes(canvas, boxes, colors=colors, width=2)
    if instances.keypoints is not None:
        canvas = draw_instance_keypoints(
            canvas, instances.keypoints, instances.skeletons, scale=scale, colors=colors
        )
    overlay = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    _draw_captions(overlay, boxes.tolist(), captions, colors)
    return overlay


def _draw_captions(image: Image.Image, boxes: list, captions: list[str], colors: list) -> None:
    """Each caption on a tag of its instance's colour at its box's top left corner, in a
    font sized to the image: readable over any texture, where bare coloured text is not."""
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, image.height // 40))
    for (x0, y0, _, _), caption, rgb in zip(boxes, captions, colors):
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        # the tag sits above the box, or inside it where the box touches the image's top
        y = y0 - (bottom - top) - 4 if y0 >= (bottom - top) + 4 else y0
        draw.rectangle((x0, y, x0 + right - left + 4, y + bottom - top + 4), fill=tuple(rgb))
        light_tag = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140
        ink = "black" if light_tag else "white"
        draw.text((x0 + 2 - left, y + 2 - top), caption, font=font, fill=ink)


def _paint_masks(
    canvas: torch.Tensor, box_masks: BoxMasks, colors: list, *, scale: int, alpha: float
) -> torch.Tensor:
    """torchvision's draw_segmentation_masks (each mask painted in its colour, pixels of
    several masks black, then one blend) done inside each mask's region: memory is the canvas
    plus one mask, never N full-image planes. `canvas`: (3, scale * H, scale * W) uint8."""
    painted = torch.zeros(canvas.shape[1:], dtype=torch.bool)  # (sH, sW)
    overlap = torch.zeros_like(painted)
    colour = canvas.clone()
    for (x0, y0, x1, y1), crop, rgb in zip(box_masks.regions, box_masks.crops, colors):
        area = _enlarge(torch.from_numpy(crop)[None], scale)[0]  # (s * h, s * w) bool
        rows, cols = slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale)
        colour[:, rows, cols][:, area] = torch.tensor(rgb, dtype=torch.uint8)[:, None]
        overlap[rows, cols] |= painted[rows, cols] & area
        painted[rows, cols] |= area
    colour[:, overlap] = 0
    blended = canvas[:, painted].float() * (1 - alpha) + colour[:, painted].float() * alpha
    out = canvas.clone()
    out[:, painted] = blended.to(torch.uint8)
    return out


def _enlarge(planes: torch.Tensor, scale: int) -> torch.Tensor:
    """(C, H, W) -> (C, scale * H, scale * W) by pixel repetition."""
    return planes.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def _color(label: int) -> tuple[int, int, int]:
    """A stable, well-spread colour per class (golden-ratio hue steps)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)
