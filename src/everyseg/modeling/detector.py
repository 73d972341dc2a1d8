"""build_model(cfg): Mask R-CNN from torchvision's parts plus everyseg's partial-mask RoI heads."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN, MaskRCNN_ResNet50_FPN_Weights
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from everyseg.config import Config, ConfigError, ModelConfig
from everyseg.modeling.backbone import resnet_fpn
from everyseg.modeling.fcos import FCOSWithMasks
from everyseg.modeling.mask_heads import (
    ClassConvPredictor,
    MaskHead,
    build_mask_head,
    build_mask_predictor,
)
from everyseg.modeling.mask_heads.fcn import FCNFeatures
from everyseg.modeling.roi_heads import PartialMaskRoIHeads
from everyseg.modeling.stages import apply_stage
from everyseg.modeling.weights import load_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FPN_LEVELS = ["0", "1", "2", "3"]


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
    config: Config, *, num_classes: int, class_names: Sequence[str] | None = None
) -> GeneralizedRCNN:
    """`num_classes` counts the background, as in torchvision (K foreground classes -> K + 1).

    `class_names` (K names) are needed by model.transfer.input=embedding and checked against
    model.init_from_run's.
    """
    cfg, data = config.model, config.data
    if cfg.detector not in ("rcnn", "fcos"):
        raise ConfigError(f"model.detector {cfg.detector!r}: choose rcnn or fcos")
    b = cfg.backbone
    backbone = resnet_fpn(
        name=b.name,
        weights=b.weights,
        trainable_layers=b.trainable_layers,
        norm=b.norm,
        fpn_channels=b.fpn_channels,
    )
    if cfg.detector == "fcos":
        return _build_fcos(config, backbone, num_classes)
    model = GeneralizedRCNN(
        backbone=backbone,
        rpn=_build_rpn(cfg, backbone.out_channels),
        roi_heads=_build_roi_heads(config, backbone.out_channels, num_classes, class_names),
        transform=MultiScaleTransform(
            train_sizes=data.min_size, test_size=data.test_min_size, max_size=data.max_size
        ),
    )
    if cfg.init is not None:
        load_torchvision_weights(model, cfg.init)
    apply_stage(
        model,
        stage=config.train.stage,
        init_from_run=cfg.init_from_run,
        class_names=class_names,
    )
    return model


def _build_fcos(config: Config, backbone: nn.Module, num_classes: int) -> FCOSWithMasks:
    cfg, data, bh, mh = config.model, config.data, config.model.box_head, config.model.mask_head
    if config.train.mask_rois != "gt" or config.train.stage != "end_to_end" or cfg.init:
        raise ConfigError(
            "model.detector=fcos trains end to end from scratch or ImageNet on ground-truth "
            "crops: it needs train.mask_rois=gt, train.stage=end_to_end and model.init=null"
        )
    if mh.predictor == "transfer":  # FCOS has no per-class box weights to transfer from
        raise ConfigError("model.detector=fcos: model.mask_head.predictor must be conv")
    model = FCOSWithMasks(
        backbone=backbone,
        num_classes=num_classes,
        anchor_generator=AnchorGenerator(
            sizes=tuple((s,) for s in cfg.rpn.anchor_sizes),
            aspect_ratios=((1.0,),) * len(cfg.rpn.anchor_sizes),
        ),
        score_thresh=bh.score_thresh,
        nms_thresh=bh.nms_thresh,
        detections_per_img=bh.detections_per_img,
        mask_roi_pool=MultiScaleRoIAlign(FPN_LEVELS, mh.pooler_resolution, sampling_ratio=2),
        mask_head=build_mask_head(
            mh,
            in_channels=backbone.out_channels,
            make_predictor=partial(
                build_mask_predictor, cfg, box_predictor=None, num_classes=num_classes
            ),
        ),
        mask_resolution=mh.mask_resolution,
        mask_roi_jitter=config.train.mask_roi_jitter,
    )
    model.transform = MultiScaleTransform(
        train_sizes=data.min_size, test_size=data.test_min_size, max_size=data.max_size
    )
    return model


def _build_rpn(cfg: ModelConfig, channels: int) -> RegionProposalNetwork:
    r = cfg.rpn
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in r.anchor_sizes),
        aspect_ratios=(tuple(r.aspect_ratios),) * len(r.anchor_sizes),
    )
    return RegionProposalNetwork(
        anchors,
        RPNHead(channels, anchors.num_anchors_per_location()[0]),
        r.fg_iou_thresh,
        r.bg_iou_thresh,
        r.batch_size_per_image,
        r.positive_fraction,
        dict(training=r.pre_nms_top_n_train, testing=r.pre_nms_top_n_test),
        dict(training=r.post_nms_top_n_train, testing=r.post_nms_top_n_test),
        r.nms_thresh,
    )


def _build_roi_heads(
    config: Config, channels: int, num_classes: int, class_names: Sequence[str] | None
) -> PartialMaskRoIHeads:
    cfg = config.model
    bh, mh = cfg.box_head, cfg.mask_head
    pool = bh.pooler_resolution
    box_head = TwoMLPHead(channels * pool**2, bh.representation_size)
    # weight transfer reads this very module's weights as they train
    box_predictor = FastRCNNPredictor(bh.representation_size, num_classes)
    make_predictor = partial(
        build_mask_predictor,
        cfg,
        box_predictor=box_predictor,
        num_classes=num_classes,
        class_names=class_names,
    )
    return PartialMaskRoIHeads(
        box_roi_pool=MultiScaleRoIAlign(FPN_LEVELS, pool, sampling_ratio=2),
        box_head=box_head,
        box_predictor=box_predictor,
        mask_roi_pool=MultiScaleRoIAlign(FPN_LEVELS, mh.pooler_resolution, sampling_ratio=2),
        mask_head=build_mask_head(mh, in_channels=channels, make_predictor=make_predictor),
        fg_iou_thresh=bh.fg_iou_thresh,
        bg_iou_thresh=bh.bg_iou_thresh,
        batch_size_per_image=bh.batch_size_per_image,
        positive_fraction=bh.positive_fraction,
        score_thresh=bh.score_thresh,
        nms_thresh=bh.nms_thresh,
        detections_per_img=bh.detections_per_img,
        mask_resolution=mh.mask_resolution,
        mask_rois=config.train.mask_rois,
        mask_roi_jitter=config.train.mask_roi_jitter,
    )


def from_torchvision(tv_model: MaskRCNN) -> GeneralizedRCNN:
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
        box_roi_pool=heads.box_roi_pool,
        box_head=heads.box_head,
        box_predictor=heads.box_predictor,
        mask_roi_pool=heads.mask_roi_pool,
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
    return GeneralizedRCNN(
        backbone=tv.backbone, rpn=tv.rpn, roi_heads=roi_heads, transform=tv.transform
    )


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


def load_torchvision_weights(model: nn.Module, source: str) -> None:
    """Initialise from torchvision's COCO Mask R-CNN ("torchvision-coco") or a local .pth.

    Tensors whose shape differs (the class-count-dependent predictors when fine-tuning on
    another label set) are skipped and named, so fine-tuning keeps everything else.
    """
    tv_state = load_state_dict(
        source,
        builtin_name="torchvision-coco",
        builtin=MaskRCNN_ResNet50_FPN_Weights.COCO_V1,
        config_key="model.init",
    )
    state = torchvision_to_everyseg_state(tv_state)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for key in mismatched:
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a transfer or fused predictor has no plain per-class conv to take torchvision's
    replaced = [k for k in unexpected if k.startswith("roi_heads.mask_head.predictor.")]
    unexpected = [k for k in unexpected if k not in replaced]
    if unexpected:
        raise ValueError(f"model.init {source}: keys everyseg does not have: {unexpected[:5]}")
    if mismatched:
        print(f"model.init: re-initialised (shape differs): {', '.join(mismatched)}")
    if missing:
        print(f"model.init: not in {source}, kept freshly initialised: {', '.join(missing)}")
    if replaced:
        print(f"model.init: unused, this model's mask predictor differs: {', '.join(replaced)}")
