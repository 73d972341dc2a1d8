"""Mask R-CNN from torchvision's parts (backbone, RPN, box head) plus everyseg's partial-mask
RoI heads. In eval mode it is torchvision's MaskRCNN, bit for bit (tests/test_model.py)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RPNHead

from everyseg.config import ModelConfig
from everyseg.modeling.backbone import FPN_LEVELS, C4Backbone
from everyseg.modeling.box_prompts import ImageFeatures, masks_for_box_prompts
from everyseg.modeling.c4 import c4_head_parts
from everyseg.modeling.mask_heads import build_mask_head, build_mask_predictor
from everyseg.modeling.paste import unpasted
from everyseg.modeling.poolers import build_roi_pooler
from everyseg.modeling.roi_heads import PartialMaskRoIHeads
from everyseg.modeling.rpn import CachedAnchorGenerator, ProposalNetwork


class RCNN(GeneralizedRCNN):
    """torchvision's GeneralizedRCNN (backbone, rpn, roi_heads, transform) that also
    segments given boxes."""

    def detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """The eval forward's detections with the masks left in their boxes; call in eval mode.

        Per (3, H, W) image: "boxes" (N, 4) xyxy in its pixels, "labels", "scores" and
        "box_masks" (N, 1, M, M), the foreground probabilities in each box that the forward
        pastes into its "masks" (N, 1, H, W) (see modeling/paste.py).
        """
        if self.training:
            raise RuntimeError("detect predicts: call model.eval() first")
        original_sizes = [(image.shape[-2], image.shape[-1]) for image in images]
        transformed, _ = self.transform(images)
        features = self.backbone(transformed.tensors)  # {level: (B, C, H_l, W_l)}
        proposals, _ = self.rpn(transformed, features)
        detections, _ = self.roi_heads(features, proposals, transformed.image_sizes)
        return unpasted(detections, transformed.image_sizes, original_sizes)

    def masks_for_boxes(
        self,
        images: list[Tensor] | ImageFeatures,
        boxes: list[Tensor],
        labels: list[Tensor] | None = None,
        *,
        paste: bool = True,
    ) -> list[dict[str, Tensor]]:
        """Masks for given boxes, whatever their class (Deep-MAC); call in eval mode.

        Per image: (3, H, W) float image, (N_i, 4) xyxy boxes in its pixels (clipped to it)
        and, optionally, (N_i,) labels in 1..K; without labels each box gets the box
        classifier's most likely foreground class on it. Returns per image "boxes",
        "labels", "scores" (the classifier's probability of that class) and "masks"
        (N_i, 1, H, W): for a detection's box and label, the masks eval-mode forward gives;
        with `paste=False`, "box_masks" (N_i, 1, M, M) in the boxes instead, as `detect`'s.
        `images` may be box_prompts.encode_images' ImageFeatures of them, computed once for
        many calls. Raises ValueError for bad boxes or labels (box_prompts.check_box_prompts).
        """
        if self.training:
            raise RuntimeError("masks_for_boxes predicts: call model.eval() first")
        return masks_for_box_prompts(
            transform=self.transform,
            backbone=self.backbone,
            images=images,
            boxes=boxes,
            labels=labels,
            num_classes=self.roi_heads.box_predictor.cls_score.out_features,
            paste=paste,
            segment=lambda images, features, rois, labels: self.roi_heads.segment_boxes(
                features, rois, images.image_sizes, labels
            ),
        )


def build_rcnn(
    cfg: ModelConfig,
    *,
    backbone: BackboneWithFPN | C4Backbone,
    num_classes: int,
    class_names: Sequence[str] | None,
    transform: nn.Module,
) -> RCNN:
    """Mask R-CNN as `model.rpn`, `model.box_head` and `model.mask_head` say, on an FPN or
    (model.backbone.fpn=false) a C4 backbone."""
    # the RPN first: modules draw their initial weights in this order
    rpn = _build_rpn(cfg, backbone.out_channels, one_level=isinstance(backbone, C4Backbone))
    if isinstance(backbone, C4Backbone):
        parts = c4_head_parts(
            cfg, backbone=backbone, num_classes=num_classes, class_names=class_names
        )
    else:
        parts = _fpn_head_parts(cfg, backbone.out_channels, num_classes, class_names)
    return RCNN(
        backbone=backbone, rpn=rpn, roi_heads=_build_roi_heads(cfg, parts), transform=transform
    )


def _build_rpn(cfg: ModelConfig, channels: int, *, one_level: bool) -> ProposalNetwork:
    r = cfg.rpn
    # one anchor size per FPN level, or all of them on C4's one map
    sizes = (tuple(r.anchor_sizes),) if one_level else tuple((s,) for s in r.anchor_sizes)
    anchors = CachedAnchorGenerator(sizes, (tuple(r.aspect_ratios),) * len(sizes))
    return ProposalNetwork(
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


def _fpn_head_parts(
    cfg: ModelConfig, channels: int, num_classes: int, class_names: Sequence[str] | None
) -> dict[str, Any]:
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
    pooler = partial(build_roi_pooler, cfg.roi_pool, featmap_names=FPN_LEVELS)
    return dict(
        box_roi_pool=pooler(output_size=pool),
        box_head=box_head,
        box_predictor=box_predictor,
        mask_roi_pool=pooler(output_size=mh.pooler_resolution),
        mask_head=build_mask_head(mh, in_channels=channels, make_predictor=make_predictor),
        mask_resolution=mh.mask_resolution,
    )


def _build_roi_heads(cfg: ModelConfig, parts: dict[str, Any]) -> PartialMaskRoIHeads:
    """The RoI heads of `parts` (poolers, heads, predictors, mask_resolution) with the
    sampling and post-processing settings of `model.box_head` and `model.mask_head`."""
    bh, mh = cfg.box_head, cfg.mask_head
    return PartialMaskRoIHeads(
        **parts,
        fg_iou_thresh=bh.fg_iou_thresh,
        bg_iou_thresh=bh.bg_iou_thresh,
        batch_size_per_image=bh.batch_size_per_image,
        positive_fraction=bh.positive_fraction,
        score_thresh=bh.score_thresh,
        nms_thresh=bh.nms_thresh,
        detections_per_img=bh.detections_per_img,
        mask_rois=mh.train_rois,
        mask_roi_jitter=mh.roi_jitter,
    )
