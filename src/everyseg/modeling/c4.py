"""Mask R-CNN's C4 RoI heads (model.backbone.fpn=false): RoIs pooled from the stride-16 C4 map
run through ResNet stage 5 (`res5`, the backbone's, shared); the box branch average-pools its
output, the mask branch deconvolves it to the mask (the paper's Figure 4, left)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from everyseg.config import ConfigError, ModelConfig
from everyseg.modeling.backbone import C4Backbone
from everyseg.modeling.mask_heads import build_fcn_head, build_mask_predictor, with_mask_loss
from everyseg.modeling.poolers import build_roi_pooler

C4_LEVELS = ["0"]


class C4RoIFeatures(nn.Module):
    """A RoI pooler on C4 followed by stage 5: per image (N_i, 4) boxes ->
    (N, C5, *output_size), output_size = (ceil(S / 2),) * 2 (stage 5 strides by 2)."""

    def __init__(self, *, pool: MultiScaleRoIAlign, res5: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        self.res5 = res5
        self.output_size = tuple(_res5_side(s) for s in pool.output_size)

    def forward(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        return self.res5(self.pool(features, boxes, image_shapes))  # (N, C5, S', S')


def c4_head_parts(
    cfg: ModelConfig,
    *,
    backbone: C4Backbone,
    num_classes: int,
    class_names: Sequence[str] | None,
) -> dict[str, Any]:
    """PartialMaskRoIHeads' poolers, box head and predictor, mask head and mask resolution
    for a C4 backbone. The box pooler reads S = model.box_head.pooler_resolution, the mask
    pooler S = model.mask_head.pooler_resolution (the paper: 14 both); masks are S x S."""
    bh, mh = cfg.box_head, cfg.mask_head
    if mh.name != "fcn":
        raise ConfigError(
            f"model.backbone.fpn=false (C4) deconvolves stage 5's output to the mask: it "
            f"needs model.mask_head.name=fcn, not {mh.name}"
        )
    resolution = 2 * _res5_side(mh.pooler_resolution)  # stage 5 halves, the deconv doubles
    if mh.resolution not in (None, resolution):
        raise ConfigError(
            f"model.mask_head.resolution {mh.resolution}: with model.backbone.fpn=false the "
            f"mask is stage 5's output deconvolved, {resolution} for "
            f"model.mask_head.pooler_resolution {mh.pooler_resolution}; use null"
        )
    res5_channels = backbone.out_channels * 2
    box_predictor = FastRCNNPredictor(res5_channels, num_classes)
    # the predictor (an MLP fusion among them) reads features at this resolution
    c4_cfg = dataclasses.replace(cfg, mask_head=dataclasses.replace(mh, resolution=resolution))
    make_predictor = partial(
        build_mask_predictor,
        c4_cfg,
        box_predictor=box_predictor,
        num_classes=num_classes,
        class_names=class_names,
    )
    mask_head = build_fcn_head(
        in_channels=res5_channels,
        channels=mh.channels,
        num_convs=mh.num_convs,
        make_predictor=make_predictor,
    )
    return dict(
        box_roi_pool=_c4_pooler(cfg.roi_pool, bh.pooler_resolution, backbone.res5),
        box_head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),  # (N, C5)
        box_predictor=box_predictor,
        mask_roi_pool=_c4_pooler(cfg.roi_pool, mh.pooler_resolution, backbone.res5),
        mask_head=with_mask_loss(mh, mask_head),
        mask_resolution=resolution,
    )


def _c4_pooler(kind: str, size: int, res5: nn.Module) -> C4RoIFeatures:
    pool = build_roi_pooler(kind, featmap_names=C4_LEVELS, output_size=size)
    return C4RoIFeatures(pool=pool, res5=res5)


def _res5_side(size: int) -> int:
    # stage 5's first block: a 3x3 (or 1x1 downsample) conv, stride 2, padding 1
    return (size + 1) // 2
