"""Keypoints of the synthetic shapes: corners and tips, named in the shape's own (unrotated)
frame, so a mirrored image swaps exactly the left/right names (data/keypoints.py).

Only outlines with clear corners have keypoints; the other classes' annotations have no
keypoint fields. A keypoint is a vertex of the outline as written in the JSON polygon; it is
visible (v=2) when a visible pixel of its object lies within 1 px, else labelled but hidden
(v=1, an object on top covers it).
"""

from __future__ import annotations

import numpy as np

_FIVE = ("top", "upper_right", "lower_right", "lower_left", "upper_left")
# class -> (keypoint names, their vertex indices in the outer outline, 1-based skeleton)
KEYPOINTS: dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[tuple[int, int], ...]]] = {
    "triangle": (("top", "bottom_right", "bottom_left"), (0, 1, 2), ((1, 2), (2, 3), (3, 1))),
    "square": (
        ("top_left", "top_right", "bottom_right", "bottom_left"),
        (0, 1, 2, 3),
        ((1, 2), (2, 3), (3, 4), (4, 1)),
    ),
    "pentagon": (_FIVE, (0, 1, 2, 3, 4), ((1, 2), (2, 3), (3, 4), (4, 5), (5, 1))),
    "star": (_FIVE, (0, 2, 4, 6, 8), ((1, 3), (3, 5), (5, 2), (2, 4), (4, 1))),
}


def category_fields(name: str) -> dict:
    """A category's COCO `keypoints` and `skeleton`, or nothing for a class without them."""
    if name not in KEYPOINTS:
        return {}
    names, _, skeleton = KEYPOINTS[name]
    return {"keypoints": list(names), "skeleton": [list(pair) for pair in skeleton]}


def annotation_fields(name: str, outline: np.ndarray, visible: np.ndarray) -> dict:
    """An annotation's COCO `keypoints` ([x, y, v] * K) and `num_keypoints`, or nothing.

    `outline` (P, 2) the placed outer polygon, `visible` (H, W) bool its visible pixels.
    """
    if name not in KEYPOINTS:
        return {}
    _, vertices, _ = KEYPOINTS[name]
    height, width = visible.shape
    values: list[float] = []
    for x, y in outline[list(vertices)]:
        col, row = min(int(x), width - 1), min(int(y), height - 1)
        near = visible[max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2]
        values += [float(x), float(y), 2 if near.any() else 1]
    return {"keypoints": values, "num_keypoints": len(vertices)}
