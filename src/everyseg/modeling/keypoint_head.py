"""Mask R-CNN's keypoint branch with partial supervision: torchvision's keypoint parts, trained
only on RoIs whose matched instance has keypoints (`has_keypoints`).

A keypoint is a one-hot m x m mask: the head predicts K heatmaps per RoI and the loss is a
softmax cross-entropy over the m^2 positions of each labelled keypoint (torchvision's
keypointrcnn_loss). The heatmaps are class-agnostic: every keypoint class shares the K
channels of the model's keypoint list (data/keypoints.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.roi_heads import keypointrcnn_inference, keypointrcnn_loss

from everyseg.config import KeypointHeadConfig
from everyseg.modeling.poolers import build_roi_pooler


def keypoint_loss(logits: Tensor, rois: Tensor, keypoints: Tensor) -> Tensor:
    """Softmax cross-entropy of (R, K, m, m) heatmap logits against (R, K, 3) x, y, v
    keypoints of the instances matched to the (R, 4) RoIs, which must all have keypoints.

    Keypoints that are unlabelled (v=0) or outside their RoI do not count. With none to
    count (R = 0 included) the loss is a zero that keeps the graph, so every parameter
    still gets a (zero) gradient.
    """
    matched = torch.arange(len(rois), device=rois.device)
    # torchvision's loss views the logits flat, which a channels-last layout (training on a
    # CPU, engine/train.py's training_layout) does not allow
    return keypointrcnn_loss(logits.contiguous(), [rois], [keypoints], [matched])


class KeypointBranch(nn.Module):
    """RoI pooling -> KeypointRCNNHeads -> KeypointRCNNPredictor: (R, K, 4S, 4S) logits for
    RoIs in the transformed images' pixels (S: the pooler's resolution)."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_keypoints: int,
        num_convs: int,
        channels: int,
        pooler_resolution: int,
        featmap_names: Sequence[str],
    ) -> None:
        super().__init__()
        self.roi_pool = build_roi_pooler(
            "align", featmap_names=featmap_names, output_size=pooler_resolution
        )
        self.head = KeypointRCNNHeads(in_channels, [channels] * num_convs)
        self.predictor = KeypointRCNNPredictor(channels, num_keypoints)

    def forward(
        self, features: dict[str, Tensor], rois: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        pooled = self.roi_pool(features, rois, image_shapes)  # (R, C, S, S)
        return self.predictor(self.head(pooled))  # (R, K, 4S, 4S)

    def training_loss(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        matched_idxs: list[Tensor],
        labels: list[Tensor],
        targets: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """The loss on the positive proposals matched to instances with keypoints: targets
        need `keypoints` (N, K, 3) and `has_keypoints` (N,)."""
        rois, keypoints = [], []
        for boxes, idxs, image_labels, target in zip(proposals, matched_idxs, labels, targets):
            has = target["has_keypoints"]
            if has.numel() == 0:  # no ground truth: every proposal is background
                continue
            keep = torch.where((image_labels > 0) & has[idxs])[0]
            rois.append(boxes[keep])
            keypoints.append(target["keypoints"][idxs[keep]])
        if not rois:
            rois = [proposals[0].new_zeros(0, 4)]
            keypoints = [proposals[0].new_zeros(0, self.predictor.kps_score_lowres.out_channels, 3)]
        logits = self(features, rois, image_shapes)
        return keypoint_loss(logits, torch.cat(rois), torch.cat(keypoints))

    def predict(
        self,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image (N_i, 4) boxes -> (N_i, K, 3) keypoints x, y, 1 in the transformed
        image's pixels and (N_i, K) their heatmap scores (torchvision's
        keypointrcnn_inference)."""
        logits = self(features, boxes, image_shapes).float()
        if logits.numel() == 0:  # heatmaps_to_keypoints cannot take zero boxes
            num = logits.shape[1]
            return [b.new_zeros(len(b), num, 3) for b in boxes], [
                b.new_zeros(len(b), num) for b in boxes
            ]
        return keypointrcnn_inference(logits, boxes)


def build_keypoint_branch(
    cfg: KeypointHeadConfig, *, in_channels: int, num_keypoints: int, featmap_names
) -> KeypointBranch:
    return KeypointBranch(
        in_channels=in_channels,
        num_keypoints=num_keypoints,
        num_convs=cfg.num_convs,
        channels=cfg.channels,
        pooler_resolution=cfg.pooler_resolution,
        featmap_names=featmap_names,
    )
