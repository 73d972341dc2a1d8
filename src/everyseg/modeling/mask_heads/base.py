"""The contract every mask head keeps: shared feature layers, a per-class predictor, own loss."""

from __future__ import annotations

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
        # labels index the conv's output channels directly: channel 0 is background in
        # torchvision's layout, kept so its weights load unchanged
        channel = torch.zeros_like(labels) if self.class_agnostic else labels
        return logits[torch.arange(logits.shape[0], device=logits.device), channel]


class MaskHead(nn.Module):
    """features: (R, C, S, S) RoI features -> (R, D, M, M); predictor: -> (R, M, M) logits."""

    def __init__(self, *, features: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.predictor = predictor

    def forward(self, roi_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(R, C, S, S), (R,) -> (R, M, M) mask logits of each RoI's class."""
        return self.predictor(self.features(roi_features), labels)

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
