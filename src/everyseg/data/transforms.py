"""Image loading and checking, and paired image/target transforms.

Targets follow the torchvision detection convention used by `CocoInstances`: `boxes` (N, 4)
xyxy in absolute pixels and `masks` (N, H, W). Resizing is not done here: the model's
`GeneralizedRCNNTransform` resizes (and multi-scales) images and targets together.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.transforms.v2.functional import pil_to_tensor

from everyseg.data.validate import IMAGE_MISSING, IMAGE_SIZE, IMAGE_UNREADABLE, DataError, Reason

# 16-bit grayscale (common in medical/industrial data) would saturate under PIL's
# convert("RGB"), which clips to 8 bits instead of rescaling.
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def load_image(path: str | os.PathLike) -> Tensor:
    """Read an image file as float32 RGB of shape (3, H, W) with values in [0, 1].

    EXIF orientation is applied, so (H, W) is the size as displayed. Grayscale, palette,
    RGBA (alpha dropped), CMYK and 16-bit grayscale images all become 3 channels.
    Raises FileNotFoundError, or DataError naming the file when it cannot be decoded.
    """
    try:
        with Image.open(path) as raw:
            return _to_tensor(ImageOps.exif_transpose(raw))
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 -- PIL raises OSError, SyntaxError, ValueError, ...
        raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


def _to_tensor(image: Image.Image) -> Tensor:
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(image, dtype=np.float32) / 65535.0
        return torch.from_numpy(gray).clamp_(0.0, 1.0).expand(3, -1, -1).contiguous()
    return pil_to_tensor(image.convert("RGB")).float().div_(255.0)


def displayed_size(path: Path, *, decode: bool) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header; `decode` reads the pixels too."""
    with Image.open(path) as image:
        width, height = image.size
        if decode:
            image.load()
            exif = image.getexif()
        else:
            # getexif() would decode a PNG to find a late eXIf chunk; the header's copy suffices,
            # and the loader checks the size again after decoding.
            exif = Image.Exif()
            if isinstance(image.info.get("exif"), bytes):
                exif.load(image.info["exif"])
    return (height, width) if exif.get(0x0112) in (5, 6, 7, 8) else (width, height)


def image_file_problem(
    path: Path, *, width: int, height: int, decode: bool
) -> tuple[Reason, str] | None:
    """(why, detail) if the file cannot serve as a `width` x `height` image, else None."""
    try:
        if not path.is_file():
            return IMAGE_MISSING, ""
        size = displayed_size(path, decode=decode)
    except Exception as err:  # noqa: BLE001 -- PIL (and odd paths) raise many types
        return IMAGE_UNREADABLE, f"{type(err).__name__}: {err}"
    if size == (width, height):
        return None
    return IMAGE_SIZE, size_mismatch(size=size, width=width, height=height)


def size_mismatch(*, size: tuple[int, int], width: int, height: int) -> str:
    detail = f"file is {size[0]}x{size[1]} (W x H, after EXIF orientation), JSON says "
    detail += f"{width}x{height}"
    if size == (height, width):
        detail += "; the JSON has the size before EXIF rotation, so its annotations may be too"
    return detail


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
