"""The contract every mask head keeps: shared feature layers, a per-class predictor, own loss."""

from __future__ import annotations

import math

import torch
from torch import nn

from everyseg.modeling.losses import mask_bce_loss, mask_softmax_loss


class ClassConvPredictor(nn.Module):
    """The final 1x1 conv of Mask R-CNN: one M x M logit map per class (or one, class-agnostic).

    Weight transfer (Mask^X) swaps exactly this module for one that predicts the conv's weights.
    """

    def __init__(self, *, in_channels: int, num_classes: int, class_agnostic: bool) -> None:
        super().__init__()
        self.class_agnostic = class_agnostic
        self.conv = nn.Conv2d(in_channels, 1 if class_agnostic else num_classes, kernel_size=1)
        # small logits at the start (detectron2's choice): torchvision's Kaiming init starts
        # the mask loss near 7 and destabilises training from scratch
        nn.init.normal_(self.conv.weight, std=0.001)
        assert self.conv.bias is not None  # Conv2d has one unless told bias=False
        nn.init.zeros_(self.conv.bias)

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(R, D, M, M) features -> (R, K + 1 or 1, M, M) logits of every class."""
        return self.conv(x)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(R, D, M, M) features, (R,) labels in 1..K -> (R, M, M) logits of each RoI's class."""
        logits = self.class_logits(x)  # (R, K + 1 or 1, M, M)
        return logits[torch.arange(logits.shape[0], device=logits.device), self._channel(labels)]

    def picked_rows(self, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(R, P, D) features of P pixels a RoI (any order), (R,) labels -> (R, P) logits of
        each RoI's class alone: forward's, without the other classes' maps."""
        channel = self._channel(labels)
        weight = self.conv.weight[channel, :, 0, 0]  # (R, D)
        logits = torch.bmm(rows, weight[:, :, None])[..., 0]  # (R, P)
        if self.conv.bias is not None:
            logits = logits + self.conv.bias[channel][:, None]
        return logits

    def _channel(self, labels: torch.Tensor) -> torch.Tensor:
        # labels index the conv's output channels directly: channel 0 is background in
        # torchvision's layout, kept so its weights load unchanged
        return torch.zeros_like(labels) if self.class_agnostic else labels


class SubpixelFeatures(nn.Module):
    """Features ending in a 2 x 2 stride-2 deconv, which can also be read before its output
    is shuffled into image order (`subpixel_rows`): each output pixel is one matrix product
    of its input pixel, and on a CPU that shuffle (a copy of the largest maps of the head,
    forward and backward) and oneDNN's deconv cost more than the products themselves."""

    def subpixel_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, S, S) -> (R, 4 S S, D): forward's features, output pixel (2i + a, 2j + b)
        at row 4 (S i + j) + 2 a + b."""
        raise NotImplementedError

    @staticmethod
    def to_image(values: torch.Tensor) -> torch.Tensor:
        """(R, 4 S S) values in subpixel_rows' order -> (R, 2S, 2S) in image order."""
        num_rois, side = len(values), math.isqrt(values.shape[1] // 4)
        pixels = values.view(num_rois, side, side, 2, 2).permute(0, 1, 3, 2, 4)  # i a j b
        return pixels.reshape(num_rois, 2 * side, 2 * side)


class MaskHead(nn.Module):
    """features: (R, C, S, S) RoI features -> (R, D, M, M); predictor: -> (R, M, M) logits."""

    def __init__(self, *, features: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.predictor = predictor

    def forward(self, roi_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(R, C, S, S), (R,) -> (R, M, M) mask logits of each RoI's class."""
        features, predictor = self.features, self.predictor
        if (
            self.training
            and isinstance(features, SubpixelFeatures)
            and isinstance(predictor, ClassConvPredictor)
            and roi_features.device.type == "cpu"
        ):  # training on a CPU: the head in 0.85x the time, equal within float rounding (in
            # eval mode the plain path keeps predictions bit-equal to torchvision's)
            rows = features.subpixel_rows(roi_features)  # (R, 4 S S, D)
            return features.to_image(predictor.picked_rows(rows, labels))
        return predictor(features(roi_features), labels)

    def loss(
        self, logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """forward's logits, (R, M, M) targets of RoIs with a mask (of classes `labels` (R,),
        which forward has already picked) -> scalar."""
        return mask_bce_loss(logits, targets)

    def predict(self, roi_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(R, C, S, S), (R,) predicted labels -> (R, 1, M, M) foreground probabilities."""
        return self(roi_features, labels).sigmoid()[:, None]


class SoftmaxMaskHead(MaskHead):
    """Mask R-CNN's softmax ablation: every class's mask logits compete in a per-pixel softmax
    (channel 0 the background) instead of each RoI's class alone in a sigmoid. The predictor
    must be a per-class ClassConvPredictor (`class_logits`)."""

    predictor: ClassConvPredictor

    def __init__(self, *, features: nn.Module, predictor: ClassConvPredictor) -> None:
        if predictor.class_agnostic:
            raise ValueError("a softmax across classes needs one mask per class")
        super().__init__(features=features, predictor=predictor)

    def forward(self, roi_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(R, C, S, S), (R,) -> (R, K + 1, M, M) mask logits of every class."""
        return self.predictor.class_logits(self.features(roi_features))

    def loss(
        self, logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(R, K + 1, M, M) logits, (R, M, M) targets, (R,) their classes -> scalar."""
        if labels is None:
            raise ValueError("the softmax mask loss needs each RoI's class (labels)")
        return mask_softmax_loss(logits, targets, labels)

    def predict(self, roi_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(R, C, S, S), (R,) predicted labels -> (R, 1, M, M) that class's softmax
        probability at each pixel."""
        probs = self(roi_features, labels).softmax(dim=1)  # (R, K + 1, M, M)
        return probs[torch.arange(len(labels), device=labels.device), labels][:, None]
