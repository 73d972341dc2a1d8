"""Mask R-CNN's FCN mask head: 4 x (3x3 conv + ReLU), 2x deconv, per-class 1x1 conv."""

from __future__ import annotations

from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

from everyseg.modeling.mask_heads.base import ClassConvPredictor, MaskHead


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
    *, in_channels: int, channels: int, num_convs: int, num_classes: int, class_agnostic: bool
) -> MaskHead:
    convs = MaskRCNNHeads(in_channels, [channels] * num_convs, dilation=1)
    conv_out = channels if num_convs > 0 else in_channels
    upsample = nn.ConvTranspose2d(conv_out, channels, kernel_size=2, stride=2)
    nn.init.kaiming_normal_(upsample.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(upsample.bias)
    return MaskHead(
        features=FCNFeatures(convs=convs, upsample=upsample),
        predictor=ClassConvPredictor(
            in_channels=channels, num_classes=num_classes, class_agnostic=class_agnostic
        ),
    )
