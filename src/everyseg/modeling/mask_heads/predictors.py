"""A mask head's final layer from the config: Mask R-CNN's per-class 1x1 conv or Mask^X's
weight transfer, optionally fused with the class-agnostic MLP branch.

Every mask head's features end in `model.mask_head.channels` channels at the mask
resolution M (`MaskHeadConfig.mask_resolution`), so the predictor is built apart from the head
and handed to its builder.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from everyseg.config import ConfigError, ModelConfig
from everyseg.modeling.mask_heads.base import ClassConvPredictor
from everyseg.modeling.mask_heads.mlp import FusedPredictor, MLPMaskBranch
from everyseg.modeling.mask_heads.transfer import build_transfer_predictor


def build_conv_predictor(
    cfg: ModelConfig, *, box_predictor: FastRCNNPredictor | None, num_classes: int, class_names
) -> ClassConvPredictor:
    mh = cfg.mask_head
    return ClassConvPredictor(
        in_channels=mh.channels, num_classes=num_classes, class_agnostic=mh.class_agnostic
    )


def build_transfer(
    cfg: ModelConfig, *, box_predictor: FastRCNNPredictor | None, num_classes: int, class_names
) -> nn.Module:
    mh, t = cfg.mask_head, cfg.transfer
    if mh.class_agnostic:
        raise ConfigError(
            "model.mask_head.predictor=transfer predicts a mask per class; it needs "
            "model.mask_head.class_agnostic=false"
        )
    return build_transfer_predictor(
        input=t.input,
        num_layers=t.num_layers,
        hidden_dim=t.hidden_dim or mh.channels,
        activation=t.activation,
        stop_gradient=t.stop_gradient,
        in_channels=mh.channels,
        num_classes=num_classes,
        box_predictor=box_predictor,
        class_names=class_names,
        embedding_file=t.embedding_file,
        randn_dim=t.randn_dim,
    )


PREDICTORS = {"conv": build_conv_predictor, "transfer": build_transfer}


def build_mask_predictor(
    cfg: ModelConfig,
    *,
    box_predictor: FastRCNNPredictor | None,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> nn.Module:
    """(R, D, M, M) features, (R,) labels -> (R, M, M) logits, as `cfg.mask_head` says.

    `box_predictor` is the one the model trains (the transfer reads its weights, never copies
    them), None for a detector without one; `class_names` (K names) are needed only by
    model.transfer.input=embedding.
    """
    mh = cfg.mask_head
    if mh.predictor not in PREDICTORS:
        raise ConfigError(
            f"model.mask_head.predictor {mh.predictor!r}: choose one of {', '.join(PREDICTORS)}"
        )
    predictor = PREDICTORS[mh.predictor](
        cfg, box_predictor=box_predictor, num_classes=num_classes, class_names=class_names
    )
    if not mh.mlp_fusion:
        return predictor
    resolution = mh.mask_resolution
    mlp = MLPMaskBranch(
        in_features=mh.channels * resolution**2,
        resolution=resolution,
        num_layers=mh.mlp_layers,
        hidden_dim=mh.mlp_hidden,
    )
    return FusedPredictor(per_class=predictor, mlp=mlp)
