"""everyseg: partially supervised instance segmentation (boxes for all classes, masks for some)."""

from everyseg.modeling.detector import build_model, from_torchvision

__all__ = ["build_model", "from_torchvision"]
__version__ = "0.1.0"
