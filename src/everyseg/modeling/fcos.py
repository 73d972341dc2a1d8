"""Deep-MAC's anchor-free variant: torchvision's FCOS plus everyseg's mask heads.

FCOS has no proposals, so the mask head trains on ground-truth crops only (train.mask_rois=gt)
and at test time reads the FPN features in the detected boxes, exactly as in the R-CNN model:
the same MaskHead, mask pooler and crop code (roi_heads.gt_mask_crops).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from everyseg.modeling.mask_heads import MaskHead
from everyseg.modeling.roi_heads import gt_mask_crops


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
        images, targets = self.transform(images, targets)
        features = self.backbone(images.tensors)  # {level: (B, C, H_l, W_l)}
        levels = list(features.values())
        head_outputs = self.head(levels)
        anchors = self.anchor_generator(images, levels)
        num_anchors_per_level = [x.size(2) * x.size(3) for x in levels]
        if self.training:
            losses = self.compute_loss(targets, head_outputs, anchors, num_anchors_per_level)
            losses["loss_mask"] = self._mask_loss(features, targets, images.image_sizes)
            return losses
        split_outputs = {
            k: list(v.split(num_anchors_per_level, dim=1)) for k, v in head_outputs.items()
        }
        split_anchors = [list(a.split(num_anchors_per_level)) for a in anchors]
        detections = self.postprocess_detections(split_outputs, split_anchors, images.image_sizes)
        self._add_masks(features, detections, images.image_sizes)
        return self.transform.postprocess(detections, images.image_sizes, original_sizes)

    def _mask_loss(self, features, targets, image_sizes) -> Tensor:
        crops = [gt_mask_crops(t, jitter=self.mask_roi_jitter) for t in targets]
        rois = [boxes for boxes, _ in crops]
        labels = [t["labels"][idxs] for t, (_, idxs) in zip(targets, crops)]
        mask_targets = [
            project_masks_on_boxes(t["masks"], boxes, idxs, self.mask_resolution)
            for t, (boxes, idxs) in zip(targets, crops)
        ]
        mask_features = self.mask_roi_pool(features, rois, image_sizes)  # (R, C, S, S)
        logits = self.mask_head(mask_features, torch.cat(labels))  # (R, M, M)
        return self.mask_head.loss(logits, torch.cat(mask_targets))

    def _add_masks(self, features, detections, image_sizes) -> None:
        boxes = [d["boxes"] for d in detections]
        mask_features = self.mask_roi_pool(features, boxes, image_sizes)
        labels = torch.cat([d["labels"] for d in detections])
        probs = self.mask_head.predict(mask_features, labels)  # (R, 1, M, M)
        for detection, masks in zip(detections, probs.split([len(b) for b in boxes])):
            detection["masks"] = masks
