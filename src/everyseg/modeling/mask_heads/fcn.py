"""Mask R-CNN's FCN mask head: 4 x (3x3 conv + ReLU), 2x deconv, then the predictor."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

from everyseg.modeling.mask_heads.base import MaskHead


class FCNFeatures(nn.Module):
    """(R, C, S, S) -> (R, D, 2S, 2S): torchvision's conv stack, then the upsampling deconv."""

    def __init__(self, *, convs: nn.Module, upsample: nn.ConvTranspose2d) -> None:
        super().__init__()
        self.convs = convs
        self.upsample = upsample
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.upsample(self.convs(x)))


def build_fcn_head(
    *, in_channels: int, channels: int, num_convs: int, make_predictor: Callable[[], nn.Module]
) -> MaskHead:
    """`make_predictor()` builds the layer reading the (R, channels, 2S, 2S) features (see
    predictors.py); it is called last, so the feature layers' initial weights never depend on
    which predictor follows them."""
    convs = MaskRCNNHeads(in_channels, [channels] * num_convs, dilation=1)
    conv_out = channels if num_convs > 0 else in_channels
    upsample = nn.ConvTranspose2d(conv_out, channels, kernel_size=2, stride=2)
    nn.init.kaiming_normal_(upsample.weight, mode="fan_out", nonlinearity="relu")
    assert upsample.bias is not None  # ConvTranspose2d has one unless told bias=False
    nn.init.zeros_(upsample.bias)
    features = FCNFeatures(convs=convs, upsample=upsample)
    return MaskHead(features=features, predictor=make_predictor())
