"""RoI poolers by `model.roi_pool`: torchvision's MultiScaleRoIAlign, or the same with RoIPool.

RoIPool quantises each RoI and its bins to the feature grid (Fast R-CNN); RoIAlign samples
bilinearly at exact positions. Mask R-CNN's ablation swaps one for the other with all else
equal, so both assign a box to its FPN level with torchvision's own LevelMapper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_pool
from torchvision.ops.poolers import (
    LevelMapper,
    _convert_to_roi_format,
    _filter_input,
    _setup_scales,
)

from everyseg.config import ConfigError


class MultiScaleRoIPool(MultiScaleRoIAlign):
    """MultiScaleRoIAlign's level assignment and scales, RoIPool's sampling (no
    sampling_ratio: RoIPool takes the max over each quantised bin)."""

    # set on the first call, as the parent's (which declares them where mypy cannot see)
    scales: list[float] | None
    map_levels: LevelMapper | None

    def __init__(self, featmap_names: Sequence[str], output_size: int) -> None:
        super().__init__(list(featmap_names), output_size, sampling_ratio=0)

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """{level: (B, C, H_l, W_l)}, per image (N_i, 4) xyxy boxes -> (N, C, S, S)."""
        maps = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                maps, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)  # (N, 5): image index, x0, y0, x1, y1
        if len(maps) == 1:
            return roi_pool(maps[0], rois, self.output_size, self.scales[0])
        levels = self.map_levels(boxes)  # (N,) index into maps
        result = maps[0].new_zeros((len(rois), maps[0].shape[1], *self.output_size))
        for level, (feature_map, scale) in enumerate(zip(maps, self.scales)):
            in_level = torch.where(levels == level)[0]
            pooled = roi_pool(feature_map, rois[in_level], self.output_size, scale)
            result[in_level] = pooled.to(result.dtype)
        return result


def _align(featmap_names: Sequence[str], output_size: int) -> MultiScaleRoIAlign:
    return MultiScaleRoIAlign(list(featmap_names), output_size, sampling_ratio=2)


# model.roi_pool -> (featmap_names, output_size) -> pooler
ROI_POOLERS = {"align": _align, "pool": MultiScaleRoIPool}


def build_roi_pooler(
    kind: str, *, featmap_names: Sequence[str], output_size: int
) -> MultiScaleRoIAlign:
    """The pooler `model.roi_pool` names, reading `featmap_names` to (S, S) per RoI."""
    if kind not in ROI_POOLERS:
        raise ConfigError(f"model.roi_pool {kind!r}: choose one of {', '.join(ROI_POOLERS)}")
    return ROI_POOLERS[kind](featmap_names, output_size)
