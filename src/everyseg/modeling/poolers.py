"""RoI poolers by `model.roi_pool`: torchvision's MultiScaleRoIAlign (on a CPU, RoIAlign as a
faster gather: modeling/roi_align.py), or the same with RoIPool.

RoIPool quantises each RoI and its bins to the feature grid (Fast R-CNN); RoIAlign samples
bilinearly at exact positions. Mask R-CNN's ablation swaps one for the other with all else
equal, so both assign a box to its FPN level with torchvision's own LevelMapper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torchvision
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_pool
from torchvision.ops.poolers import (
    LevelMapper,
    _convert_to_roi_format,
    _filter_input,
    _setup_scales,
)

from everyseg.config import ConfigError
from everyseg.modeling.roi_align import multilevel_roi_align_gather, roi_align_gather


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
        maps, rois, levels = rois_by_level(self, x, boxes, image_shapes)
        return pool_by_level(self, maps, rois, levels, self._pool)

    def _pool(self, features: Tensor, rois: Tensor, scale: float) -> Tensor:
        return roi_pool(features, rois, self.output_size, scale)


class MultiScaleRoIAlignGather(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign reading the maps with roi_align_gather on a CPU
    (modeling/roi_align.py: the same within float rounding, several times faster) while
    training, and in eval mode once `gather_in_inference` is set (engine/load.py's
    ready_for_inference sets it). Otherwise it is torchvision's, so a model made from a
    torchvision one predicts bit for bit as that does; on CUDA and when tracing for export,
    too."""

    scales: list[float] | None
    map_levels: LevelMapper | None
    gather_in_inference: bool = False

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """{level: (B, C, H_l, W_l)}, per image (N_i, 4) xyxy boxes -> (N, C, S, S)."""
        maps = _filter_input(x, self.featmap_names)
        gather = (
            (self.training or self.gather_in_inference)
            and maps[0].device.type == "cpu"
            and maps[0].dtype in (torch.float32, torch.float64)
            and self.sampling_ratio > 0
            and not torch.jit.is_scripting()
            and not torchvision._is_tracing()
        )
        if not gather:
            return super().forward(x, boxes, image_shapes)
        maps, rois, levels = rois_by_level(self, x, boxes, image_shapes)
        assert self.scales is not None
        if levels is not None and not torch.is_grad_enabled():
            # predicting: level by level, as one table of every level's rows (a copy of the
            # maps, 54 MB for an 800 x 800 image) costs more than it saves without a backward
            return pool_by_level(self, maps, rois, levels, self._gather)
        pooled = multilevel_roi_align_gather(
            maps, rois, levels, self.scales, self.output_size, self.sampling_ratio
        )  # (N, C, S, S) channels-last, as the mask head's convolutions read it
        # one map: contiguous, as torchvision's (its keypoint loss views it)
        return pooled.contiguous() if levels is None else pooled

    def _gather(self, features: Tensor, rois: Tensor, scale: float) -> Tensor:
        return roi_align_gather(features, rois, self.output_size, scale, self.sampling_ratio)


def pool_by_level(
    pooler: MultiScaleRoIAlign,
    maps: list[Tensor],
    rois: Tensor,
    levels: Tensor | None,
    pool: Callable[[Tensor, Tensor, float], Tensor],
) -> Tensor:
    """torchvision's multi-scale pooling, rois_by_level's (N, 5) rois each read from its
    level by `pool(feature_map, rois, scale)`: (N, C, S, S)."""
    assert pooler.scales is not None
    if levels is None:
        return pool(maps[0], rois, pooler.scales[0])
    # in the maps' layout: the gather's channels-last RoI features are then put in place and
    # read by the mask head's convolutions without a change of layout
    channels_last = maps[0].is_contiguous(memory_format=torch.channels_last)
    result = torch.empty(
        (len(rois), maps[0].shape[1], *pooler.output_size),
        dtype=maps[0].dtype,
        device=maps[0].device,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
    ).zero_()
    for level, (feature_map, scale) in enumerate(zip(maps, pooler.scales)):
        in_level = torch.where(levels == level)[0]
        result[in_level] = pool(feature_map, rois[in_level], scale).to(result.dtype)
    return result


def rois_by_level(
    pooler: MultiScaleRoIAlign,
    x: dict[str, Tensor],
    boxes: list[Tensor],
    image_shapes: list[tuple[int, int]],
) -> tuple[list[Tensor], Tensor, Tensor | None]:
    """The pooler's maps, (N, 5) rois (image index, x0, y0, x1, y1) and (N,) the level each
    is read from by the pooler's LevelMapper (None with one map); sets the pooler's scales
    on the first call, as torchvision's does."""
    maps = _filter_input(x, pooler.featmap_names)
    if pooler.scales is None or pooler.map_levels is None:
        pooler.scales, pooler.map_levels = _setup_scales(
            maps, image_shapes, pooler.canonical_scale, pooler.canonical_level
        )
    rois = _convert_to_roi_format(boxes)
    levels = pooler.map_levels(boxes) if len(maps) > 1 else None
    return maps, rois, levels


def with_gather(pooler: MultiScaleRoIAlign) -> MultiScaleRoIAlign:
    """A torchvision MultiScaleRoIAlign as a MultiScaleRoIAlignGather with its settings
    (any other pooler as it is)."""
    if type(pooler) is not MultiScaleRoIAlign:
        return pooler
    return MultiScaleRoIAlignGather(
        pooler.featmap_names,
        pooler.output_size,
        pooler.sampling_ratio,
        canonical_scale=pooler.canonical_scale,
        canonical_level=pooler.canonical_level,
    )


def _align(featmap_names: Sequence[str], output_size: int) -> MultiScaleRoIAlign:
    return MultiScaleRoIAlignGather(list(featmap_names), output_size, sampling_ratio=2)


# model.roi_pool -> (featmap_names, output_size) -> pooler
ROI_POOLERS = {"align": _align, "pool": MultiScaleRoIPool}


def build_roi_pooler(
    kind: str, *, featmap_names: Sequence[str], output_size: int
) -> MultiScaleRoIAlign:
    """The pooler `model.roi_pool` names, reading `featmap_names` to (S, S) per RoI."""
    if kind not in ROI_POOLERS:
        raise ConfigError(f"model.roi_pool {kind!r}: choose one of {', '.join(ROI_POOLERS)}")
    return ROI_POOLERS[kind](featmap_names, output_size)
