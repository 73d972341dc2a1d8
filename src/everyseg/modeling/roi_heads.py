"""RoI heads whose mask branch is driven by each instance's `has_mask`.

The box branch is torchvision's, untouched: every class trains it. The mask branch only ever
sees RoIs whose matched ground-truth instance carries a mask, so box-only instances cost
nothing there and never pull masks towards background.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.ops import MultiScaleRoIAlign

from everyseg.modeling.c4 import C4RoIFeatures
from everyseg.modeling.keypoint_head import KeypointBranch
from everyseg.modeling.mask_branch import (
    MASK_ROIS,
    gt_mask_crops,
    mask_probabilities,
    mask_training_loss,
)
from everyseg.modeling.mask_heads import MaskHead


class PartialMaskRoIHeads(RoIHeads):
    """torchvision's RoIHeads with a mask branch that respects partial supervision.

    `mask_head` is an everyseg MaskHead (it owns its loss and inference); the parent's
    `mask_predictor` stays None, so torchvision's own mask code path never runs.
    `mask_resolution` is the side M of its masks (None: twice the mask pooler's);
    `mask_rois` says which boxes it trains on (see MaskHeadConfig.train_rois) and
    `mask_roi_jitter` how far ground-truth crops are jittered. `keypoint_branch` (None: no
    keypoints) trains on RoIs of instances with keypoints and adds "keypoints" (N, K, 3) and
    "keypoints_scores" (N, K) to detections, as torchvision's KeypointRCNN does.
    """

    def __init__(
        self,
        *,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        mask_roi_pool: MultiScaleRoIAlign | C4RoIFeatures,
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
        keypoint_branch: KeypointBranch | None = None,
    ) -> None:
        if mask_rois not in MASK_ROIS:
            raise ValueError(
                f"model.mask_head.train_rois {mask_rois!r}: choose one of {', '.join(MASK_ROIS)}"
            )
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
        self.mask_resolution: int = mask_resolution or 2 * mask_roi_pool.output_size[0]
        self.mask_rois = mask_rois
        self.mask_roi_jitter = mask_roi_jitter
        self.keypoint_branch = keypoint_branch

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
        crops = [
            self._crops(boxes, idxs, image_labels, target)
            for boxes, idxs, image_labels, target in zip(proposals, matched_idxs, labels, targets)
        ]
        loss_mask = mask_training_loss(
            roi_pool=self.mask_roi_pool,
            head=self.mask_head,
            features=features,
            crops=crops,
            targets=targets,
            image_shapes=image_shapes,
            resolution=self.mask_resolution,
        )
        losses = {
            "loss_classifier": loss_classifier,
            "loss_box_reg": loss_box_reg,
            "loss_mask": loss_mask,
        }
        if self.keypoint_branch is not None:
            losses["loss_keypoint"] = self.keypoint_branch.training_loss(
                features, proposals, matched_idxs, labels, targets, image_shapes
            )
        return losses

    def _crops(self, boxes, idxs, image_labels, target) -> tuple[Tensor, Tensor]:
        """One image's mask training crops, as `self.mask_rois` says, of instances with a mask:
        (R, 4) boxes and (R,) indices of the instances they cut masks from."""
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
        detections = self._with_masks(features, boxes, scores, labels, image_shapes)
        if self.keypoint_branch is not None:
            keypoints, keypoint_scores = self.keypoint_branch.predict(features, boxes, image_shapes)
            for detection, points, point_scores in zip(detections, keypoints, keypoint_scores):
                detection["keypoints"], detection["keypoints_scores"] = points, point_scores
        return detections

    def segment_boxes(
        self,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
        labels: list[Tensor] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Masks for given per-image (N_i, 4) boxes (the transformed images' pixels), each
        of class `labels` (N_i,) or, without them, the box classifier's most likely
        foreground class on it. Returns per image "boxes", "labels", "scores" (the
        classifier's probability of that class) and "masks" (N_i, 1, M, M)."""
        box_features = self.box_head(self.box_roi_pool(features, boxes, image_shapes))
        class_logits, _ = self.box_predictor(box_features)
        class_probs = class_logits.softmax(-1).split([len(b) for b in boxes])  # (N_i, K + 1)
        if labels is None:
            labels = [p[:, 1:].argmax(-1) + 1 for p in class_probs]
        scores = [p[torch.arange(len(lab)), lab] for p, lab in zip(class_probs, labels)]
        return self._with_masks(features, boxes, scores, labels, image_shapes)

    def _with_masks(self, features, boxes, scores, labels, image_shapes):
        masks = mask_probabilities(
            roi_pool=self.mask_roi_pool,
            head=self.mask_head,
            features=features,
            boxes=boxes,
            labels=labels,
            image_shapes=image_shapes,
        )
        return [
            {"boxes": b, "labels": lab, "scores": s, "masks": m}
            for b, lab, s, m in zip(boxes, labels, scores, masks)
        ]
