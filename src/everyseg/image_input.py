"""What the Predictor takes as an image: a path, a numpy array, a PIL image or a torch tensor,
one at a time or as a batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from everyseg.data.images import load_image

ImageLike = str | Path | np.ndarray | Image.Image | torch.Tensor


def image_to_tensor(image: ImageLike) -> torch.Tensor:
    """Path, PIL image, (H, W[, C]) numpy array or (H, W) / (C, H, W) tensor -> (3, H, W)
    float. Arrays and tensors are uint8 in 0..255 or float in [0, 1]; C is 1, 3 or 4 (alpha
    dropped). A tensor keeps its device."""
    if isinstance(image, (str, Path)):
        return load_image(Path(image))
    if isinstance(image, Image.Image):
        return _from_array(np.asarray(image.convert("RGB")))
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, torch.Tensor):
        return _from_tensor(image)
    raise TypeError(
        f"expected a path, numpy array, PIL image or torch tensor, got {type(image).__name__}"
    )


def as_batch(images) -> tuple[list, bool]:
    """`images` -> (its images as a list, whether it was a batch): a list or tuple of images,
    or a 4-D array or tensor ((B, H, W, C) numpy, (B, C, H, W) torch) is a batch."""
    if isinstance(images, (list, tuple)):
        return list(images), True
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images), True
    return [images], False


def _from_array(array: np.ndarray) -> torch.Tensor:
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) array, got {array.shape}")
    rgb = array[:, :, :3]
    scaled = rgb.astype(np.float32) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(scaled)).permute(2, 0, 1)


def _from_tensor(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"expected an (H, W), (1, H, W), (3, H, W) or (4, H, W) tensor, "
            f"got {tuple(tensor.shape)}"
        )
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"expected uint8 or float pixels, got {tensor.dtype}")
    rgb = tensor[:3].expand(3, -1, -1)  # a (1, H, W) plane is gray
    return rgb.float() / 255.0 if rgb.dtype == torch.uint8 else rgb.float()
