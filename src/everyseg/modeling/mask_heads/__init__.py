"""Mask heads by config name. Each builder takes keyword arguments only, among them
`make_predictor`, which builds the head's final layer (see predictors.py)."""

from everyseg.modeling.mask_heads.base import ClassConvPredictor, MaskHead
from everyseg.modeling.mask_heads.fcn import build_fcn_head
from everyseg.modeling.mask_heads.predictors import PREDICTORS, build_mask_predictor

MASK_HEADS = {"fcn": build_fcn_head}

__all__ = [
    "MASK_HEADS",
    "PREDICTORS",
    "ClassConvPredictor",
    "MaskHead",
    "build_fcn_head",
    "build_mask_predictor",
]
