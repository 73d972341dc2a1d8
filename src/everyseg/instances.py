"""Instances: one image's detections, each mask kept only inside its box; full-image masks,
probabilities and COCO RLE on demand.

Memory follows what is kept: N masks cost the sum of their boxes' areas in bytes (plus the
head's M x M probabilities), never N x H x W, until a caller asks for full-image planes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from everyseg.engine.coco_results import encode_crops
from everyseg.modeling.paste import Region, inside_box, pasted_crops


class BoxMasks:
    """N binary masks of an (H, W) image pasted from the mask head's (N, 1, M, M)
    probabilities in (N, 4) xyxy boxes: a pixel is foreground when its probability is above
    `threshold`. Each mask is stored only in its region (`regions[i]`: x0, y0, x1, y1, where
    pasting can reach); the rest of the image is background. With `cut_to_box` a mask is
    also cut to the pixels whose centres lie in its box (box prompts bound their masks).
    """

    def __init__(
        self,
        box_probs: Tensor,
        boxes: Tensor,
        *,
        image_size: tuple[int, int],
        threshold: float,
        cut_to_box: bool = False,
    ) -> None:
        self.image_size = image_size
        self.box_probs = box_probs.detach().float().cpu()  # (N, 1, M, M)
        self.boxes = boxes.detach().float().cpu()  # (N, 4)
        self.cut_to_box = cut_to_box
        regions, crops = [], []
        # one mask at a time, on the model's device; only its bool crop comes back
        for region, probs in self._pasted(box_probs, boxes):
            regions.append(region)
            crops.append((probs > threshold).cpu().numpy())
        self.regions = np.array(regions, dtype=np.int64).reshape(-1, 4)
        self.crops: list[np.ndarray] = crops  # (y1 - y0, x1 - x0) bool each

    def __len__(self) -> int:
        return len(self.crops)

    def mask(self, index: int) -> np.ndarray:
        """Mask `index` over the whole image: (H, W) bool."""
        full = np.zeros(self.image_size, dtype=bool)
        x0, y0, x1, y1 = self.regions[index]
        full[y0:y1, x0:x1] = self.crops[index]
        return full

    def full(self) -> np.ndarray:
        """All masks over the whole image: (N, H, W) bool, N x H x W bytes."""
        full = np.zeros((len(self), *self.image_size), dtype=bool)
        for plane, (x0, y0, x1, y1), crop in zip(full, self.regions, self.crops):
            plane[y0:y1, x0:x1] = crop
        return full

    def probabilities(self) -> np.ndarray:
        """All masks' foreground probabilities over the whole image, pasted again from the
        M x M ones: (N, H, W) float32, 4 x N x H x W bytes."""
        full = np.zeros((len(self), *self.image_size), dtype=np.float32)
        for plane, ((x0, y0, x1, y1), probs) in zip(full, self._pasted(self.box_probs, self.boxes)):
            plane[y0:y1, x0:x1] = probs.numpy()
        return full

    def rle(self) -> list[dict[str, Any]]:
        """One compressed COCO RLE per mask, `counts` as str (JSON-ready)."""
        return encode_crops(zip(map(tuple, self.regions), self.crops), image_size=self.image_size)

    def _pasted(self, box_probs: Tensor, boxes: Tensor) -> Iterator[tuple[Region, Tensor]]:
        """Per mask its region and (h, w) float probabilities there."""
        crops = pasted_crops(box_probs, boxes, self.image_size)
        for box, (region, probs) in zip(boxes, crops):
            yield region, probs * inside_box(box, region) if self.cut_to_box else probs


@dataclass
class Instances:
    """Detections of one image, in its pixel coordinates (N instances, H x W image).

    `masks` and `mask_probs` are built on each access, full-image: N x H x W bytes and 4x
    that; `mask(i)`, `box_masks.crops` and `rle()` cost one mask or none.
    """

    boxes: np.ndarray  # (N, 4) float32 xyxy
    scores: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) int64, contiguous 1..K
    class_names: list[str]  # (N,)
    box_masks: BoxMasks  # N masks, each kept inside its box
    # a keypoint model's (N, K, 3) float32 x, y, v (v=0: none; data/keypoints.py) and each
    # instance's skeleton (0-based pairs); None and empty without keypoints
    keypoints: np.ndarray | None = None
    skeletons: list[tuple[tuple[int, int], ...]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def masks(self) -> np.ndarray:
        """(N, H, W) bool."""
        return self.box_masks.full()

    @property
    def mask_probs(self) -> np.ndarray:
        """(N, H, W) float32 foreground probabilities."""
        return self.box_masks.probabilities()

    def mask(self, index: int) -> np.ndarray:
        """Instance `index`'s (H, W) bool mask."""
        return self.box_masks.mask(index)

    def rle(self) -> list[dict[str, Any]]:
        """One compressed COCO RLE per instance."""
        return self.box_masks.rle()
