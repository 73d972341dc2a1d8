"""everyseg: partially supervised instance segmentation (boxes for all classes, masks for some)."""

from everyseg.modeling.detector import build_model, from_torchvision
from everyseg.predictor import Predictor
from everyseg.train_run import train

__all__ = ["Predictor", "build_model", "from_torchvision", "train"]
__version__ = "0.1.0"
