"""Image files: where an entry's file may be, reading it, and checking it without decoding.

`load_image` is how every part of everyseg reads pixels. The start-up check reads headers
only (fast on big datasets) plus the file's last bytes: a PNG or JPEG cut short has no end
marker, so it is decoded to confirm (trailing data after the marker is legal, so a missing
marker alone is not proof). Other formats' truncation shows only when decoded (`decode`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch import Tensor
from torchvision.transforms.v2.functional import pil_to_tensor

from everyseg.data.validate import (
    IMAGE_MISSING,
    IMAGE_OUTSIDE,
    IMAGE_SIZE,
    IMAGE_UNREADABLE,
    DataError,
    Reason,
)

# 16-bit grayscale (common in medical/industrial data) would saturate under PIL's
# convert("RGB"), which clips to 8 bits instead of rescaling.
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# format -> the bytes a complete file has at (or, with trailing data, near) its end
_END_MARKERS = {"PNG": b"IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}
_TAIL_BYTES = 1024


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


def outside_images_dir(path: Path, real_images_dir: str) -> str | None:
    """Where `path` really leads if that is outside the folder (absolute file_name, `..`, or a
    symlink out), else None. `real_images_dir` is the folder's os.path.realpath: the folder
    itself may be a symlink."""
    real = os.path.realpath(path)
    if real.startswith(real_images_dir.rstrip(os.sep) + os.sep):
        return None
    return real


def displayed_size(path: Path, *, decode: bool) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header; `decode` reads the pixels too.

    Without `decode`, a PNG or JPEG whose end marker is missing is decoded anyway, so a
    truncated file raises here rather than mid-training.
    """
    with Image.open(path) as image:
        width, height = image.size
        if decode or _lacks_end_marker(image):
            image.load()
            exif = image.getexif()
        else:
            # getexif() would decode a PNG to find a late eXIf chunk; the header's copy suffices,
            # and the loader checks the size again after decoding.
            exif = Image.Exif()
            if isinstance(image.info.get("exif"), bytes):
                exif.load(image.info["exif"])
    return (height, width) if exif.get(0x0112) in (5, 6, 7, 8) else (width, height)


def _lacks_end_marker(image: ImageFile.ImageFile) -> bool:
    marker = _END_MARKERS.get(image.format or "")
    if marker is None or image.fp is None:
        return False
    position = image.fp.tell()
    try:
        size = image.fp.seek(0, os.SEEK_END)
        image.fp.seek(max(0, size - _TAIL_BYTES))
        return marker not in image.fp.read(_TAIL_BYTES)
    finally:
        image.fp.seek(position)


def image_file_problem(
    path: Path, *, width: int, height: int, decode: bool, real_images_dir: str | None = None
) -> tuple[Reason, str] | None:
    """(why, detail) if the file cannot serve as a `width` x `height` image, else None.

    With `real_images_dir` (a realpath), a file leading outside it is refused unopened.
    """
    try:
        if real_images_dir is not None and (real := outside_images_dir(path, real_images_dir)):
            detail = f"leads to {real}; set data.allow_outside_images=true to allow it"
            return IMAGE_OUTSIDE, detail
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
