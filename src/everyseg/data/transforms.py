"""Image loading and paired image/target transforms.

Targets follow the torchvision detection convention used by `CocoInstances`: `boxes` (N, 4)
xyxy in absolute pixels and `masks` (N, H, W). Resizing is not done here: the model's
`GeneralizedRCNNTransform` resizes (and multi-scales) images and targets together.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.transforms.v2.functional import pil_to_tensor

# 16-bit grayscale (common in medical/industrial data) would saturate under PIL's
# convert("RGB"), which clips to 8 bits instead of rescaling.
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def load_image(path: str | os.PathLike) -> Tensor:
    """Read an image file as float32 RGB of shape (3, H, W) with values in [0, 1].

    EXIF orientation is applied, so (H, W) is the size as displayed. Grayscale, palette,
    RGBA (alpha dropped), CMYK and 16-bit grayscale images all become 3 channels.
    """
    with Image.open(path) as raw:
        image = ImageOps.exif_transpose(raw)
        if image.mode in _SIXTEEN_BIT_MODES:
            gray = np.asarray(image, dtype=np.float32) / 65535.0
            return torch.from_numpy(gray).clamp_(0.0, 1.0).expand(3, -1, -1).contiguous()
        rgb = image.convert("RGB")
    return pil_to_tensor(rgb).float().div_(255.0)


def hflip(image: Tensor, target: dict) -> tuple[Tensor, dict]:
    """Mirror an image and its target left-right.

    image: (C, H, W). target: `boxes` (N, 4) xyxy pixels, optional `masks` (N, H, W); other
    keys are passed through. Returns new tensors; the inputs are not modified.
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
    return image.flip(-1), out
