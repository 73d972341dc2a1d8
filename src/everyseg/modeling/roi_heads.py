"""RoI heads whose mask branch is driven by each instance's `has_mask`.

The box branch is torchvision's, untouched: every class trains it. The mask branch only ever
sees RoIs whose matched ground-truth instance carries a mask, so box-only instances cost
nothing there and never pull masks towards background.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    fastrcnn_loss,
    project_masks_on_boxes,
)

from everyseg.modeling.mask_heads import MaskHead

MASK_ROIS = ("proposals", "gt", "both")


class PartialMaskRoIHeads(RoIHeads):
    """torchvision's RoIHeads with a mask branch that respects partial supervision.

    `mask_head` is an everyseg MaskHead (it owns its loss and inference); the parent's
    `mask_predictor` stays None, so torchvision's own mask code path never runs.
    `mask_resolution` is the side M of its masks (None: twice the mask pooler's);
    `mask_rois` says which boxes it trains on (see TrainConfig.mask_rois).
    """

    def __init__(
        self,
        *,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        mask_roi_pool: nn.Module,
        mask_head: MaskHead,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        mask_resolution: int | None = None,
        mask_rois: str = "proposals",
        mask_roi_jitter: float = 0.0,
    ) -> None:
        if mask_rois not in MASK_ROIS:
            raise ValueError(f"train.mask_rois {mask_rois!r}: choose one of {', '.join(MASK_ROIS)}")
        super().__init__(
            box_roi_pool,
            box_head,
            box_predictor,
            fg_iou_thresh,
            bg_iou_thresh,
            batch_size_per_image,
            positive_fraction,
            None,  # bbox_reg_weights: torchvision's default (10, 10, 5, 5)
            score_thresh,
            nms_thresh,
            detections_per_img,
        )
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.mask_resolution = mask_resolution or 2 * mask_roi_pool.output_size[0]
        self.mask_rois = mask_rois
        self.mask_roi_jitter = mask_roi_jitter

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            return [], self._training_losses(features, proposals, image_shapes, targets)
        return self._inference(features, proposals, image_shapes), {}

    def _training_losses(self, features, proposals, image_shapes, targets) -> dict[str, Tensor]:
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
            proposals, targets
        )
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(
            class_logits, box_regression, labels, regression_targets
        )
        rois, roi_labels, mask_targets = self._mask_training_rois(
            proposals, matched_idxs, labels, targets
        )
        mask_features = self.mask_roi_pool(features, rois, image_shapes)  # (R, C, S, S)
        logits = self.mask_head(mask_features, roi_labels)  # (R, M, M)
        return {
            "loss_classifier": loss_classifier,
            "loss_box_reg": loss_box_reg,
            "loss_mask": self.mask_head.loss(logits, mask_targets),
        }

    def _mask_training_rois(
        self,
        proposals: list[Tensor],
        matched_idxs: list[Tensor],
        labels: list[Tensor],
        targets: list[dict[str, Tensor]],
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """The mask head's training crops, as `self.mask_rois` says, of instances with a mask.

        Returns per-image RoI boxes [(R_i, 4)], their ground-truth labels (R,) and mask
        targets (R, M, M) cut from the matched instances' masks.
        """
        rois, roi_labels, mask_targets = [], [], []
        for boxes, idxs, image_labels, target in zip(proposals, matched_idxs, labels, targets):
            boxes, idxs = self._crops(boxes, idxs, image_labels, target)
            rois.append(boxes)
            roi_labels.append(target["labels"][idxs])
            mask_targets.append(
                project_masks_on_boxes(target["masks"], boxes, idxs, self.mask_resolution)
            )
        return rois, torch.cat(roi_labels), torch.cat(mask_targets)

    def _crops(self, boxes, idxs, image_labels, target) -> tuple[Tensor, Tensor]:
        """One image's (R, 4) crop boxes and (R,) indices of the instances they cut masks from."""
        has_mask = target["has_mask"]
        crops, crop_idxs = [], []
        if self.mask_rois in ("proposals", "both") and has_mask.numel() > 0:
            # with no ground truth every proposal is background and idxs are all clamped to 0
            keep = torch.where((image_labels > 0) & has_mask[idxs])[0]
            crops.append(boxes[keep])
            crop_idxs.append(idxs[keep])
        if self.mask_rois in ("gt", "both"):
            gt_boxes, gt_idxs = gt_mask_crops(target, jitter=self.mask_roi_jitter)
            crops.append(gt_boxes)
            crop_idxs.append(gt_idxs)
        if not crops:
            return boxes.new_zeros(0, 4), idxs.new_zeros(0)
        return torch.cat(crops), torch.cat(crop_idxs)

    def _inference(self, features, proposals, image_shapes) -> list[dict[str, Tensor]]:
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        boxes, scores, labels = self.postprocess_detections(
            class_logits, box_regression, proposals, image_shapes
        )
        mask_features = self.mask_roi_pool(features, boxes, image_shapes)
        probs = self.mask_head.predict(mask_features, torch.cat(labels))  # (R, 1, M, M)
        per_image = probs.split([len(b) for b in boxes])
        return [
            {"boxes": b, "labels": lab, "scores": s, "masks": m}
            for b, lab, s, m in zip(boxes, labels, scores, per_image)
        ]


def gt_mask_crops(target: dict[str, Tensor], *, jitter: float = 0.0) -> tuple[Tensor, Tensor]:
    """One image's ground-truth boxes (R, 4) of instances with a mask, and their indices (R,)."""
    keep = torch.where(target["has_mask"])[0]
    return jitter_boxes(target["boxes"][keep], jitter=jitter), keep


def jitter_boxes(boxes: Tensor, *, jitter: float) -> Tensor:
    """(N, 4) xyxy -> each side moved by up to `jitter` x the box's width/height.

    Deep-MAC's small jitter keeps the head from relying on crops that fit exactly, as
    detections at test time never do.
    """
    if jitter == 0 or boxes.numel() == 0:
        return boxes
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    jittered = boxes + (torch.rand_like(boxes) * 2 - 1) * jitter * size
    # a jittered box never collapses: keep x1 > x0 and y1 > y0
    jittered[:, 2:] = torch.maximum(jittered[:, 2:], jittered[:, :2] + 1)
    return jittered
