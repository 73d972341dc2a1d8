"""Mask heads by config name. Each family's builder takes keyword arguments only, among them
`make_predictor`, which builds the head's final layer (see predictors.py); MASK_HEADS maps a
name to a function reading that family's options from `model.mask_head`."""

from collections.abc import Callable

from torch import nn

from everyseg.config import ConfigError, MaskHeadConfig
from everyseg.modeling.mask_heads.base import ClassConvPredictor, MaskHead
from everyseg.modeling.mask_heads.deep import build_hourglass_head, build_resnet_head
from everyseg.modeling.mask_heads.fcn import build_fcn_head
from everyseg.modeling.mask_heads.predictors import PREDICTORS, build_mask_predictor


def _fcn(mh: MaskHeadConfig, *, in_channels: int, make_predictor) -> MaskHead:
    if mh.mask_resolution != 2 * mh.pooler_resolution:
        raise ConfigError(
            f"model.mask_head.resolution {mh.resolution}: the fcn head's deconv predicts at "
            f"twice pooler_resolution ({2 * mh.pooler_resolution}); use null or a deep head"
        )
    return build_fcn_head(
        in_channels=in_channels,
        channels=mh.channels,
        num_convs=mh.num_convs,
        make_predictor=make_predictor,
    )


def _deep(builder: Callable[..., MaskHead]):
    def build(mh: MaskHeadConfig, *, in_channels: int, make_predictor) -> MaskHead:
        return builder(
            in_channels=in_channels,
            channels=mh.channels,
            depth=mh.depth,
            resolution=mh.mask_resolution,
            make_predictor=make_predictor,
        )

    return build


MASK_HEADS = {
    "fcn": _fcn,
    "resnet": _deep(build_resnet_head),
    "hourglass": _deep(build_hourglass_head),
}


def build_mask_head(
    mh: MaskHeadConfig, *, in_channels: int, make_predictor: Callable[[], nn.Module]
) -> MaskHead:
    """The head `model.mask_head.name` names, reading (R, in_channels, S, S) RoI features."""
    if mh.name not in MASK_HEADS:
        raise ConfigError(
            f"model.mask_head.name {mh.name!r}: choose one of {', '.join(MASK_HEADS)}"
        )
    return MASK_HEADS[mh.name](mh, in_channels=in_channels, make_predictor=make_predictor)


__all__ = [
    "MASK_HEADS",
    "PREDICTORS",
    "ClassConvPredictor",
    "MaskHead",
    "build_fcn_head",
    "build_hourglass_head",
    "build_mask_head",
    "build_mask_predictor",
    "build_resnet_head",
]
