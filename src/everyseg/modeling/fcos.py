"""Deep-MAC's anchor-free variant: torchvision's FCOS plus everyseg's mask heads.

FCOS has no proposals, so the mask head trains on ground-truth crops only
(model.mask_head.train_rois=gt) and at test time reads the FPN features in the detected
boxes, exactly as in the R-CNN model: the same MaskHead, mask pooler and mask-branch glue
(mask_branch.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOS

from everyseg.config import ConfigError, ModelConfig
from everyseg.modeling.backbone import FPN_LEVELS
from everyseg.modeling.box_prompts import ImageFeatures, masks_for_box_prompts
from everyseg.modeling.mask_branch import gt_mask_crops, mask_probabilities, mask_training_loss
from everyseg.modeling.mask_heads import MaskHead, build_mask_head, build_mask_predictor
from everyseg.modeling.paste import unpasted
from everyseg.modeling.poolers import build_roi_pooler


class FCOSWithMasks(FCOS):
    """torchvision's FCOS whose detections also carry masks: "masks" (N, 1, H, W) in eval,
    "loss_mask" among the losses in training. `mask_resolution` is the head's M."""

    def __init__(
        self,
        *,
        mask_roi_pool: nn.Module,
        mask_head: MaskHead,
        mask_resolution: int,
        mask_roi_jitter: float = 0.0,
        **fcos_kwargs,
    ) -> None:
        super().__init__(**fcos_kwargs)
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.mask_resolution = mask_resolution
        self.mask_roi_jitter = mask_roi_jitter

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)  # {level: (B, C, H_l, W_l)}
        levels = list(features.values())
        head_outputs = self.head(levels)
        anchors = self.anchor_generator(image_list, levels)
        num_anchors_per_level = [x.size(2) * x.size(3) for x in levels]
        if self.training:
            losses = self.compute_loss(targets, head_outputs, anchors, num_anchors_per_level)
            losses["loss_mask"] = mask_training_loss(
                roi_pool=self.mask_roi_pool,
                head=self.mask_head,
                features=features,
                crops=[gt_mask_crops(t, jitter=self.mask_roi_jitter) for t in targets],
                targets=targets,
                image_shapes=image_list.image_sizes,
                resolution=self.mask_resolution,
            )
            return losses
        detections = self._detections(features, head_outputs, anchors, image_list.image_sizes)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    def detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """The eval forward's detections with the masks left in their boxes; call in eval mode.

        Per (3, H, W) image: "boxes" (N, 4) xyxy in its pixels, "labels", "scores" and
        "box_masks" (N, 1, M, M), the foreground probabilities in each box that the forward
        pastes into its "masks" (N, 1, H, W) (see modeling/paste.py).
        """
        if self.training:
            raise RuntimeError("detect predicts: call model.eval() first")
        original_sizes = [(image.shape[-2], image.shape[-1]) for image in images]
        image_list, _ = self.transform(images)
        features = self.backbone(image_list.tensors)  # {level: (B, C, H_l, W_l)}
        levels = list(features.values())
        anchors = self.anchor_generator(image_list, levels)
        detections = self._detections(features, self.head(levels), anchors, image_list.image_sizes)
        return unpasted(detections, image_list.image_sizes, original_sizes)

    def _detections(self, features, head_outputs, anchors, image_sizes):
        """Per image "boxes", "labels", "scores" in the transformed image's pixels and
        "masks" (N, 1, M, M) in the boxes."""
        num_anchors_per_level = [x.size(2) * x.size(3) for x in features.values()]
        split_outputs = {
            k: list(v.split(num_anchors_per_level, dim=1)) for k, v in head_outputs.items()
        }
        split_anchors = [list(a.split(num_anchors_per_level)) for a in anchors]
        detections = self.postprocess_detections(split_outputs, split_anchors, image_sizes)
        masks = self._masks(
            features,
            boxes=[d["boxes"] for d in detections],
            labels=[d["labels"] for d in detections],
            image_sizes=image_sizes,
        )
        for detection, image_masks in zip(detections, masks):
            detection["masks"] = image_masks
        return detections

    def masks_for_boxes(
        self,
        images: list[Tensor] | ImageFeatures,
        boxes: list[Tensor],
        labels: list[Tensor] | None = None,
        *,
        paste: bool = True,
    ) -> list[dict[str, Tensor]]:
        """Masks for given boxes, whatever their class; call in eval mode.

        Per image: (3, H, W) float image, (N_i, 4) xyxy boxes in its pixels (clipped to it)
        and, optionally, (N_i,) labels in 1..K. Without labels each box gets the class FCOS
        scores highest at the feature locations inside it (the nearest one if none is);
        "scores" are FCOS's score of the box's class there, sqrt(class x centerness) as in
        its detections. Returns per image "boxes", "labels", "scores", "masks" (N_i, 1, H, W),
        or with `paste=False` "box_masks" (N_i, 1, M, M) in the boxes instead, as `detect`'s.
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
            num_classes=self.head.classification_head.num_classes,
            paste=paste,
            segment=self._segment_boxes,
        )

    def _segment_boxes(self, images, features, boxes, labels) -> list[dict[str, Tensor]]:
        levels = list(features.values())
        head_outputs = self.head(levels)
        anchors = self.anchor_generator(images, levels)
        class_scores = [
            _box_class_scores(head_outputs, i, anchors[i], b) for i, b in enumerate(boxes)
        ]  # (N_i, K + 1) per image
        if labels is None:
            labels = [s[:, 1:].argmax(-1) + 1 for s in class_scores]
        scores = [s[torch.arange(len(lab)), lab] for s, lab in zip(class_scores, labels)]
        masks = self._masks(features, boxes=boxes, labels=labels, image_sizes=images.image_sizes)
        return [
            {"boxes": b, "labels": lab, "scores": s, "masks": m}
            for b, lab, s, m in zip(boxes, labels, scores, masks)
        ]

    def _masks(self, features, *, boxes, labels, image_sizes) -> list[Tensor]:
        """Per image (N_i, 4) boxes, (N_i,) labels -> (N_i, 1, M, M) mask probabilities."""
        return mask_probabilities(
            roi_pool=self.mask_roi_pool,
            head=self.mask_head,
            features=features,
            boxes=boxes,
            labels=labels,
            image_shapes=image_sizes,
        )


def _box_class_scores(head_outputs, index: int, anchors: Tensor, boxes: Tensor) -> Tensor:
    """Image `index`'s (N, 4) boxes -> (N, K + 1): per class, FCOS's best score at the
    locations (anchor centres, all levels) inside each box, or at the one nearest its centre."""
    scores = torch.sqrt(
        head_outputs["cls_logits"][index].sigmoid() * head_outputs["bbox_ctrness"][index].sigmoid()
    )  # (L, K + 1)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # (L, 2)
    inside = ((centres >= boxes[:, None, :2]) & (centres <= boxes[:, None, 2:])).all(-1)  # (N, L)
    nearest = torch.cdist((boxes[:, :2] + boxes[:, 2:]) / 2, centres).argmin(1)  # (N,)
    inside[torch.arange(len(boxes)), nearest] = True
    if len(boxes) == 0:
        return scores.new_zeros(0, scores.shape[1])
    return torch.stack([scores[where].amax(0) for where in inside])


def build_fcos(
    cfg: ModelConfig,
    *,
    backbone: BackboneWithFPN,
    num_classes: int,
    class_names: Sequence[str] | None,
    transform: nn.Module,
) -> FCOSWithMasks:
    """FCOS as `model.fcos` says, with `model.mask_head` trained on ground-truth crops."""
    f, mh = cfg.fcos, cfg.mask_head
    if mh.train_rois != "gt":
        raise ConfigError(
            "model.detector=fcos has no proposals: its mask head trains on ground-truth crops, "
            f"set model.mask_head.train_rois=gt (got {mh.train_rois!r})"
        )
    if mh.predictor == "transfer":  # FCOS has no per-class box weights to transfer from
        raise ConfigError("model.detector=fcos: model.mask_head.predictor must be conv")
    model = FCOSWithMasks(
        backbone=backbone,
        num_classes=num_classes,
        anchor_generator=AnchorGenerator(
            sizes=tuple((s,) for s in f.anchor_sizes),
            aspect_ratios=((1.0,),) * len(f.anchor_sizes),
        ),
        score_thresh=f.score_thresh,
        nms_thresh=f.nms_thresh,
        detections_per_img=f.detections_per_img,
        mask_roi_pool=build_roi_pooler(
            "align", featmap_names=FPN_LEVELS, output_size=mh.pooler_resolution
        ),
        mask_head=build_mask_head(
            mh,
            in_channels=backbone.out_channels,
            make_predictor=partial(
                build_mask_predictor,
                cfg,
                box_predictor=None,
                num_classes=num_classes,
                class_names=class_names,
            ),
        ),
        mask_resolution=mh.mask_resolution,
        mask_roi_jitter=mh.roi_jitter,
    )
    model.transform = transform
    return model
