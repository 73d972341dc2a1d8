"""Predictor: a trained run directory in, instances out. Paths, numpy arrays or PIL images."""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from everyseg.data.images import load_image
from everyseg.engine.coco_results import to_coco_results
from everyseg.engine.load import load_run
from everyseg.engine.precision import (
    InferencePrecision,
    autocast,
    inference_precision,
    outputs_to_float32,
)
from everyseg.instances import BoxMasks, Instances

__all__ = ["Instances", "Predictor", "draw_overlay", "image_to_tensor"]

ImageLike = str | Path | np.ndarray | Image.Image


def image_to_tensor(image: ImageLike) -> torch.Tensor:
    """Path, (H, W[, C]) numpy array (uint8 or float in [0, 1]) or PIL image -> (3, H, W) float."""
    if isinstance(image, (str, Path)):
        return load_image(Path(image))
    if isinstance(image, Image.Image):
        return _from_array(np.asarray(image.convert("RGB")))
    if isinstance(image, np.ndarray):
        return _from_array(image)
    raise TypeError(f"expected a path, numpy array or PIL image, got {type(image).__name__}")


def _from_array(array: np.ndarray) -> torch.Tensor:
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) array, got {array.shape}")
    rgb = array[:, :, :3]
    scaled = rgb.astype(np.float32) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(scaled)).permute(2, 0, 1)


