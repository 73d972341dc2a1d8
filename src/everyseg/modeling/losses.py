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
