"""Deep-MARC's deep mask heads: ResNet-N and Hourglass-N, at any mask resolution M.

Both project the (R, C, S, S) RoI features to `channels` with a 1x1 conv, resize them
bilinearly to M x M (Deep-MAC crops features at the mask's resolution) and run their body
there, so the predictor reads (R, channels, M, M) like the FCN head's. Depth N counts the 3x3
conv layers of the body; all use GroupNorm, which works for any number of RoIs, even 0 or 1.

Hourglass-N is `stacks` hourglasses in a row. One hourglass with L levels: a skip unit at
full size, a down unit (its first block strides 2), the inner hourglass of L - 1 levels (at
L = 0, a bottom unit), an up unit, then nearest upsampling added to the skip unit's output.
With `blocks` basic blocks (2 convs each) per unit, one hourglass has 2 * blocks * (3L + 1)
convs; HOURGLASS_LAYOUTS gives N -> (stacks, levels, blocks):
  10 -> (1, 1, 1): 8 convs   20 -> (1, 3, 1): 20   52 -> (1, 4, 2): 52
  100 -> (2, 4, 2): 104 (two stacked Hourglass-52s, as CenterNet's Hourglass-104)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from everyseg.config import ConfigError
from everyseg.modeling.mask_heads.base import MaskHead

RESNET_DEPTHS = (4, 8, 12, 16, 20)
HOURGLASS_LAYOUTS = {10: (1, 1, 1), 20: (1, 3, 1), 52: (1, 4, 2), 100: (2, 4, 2)}


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class BasicBlock(nn.Module):
    """(R, D, H, W) -> (R, D, H / stride, W / stride): two 3x3 convs and a residual."""

    def __init__(self, *, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False),
            _norm(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            _norm(channels),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1
            else nn.Sequential(nn.Conv2d(channels, channels, 1, stride=stride), _norm(channels))
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def _unit(*, channels: int, blocks: int, stride: int = 1) -> nn.Sequential:
    first = BasicBlock(channels=channels, stride=stride)
    return nn.Sequential(first, *(BasicBlock(channels=channels) for _ in range(blocks - 1)))


class Hourglass(nn.Module):
    """(R, D, H, W) -> (R, D, H, W): encoder-decoder of `levels` strided levels, with skips."""

    def __init__(self, *, channels: int, levels: int, blocks: int) -> None:
        super().__init__()
        self.skip = _unit(channels=channels, blocks=blocks)
        self.down = _unit(channels=channels, blocks=blocks, stride=2)
        self.inner = (
            Hourglass(channels=channels, levels=levels - 1, blocks=blocks)
            if levels > 1
            else _unit(channels=channels, blocks=blocks)
        )
        self.up = _unit(channels=channels, blocks=blocks)

    def forward(self, x: Tensor) -> Tensor:
        skip = self.skip(x)
        low = self.up(self.inner(self.down(x)))
        # odd sides (M = 28 halves to 7, then 4): upsample to the skip's exact size
        return skip + F.interpolate(low, size=skip.shape[-2:], mode="nearest")


class DeepFeatures(nn.Module):
    """(R, C, S, S) -> (R, channels, M, M): 1x1 projection, resize to M, then `body`."""

    def __init__(self, *, in_channels: int, channels: int, resolution: int, body: nn.Module):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True))
        self.resolution = resolution
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        x = self.project(x)
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=self.resolution, mode="bilinear", align_corners=False)
        return self.body(x)


def build_resnet_head(
    *,
    in_channels: int,
    channels: int,
    depth: int,
    resolution: int,
    make_predictor: Callable[[], nn.Module],
) -> MaskHead:
    """ResNet-`depth`: depth / 2 basic blocks at the mask resolution."""
    if depth not in RESNET_DEPTHS:
        raise ConfigError(
            f"model.mask_head.depth {depth} for resnet: choose one of {RESNET_DEPTHS}"
        )
    body = _unit(channels=channels, blocks=depth // 2)
    features = DeepFeatures(
        in_channels=in_channels, channels=channels, resolution=resolution, body=body
    )
    return MaskHead(features=features, predictor=make_predictor())


def build_hourglass_head(
    *,
    in_channels: int,
    channels: int,
    depth: int,
    resolution: int,
    make_predictor: Callable[[], nn.Module],
) -> MaskHead:
    """Hourglass-`depth`, laid out as HOURGLASS_LAYOUTS says."""
    if depth not in HOURGLASS_LAYOUTS:
        raise ConfigError(
            f"model.mask_head.depth {depth} for hourglass: choose one of {tuple(HOURGLASS_LAYOUTS)}"
        )
    stacks, levels, blocks = HOURGLASS_LAYOUTS[depth]
    body = nn.Sequential(
        *(Hourglass(channels=channels, levels=levels, blocks=blocks) for _ in range(stacks))
    )
    features = DeepFeatures(
        in_channels=in_channels, channels=channels, resolution=resolution, body=body
    )
    return MaskHead(features=features, predictor=make_predictor())
