"""Keypoints of a predictor's instances: which detections have them, and how they are drawn.

A keypoint model predicts K keypoints for every detection; they mean something only for the
keypoint classes (data/keypoints.py), so the other detections' keypoints are zeroed (v=0),
neither drawn nor written to COCO results.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.utils import draw_keypoints

from everyseg.data.keypoints import KeypointLayout

KEYPOINT_COLOUR = (255, 255, 255)


def instance_keypoints(
    keypoints: torch.Tensor, class_names: Sequence[str], layout: KeypointLayout
) -> np.ndarray:
    """(N, K, 3) predicted x, y, v (v=1) -> float32 with only each detection's class's own
    keypoints (`class_names`: N names) kept, the rest zero (v=0)."""
    out = np.zeros(tuple(keypoints.shape), dtype=np.float32)
    points = keypoints.detach().float().cpu().numpy()
    for i, name in enumerate(class_names):
        own = list(layout.of_class(name)[0])
        out[i, own] = points[i, own]
    return out


def draw_instance_keypoints(
    canvas: torch.Tensor,
    keypoints: np.ndarray,
    skeletons: Sequence[Sequence[tuple[int, int]]],
    *,
    scale: int,
    colors: list[tuple[int, int, int]],
) -> torch.Tensor:
    """(3, sH, sW) uint8 canvas with each instance's labelled keypoints (v > 0) as dots and
    its skeleton's lines (torchvision's draw_keypoints), in the instance's colour."""
    for points, skeleton, rgb in zip(keypoints, skeletons, colors):
        visible = torch.from_numpy(points[:, 2] > 0)
        if not visible.any():
            continue
        xy = torch.from_numpy(points[None, :, :2] * scale)  # (1, K, 2)
        canvas = draw_keypoints(
            canvas,
            xy,
            connectivity=list(skeleton),
            colors=rgb,
            radius=max(2, scale),
            width=2,
            visibility=visible[None],
        )
    return canvas
