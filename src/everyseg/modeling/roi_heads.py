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


class PartialMaskRoIHeads(RoIHeads):
    """torchvision's RoIHeads with a mask branch that respects partial supervision.

    `mask_head` is an everyseg MaskHead (it owns its loss and inference); the parent's
    `mask_predictor` stays None, so torchvision's own mask code path never runs.
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
    ) -> None:
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
        """Positive proposals whose matched instance has a mask.

        Returns per-image RoI boxes [(R_i, 4)], their ground-truth labels (R,) and mask
        targets (R, M, M) cut from the matched instances' masks.
        """
        resolution = self.mask_roi_pool.output_size[0] * 2
        rois, roi_labels, mask_targets = [], [], []
        for boxes, idxs, image_labels, target in zip(proposals, matched_idxs, labels, targets):
            has_mask = target["has_mask"]
            if has_mask.numel() == 0:  # no ground truth: every RoI is background
                keep = idxs.new_zeros(0)
            else:
                keep = torch.where((image_labels > 0) & has_mask[idxs])[0]
            rois.append(boxes[keep])
            roi_labels.append(image_labels[keep])
            mask_targets.append(
                project_masks_on_boxes(target["masks"], boxes[keep], idxs[keep], resolution)
            )
        return rois, torch.cat(roi_labels), torch.cat(mask_targets)

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
