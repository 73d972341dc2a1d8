"""Mask heads by config name. Each builder takes keyword arguments only."""

from everyseg.modeling.mask_heads.base import ClassConvPredictor, MaskHead
from everyseg.modeling.mask_heads.fcn import build_fcn_head

MASK_HEADS = {"fcn": build_fcn_head}

__all__ = ["MASK_HEADS", "ClassConvPredictor", "MaskHead", "build_fcn_head"]