def check_fraction(value, *, name: str) -> float:
    """`value` as a float if it is a finite number in [0, 1], else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:  # NaN fails this too
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


class Predictor:
    """`Predictor(run_dir)(image)` -> Instances scoring at least `score_thresh`.

    `precision` (fp32 | fp16 | bf16) is the autocast the model runs in; None (the default)
    is the run's train.amp where the device runs it, else fp32 (everyseg.engine.precision).
    Boxes, scores and masks come out as float32 whatever it is.
    """

    def __init__(
        self,
        run_dir,
        *,
        checkpoint: str = "last",
        device: str = "auto",
        score_thresh: float = 0.5,
        mask_thresh: float = 0.5,
        precision: InferencePrecision | None = None,
    ) -> None:
        self.score_thresh = check_fraction(score_thresh, name="score_thresh")
        self.mask_thresh = check_fraction(mask_thresh, name="mask_thresh")
        run = load_run(run_dir, checkpoint=checkpoint, device=device)
        self.model, self.cfg = run.model, run.config
        self.class_names: list[str] = run.record.class_names
        self.label_to_cat_id: dict[int, int] = run.record.label_to_cat_id
        self.mask_classes: list[str] = run.record.mask_classes
        self.device = next(self.model.parameters()).device
        self.precision = inference_precision(
            precision, trained=self.cfg.train.amp, device=self.device
        )

    @torch.inference_mode()
    def __call__(self, image: ImageLike) -> Instances:
        tensor = image_to_tensor(image)
        output = self.predict_raw(tensor)
        # filter before pasting: only kept detections' masks ever reach image size
        keep = output["scores"] >= self.score_thresh
        return self._instances(
            (tensor.shape[1], tensor.shape[2]),
            output["boxes"][keep],
            output["scores"][keep],
            output["labels"][keep],
            output["box_masks"][keep],
        )

    @torch.inference_mode()
    def segment(self, image: ImageLike, boxes, *, labels=None) -> Instances:
        """One mask per given (N, 4) xyxy box in image pixels, whatever its class (Deep-MAC).

        Boxes must be finite with X1 > X0 and Y1 > Y0; parts outside the image are clipped
        off (a box entirely outside it is an error). The class of each box is `labels` (N
        integers in 1..K) when given, else the detector's most likely foreground class on it
        (see the detector's `masks_for_boxes`); a class-specific mask head predicts that
        class's channel, a class-agnostic one ignores it. Scores are that class's score.
        Bad boxes or labels raise ValueError.
        """
        tensor = image_to_tensor(image).to(self.device)
        boxes = _as_tensor(boxes, np.float32, "boxes")
        if boxes.ndim == 1 and boxes.numel() == 4:
            boxes = boxes[None]  # a single box
        if labels is not None:
            labels = [_as_tensor(labels, None, "labels").reshape(-1)]
        with autocast(self.device, self.precision):
            outputs = self.model.masks_for_boxes([tensor], [boxes], labels, paste=False)
        (output,) = outputs_to_float32(outputs)
        size = (tensor.shape[1], tensor.shape[2])
        # torchvision's paste pads the box by a pixel or two, so cut to the box: a prompt
        # bounds its mask
        return self._instances(
            size,
            output["boxes"],
            output["scores"],
            output["labels"],
            output["box_masks"],
            cut_to_box=True,
        )

    def _instances(self, size, boxes, scores, labels, box_masks, *, cut_to_box=False):
        """(N, 4), (N,), (N,), (N, 1, M, M) tensors of an image of `size` (H, W) -> Instances,
        masks pasted one at a time and thresholded (above `mask_thresh`)."""
        labels = labels.cpu().numpy()
        return Instances(
            boxes=boxes.float().cpu().numpy(),
            scores=scores.float().cpu().numpy(),
            labels=labels,
            class_names=[self.class_names[int(lab) - 1] for lab in labels],
            box_masks=BoxMasks(
                box_masks, boxes, image_size=size, threshold=self.mask_thresh, cut_to_box=cut_to_box
            ),
        )

    @torch.inference_mode()
    def predict_raw(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """(3, H, W) float image -> the model's detections, masks left in their boxes
        ("box_masks" (N, 1, M, M), see the detector's `detect`), as float32."""
        with autocast(self.device, self.precision):
            outputs = self.model.detect([tensor.to(self.device)])
        return outputs_to_float32(outputs)[0]

    def coco_results(self, instances: Instances, *, image_id: int) -> list[dict]:
        """COCO results entries (bbox xywh, RLE segmentation) for one image's instances."""
        boxes_only = {
            "boxes": torch.from_numpy(instances.boxes),
            "scores": torch.from_numpy(instances.scores),
            "labels": torch.from_numpy(instances.labels),
        }
        results = to_coco_results(
            boxes_only, image_id=image_id, label_to_cat_id=self.label_to_cat_id
        )
        for result, rle in zip(results, instances.rle(), strict=True):
            result["segmentation"] = rle
        return results


def _as_tensor(values, dtype, name: str) -> torch.Tensor:
    try:
        return torch.as_tensor(np.asarray(values, dtype=dtype))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, got {values!r}") from None


def draw_overlay(
    image: ImageLike, instances: Instances, *, alpha: float = 0.45, min_side: int = 512
) -> Image.Image:
    """The image with each instance's mask, box, class name and score drawn on it.

    Small images are enlarged (nearest neighbour, integer factor) until their long side
    reaches `min_side`, so that captions stay readable on 128 px inputs.
    """
    canvas = (image_to_tensor(image) * 255).round().to(torch.uint8)  # (3, H, W)
    scale = max(1, math.ceil(min_side / max(canvas.shape[1:])))
    canvas = _enlarge(canvas, scale)
    if len(instances) == 0:
        return Image.fromarray(canvas.permute(1, 2, 0).numpy())
    colors = [_color(int(lab)) for lab in instances.labels]
    masks = _enlarge(torch.from_numpy(instances.masks), scale)
    canvas = draw_segmentation_masks(canvas, masks, alpha=alpha, colors=colors)
    captions = [f"{n} {s:.2f}" for n, s in zip(instances.class_names, instances.scores)]
    boxes = torch.from_numpy(instances.boxes) * scale
    canvas = draw_bounding_boxes(canvas, boxes, labels=captions, colors=colors, width=2)
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())


def _enlarge(planes: torch.Tensor, scale: int) -> torch.Tensor:
    """(C, H, W) -> (C, scale * H, scale * W) by pixel repetition."""
    return planes.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def _color(label: int) -> tuple[int, int, int]:
    """A stable, well-spread colour per class (golden-ratio hue steps)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)
