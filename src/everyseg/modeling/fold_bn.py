"""Frozen batch norms folded into the convolutions before them, for inference.

A FrozenBatchNorm2d is a fixed per-channel affine map, y = x * scale + shift; after a
convolution it can be absorbed into the convolution's weights and bias, which saves a full
pass over every ResNet activation (on a CPU, ~10 % of an R-50-FPN forward). The outputs are
the same up to float rounding (tests/test_fold_bn.py). The folded model has different state
dict keys (no bn buffers, conv biases), so fold only a model that is loaded for inference,
never one that is trained or saved.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

# in a torchvision ResNet stem or bottleneck, each of these norms follows the conv beside it
_CONV_OF_NORM = {"bn1": "conv1", "bn2": "conv2", "bn3": "conv3"}


@torch.no_grad()
def fold_frozen_batchnorm(model: nn.Module) -> int:
    """Fold every FrozenBatchNorm2d that follows a Conv2d (a ResNet's stem, bottlenecks
    and downsamples: `convK`/`bnK` pairs and (conv, norm) Sequentials) into that Conv2d,
    leaving nn.Identity in its place. Returns how many were folded."""
    pairs: list[tuple[object, nn.Module, str]] = []  # (conv?, parent, name of its norm)
    for parent in model.modules():
        if isinstance(parent, nn.Sequential) and len(parent) == 2:
            pairs.append((parent[0], parent, "1"))
        pairs += [(getattr(parent, c, None), parent, n) for n, c in _CONV_OF_NORM.items()]
    folded = 0
    for conv, parent, norm_name in pairs:
        norm = getattr(parent, norm_name, None)
        if isinstance(conv, nn.Conv2d) and isinstance(norm, FrozenBatchNorm2d):
            _fold(conv, norm)
            setattr(parent, norm_name, nn.Identity())  # Sequential accepts "1" too
            folded += 1
    return folded


def _fold(conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> None:
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # (C_out,)
    shift = norm.bias - norm.running_mean * scale
    bias = conv.bias * scale + shift if conv.bias is not None else shift
    conv.weight.mul_(scale[:, None, None, None])
    conv.bias = nn.Parameter(bias, requires_grad=False)
