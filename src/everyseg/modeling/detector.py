"""build_model: a detector's architecture from `model.*` (weights are the engine's business:
engine/initialize.py), and from_torchvision for torchvision's own Mask R-CNN."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from everyseg.config import ConfigError, KeypointHeadConfig, ModelConfig
from everyseg.modeling.backbone import FPN_LEVELS, pool_before_relu, resnet_c4, resnet_fpn
from everyseg.modeling.fcn import FCN, build_fcn
from everyseg.modeling.fcos import FCOSWithMasks, build_fcos
from everyseg.modeling.keypoint_head import build_keypoint_branch
from everyseg.modeling.mask_heads import ClassConvPredictor, MaskHead
from everyseg.modeling.mask_heads.fcn import FCNFeatures
from everyseg.modeling.poolers import with_gather
from everyseg.modeling.rcnn import RCNN, build_rcnn
from everyseg.modeling.roi_heads import PartialMaskRoIHeads
from everyseg.modeling.rpn import like_torchvision

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# what build_model returns: every detector also segments given boxes (masks_for_boxes)
Detector = RCNN | FCOSWithMasks
# model.detector -> builder(cfg, *, backbone, num_classes, class_names, transform)
DETECTORS: dict[str, Callable[..., Detector]] = {"rcnn": build_rcnn, "fcos": build_fcos}


class MultiScaleTransform(GeneralizedRCNNTransform):
    """Resizes to a short side drawn from `train_sizes` in training and `test_size` in eval."""

    def __init__(self, *, train_sizes, test_size: int, max_size: int) -> None:
        super().__init__(tuple(train_sizes), max_size, list(IMAGENET_MEAN), list(IMAGENET_STD))
        self.train_sizes = tuple(train_sizes)
        self.test_size = test_size

    def train(self, mode: bool = True):
        # torchvision resizes eval images to min_size[-1]; swap the tuple with the mode
        self.min_size = self.train_sizes if mode else (self.test_size,)
        return super().train(mode)


def build_model(
    cfg: ModelConfig,
    *,
    num_classes: int,
    min_size: Sequence[int],
    max_size: int,
    test_min_size: int,
    class_names: Sequence[str] | None = None,
    keypoint_names: Sequence[str] | None = None,
) -> Detector | FCN:
    """The detector `cfg.detector` names (or with model.kind=fcn, an FCN for semantic
    segmentation: modeling/fcn.py), randomly initialised: no weights are loaded here.

    `num_classes` counts the background, as in torchvision (K foreground classes -> K + 1).
    Images are resized to a short side drawn from `min_size` in training and `test_min_size`
    in eval, the long side at most `max_size` (data.min_size, data.test_min_size,
    data.max_size). `class_names` (K names) are needed by model.transfer.input=embedding,
    `keypoint_names` (the data's keypoint list, data/keypoints.py) by model.keypoint_head.
    """
    if cfg.detector not in DETECTORS:
        raise ConfigError(f"model.detector {cfg.detector!r}: choose one of {', '.join(DETECTORS)}")
    transform = MultiScaleTransform(
        train_sizes=min_size, test_size=test_min_size, max_size=max_size
    )
    if cfg.kind == "fcn":
        return build_fcn(cfg, num_classes=num_classes, transform=transform)
    b = cfg.backbone
    if not b.fpn and not b.stage5:
        raise ConfigError(
            "model.backbone.stage5=false needs model.backbone.fpn=true: C4's RoI heads are "
            "stage 5 (with fpn=false set stage5=true; the tiny presets leave it out)"
        )
    if not b.fpn and cfg.detector != "rcnn":
        raise ConfigError(
            f"model.backbone.fpn=false (C4) is Mask R-CNN's: it needs model.detector=rcnn, "
            f"not {cfg.detector} (which reads FPN levels)"
        )
    backbone = (
        resnet_fpn(
            name=b.name,
            trainable_layers=b.trainable_layers,
            norm=b.norm,
            fpn_channels=b.fpn_channels,
            stage5=b.stage5,
        )
        if b.fpn
        else resnet_c4(name=b.name, trainable_layers=b.trainable_layers, norm=b.norm)
    )
    detector = DETECTORS[cfg.detector](
        cfg,
        backbone=backbone,
        num_classes=num_classes,
        class_names=class_names,
        transform=transform,
    )
    if cfg.keypoint_head is not None:
        if not b.fpn:
            raise ConfigError(
                "model.keypoint_head reads the FPN levels: it needs model.backbone.fpn=true "
                "(C4's RoI heads run stage 5 per RoI)"
            )
        _add_keypoint_branch(detector, cfg.keypoint_head, keypoint_names)
    return detector


def _add_keypoint_branch(detector: Detector, cfg: KeypointHeadConfig, names) -> None:
    if not isinstance(detector, RCNN):
        raise ConfigError("model.keypoint_head needs model.detector=rcnn (its RoI heads)")
    if not names:
        raise ConfigError(
            "model.keypoint_head: the training data has no keypoints (no category of "
            "data.keypoint_classes lists 'keypoints'); set model.keypoint_head=null"
        )
    pool = detector.roi_heads.box_roi_pool
    detector.roi_heads.keypoint_branch = build_keypoint_branch(
        cfg,
        in_channels=detector.backbone.out_channels,
        num_keypoints=len(names),
        featmap_names=getattr(pool, "featmap_names", FPN_LEVELS),  # the box pooler's maps
    )


def from_torchvision(tv_model: MaskRCNN) -> RCNN:
    """An everyseg model with the same modules and weights as a torchvision MaskRCNN.

    In eval mode both return the same boxes, labels, scores and masks; in training the
    everyseg one honours `has_mask`. The torchvision model is copied, never shared.
    """
    tv = copy.deepcopy(tv_model)
    heads = tv.roi_heads
    tv_predictor = heads.mask_predictor  # conv5_mask (deconv), relu, mask_fcn_logits (1x1)
    logits_conv = tv_predictor.mask_fcn_logits
    predictor = ClassConvPredictor(
        in_channels=logits_conv.in_channels,
        num_classes=logits_conv.out_channels,
        class_agnostic=logits_conv.out_channels == 1,
    )
    predictor.conv = logits_conv
    roi_heads = PartialMaskRoIHeads(
        box_roi_pool=with_gather(heads.box_roi_pool),
        box_head=heads.box_head,
        box_predictor=heads.box_predictor,
        mask_roi_pool=with_gather(heads.mask_roi_pool),
        mask_head=MaskHead(
            features=FCNFeatures(convs=heads.mask_head, upsample=tv_predictor.conv5_mask),
            predictor=predictor,
        ),
        fg_iou_thresh=float(heads.proposal_matcher.high_threshold),
        bg_iou_thresh=float(heads.proposal_matcher.low_threshold),
        batch_size_per_image=heads.fg_bg_sampler.batch_size_per_image,
        positive_fraction=heads.fg_bg_sampler.positive_fraction,
        score_thresh=heads.score_thresh,
        nms_thresh=heads.nms_thresh,
        detections_per_img=heads.detections_per_img,
    )
    roi_heads.box_coder = heads.box_coder
    rpn = like_torchvision(tv.rpn)
    pool_before_relu(getattr(tv.backbone, "body", tv.backbone))
    return RCNN(backbone=tv.backbone, rpn=rpn, roi_heads=roi_heads, transform=tv.transform)


def torchvision_to_everyseg_state(tv_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision MaskRCNN state dict's mask-branch keys to everyseg's layout."""
    renames = {
        "roi_heads.mask_head.": "roi_heads.mask_head.features.convs.",
        "roi_heads.mask_predictor.conv5_mask.": "roi_heads.mask_head.features.upsample.",
        "roi_heads.mask_predictor.mask_fcn_logits.": "roi_heads.mask_head.predictor.conv.",
    }
    out = {}
    for key, value in tv_state.items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out
