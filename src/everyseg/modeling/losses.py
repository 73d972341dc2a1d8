"""Loss functions. Pure: partial supervision reaches them as data, never as flags or globals."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel sigmoid BCE of the ground-truth class's mask (Mask R-CNN's L_mask).

    logits:  (R, M, M) logits of each RoI's ground-truth class (or the agnostic channel)
    targets: (R, M, M) in [0, 1], the matched instance's mask cropped to the RoI
    Only RoIs whose matched instance has a mask may be passed. With R == 0 the result is a zero
    that keeps the graph, so every mask-head parameter still receives a (zero) gradient.
    """
    if logits.numel() == 0:
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


def mask_softmax_loss(
    logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean per-pixel multinomial loss over all classes' masks (Mask R-CNN's softmax ablation).

    logits:  (R, K + 1, M, M) every class's mask logits, channel 0 the background
    targets: (R, M, M) in [0, 1], the matched instance's mask cropped to the RoI
    labels:  (R,) the matched instances' classes in 1..K
    A pixel's target distribution puts `targets` on its RoI's class and the rest on the
    background (FCN's per-pixel softmax with one-hot targets when the mask is binary). Only RoIs
    whose matched instance has a mask may be passed; R == 0 gives a zero that keeps the graph.
    """
    if logits.numel() == 0:
        return logits.sum() * 0.0
    log_probs = logits.log_softmax(dim=1)  # (R, K + 1, M, M)
    class_log_probs = log_probs[torch.arange(len(labels), device=labels.device), labels]
    targets = targets.to(logits.dtype)
    return -(targets * class_log_probs + (1 - targets) * log_probs[:, 0]).mean()
