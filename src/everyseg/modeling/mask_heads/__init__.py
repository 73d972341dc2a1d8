"""Mask heads by config name. Each family's builder takes keyword arguments only, among them
`make_predictor`, which builds the head's final layer (see predictors.py); MASK_HEADS maps a
name to a function reading that family's options from `model.mask_head`."""

from collections.abc import Callable

from torch import nn

from everyseg.config import ConfigError, MaskHeadConfig
from everyseg.modeling.mask_heads.base import ClassConvPredictor, MaskHead, SoftmaxMaskHead
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
    head = MASK_HEADS[mh.name](mh, in_channels=in_channels, make_predictor=make_predictor)
    return with_mask_loss(mh, head)


# model.mask_head.loss -> the MaskHead class that computes it
MASK_LOSSES: dict[str, Callable[..., MaskHead]] = {
    "sigmoid": MaskHead,
    "softmax": SoftmaxMaskHead,
}


def with_mask_loss(mh: MaskHeadConfig, head: MaskHead) -> MaskHead:
    """`head`'s modules (so its state-dict keys) with the loss and the inference that goes
    with it that `model.mask_head.loss` names."""
    if mh.loss not in MASK_LOSSES:
        raise ConfigError(
            f"model.mask_head.loss {mh.loss!r}: choose one of {', '.join(MASK_LOSSES)}"
        )
    if mh.loss == "softmax":
        _check_softmax(mh)
    return MASK_LOSSES[mh.loss](features=head.features, predictor=head.predictor)


def _check_softmax(mh: MaskHeadConfig) -> None:
    """The softmax makes every class's conv mask compete: it needs them all, plainly."""
    clashes = {
        "class_agnostic=true (one mask, nothing to compete with)": mh.class_agnostic,
        "predictor=transfer (masks predicted per RoI's class only)": mh.predictor == "transfer",
        "mlp_fusion=true (a class-agnostic map added to the class's)": mh.mlp_fusion,
    }
    for setting, clash in clashes.items():
        if clash:
            raise ConfigError(
                f"model.mask_head.loss=softmax does not combine with model.mask_head.{setting}:"
                " use model.mask_head.loss=sigmoid or change the other key"
            )


__all__ = [
    "MASK_HEADS",
    "MASK_LOSSES",
    "PREDICTORS",
    "ClassConvPredictor",
    "MaskHead",
    "SoftmaxMaskHead",
    "build_fcn_head",
    "build_hourglass_head",
    "build_mask_head",
    "build_mask_predictor",
    "build_resnet_head",
    "with_mask_loss",
]
