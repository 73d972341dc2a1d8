"""Mask R-CNN's FCN mask head: 4 x (3x3 conv + ReLU), 2x deconv, then the predictor."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

from everyseg.modeling.mask_heads.base import MaskHead, SubpixelFeatures


class FCNFeatures(SubpixelFeatures):
    """(R, C, S, S) -> (R, D, 2S, 2S): torchvision's conv stack, then the upsampling deconv
    (kernel 2, stride 2)."""

    def __init__(self, *, convs: nn.Module, upsample: nn.ConvTranspose2d) -> None:
        super().__init__()
        self.convs = convs
        self.upsample = upsample
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.upsample(self.convs(x)))

    def subpixel_rows(self, x: Tensor) -> Tensor:
        x = self.convs(x)  # (R, C, S, S)
        num_rois, channels, side, _ = x.shape
        weight = self.upsample.weight  # (C, D, 2, 2)
        pixels = x.permute(0, 2, 3, 1).reshape(num_rois, side * side, channels)
        products = pixels @ weight.permute(0, 2, 3, 1).reshape(channels, -1)  # (R, S S, 4 D)
        rows = products.view(num_rois, 4 * side * side, weight.shape[1])
        if self.upsample.bias is not None:
            rows = rows + self.upsample.bias
        return rows.relu()


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
