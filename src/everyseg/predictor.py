"""Predictor: a model (in memory or a trained run's) in, instances out. Paths, numpy arrays,
PIL images or torch tensors, one at a time or in batches."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import overload

import numpy as np
import torch
from torchvision.ops import nms

from everyseg.config import Config
from everyseg.data.keypoints import KeypointLayout
from everyseg.engine.coco_results import to_coco_results
from everyseg.engine.load import load_run
from everyseg.engine.precision import (
    InferencePrecision,
    autocast,
    inference_precision,
    outputs_to_float32,
)
from everyseg.image_input import ImageLike, as_batch, image_to_tensor
from everyseg.instances import BoxMasks, Instances
from everyseg.keypoint_draw import instance_keypoints
from everyseg.modeling.box_prompts import ImageFeatures, encode_images
from everyseg.modeling.detector import Detector
from everyseg.modeling.fcn import FCN
from everyseg.overlay_draw import draw_overlay

__all__ = ["ImageLike", "Instances", "Predictor", "draw_overlay", "image_to_tensor"]


def check_fraction(value, *, name: str) -> float:
    """`value` as a float if it is a finite number in [0, 1], else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:  # NaN fails this too
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


class Predictor:
    """`Predictor(model)(image)` -> Instances scoring at least `score_thresh`; a batch (a list
    of images, or a 4-D array or tensor) -> a list of Instances, run as one batch.

    `model` is an everyseg detector in memory (it is put in eval mode); `class_names` (K
    names, default "class_1".."class_K") name its labels 1..K and `label_to_cat_id` maps them
    to COCO category ids (default: the label). `Predictor.from_run(run_dir)` loads a trained
    run with its classes. `precision` (fp32 | fp16 | bf16) is the autocast the model runs in;
    None (the default) is fp32, or for a run its train.amp where the device runs it
    (everyseg.engine.precision). Boxes, scores and masks come out as float32 whatever it is.
    The detector's NMS is per class, so one object can come out under two labels (COCO AP
    wants them); `cross_class_nms=IOU` also drops a detection whose box overlaps a
    better-scoring one of any class by more than IOU: one label per object, for people.

    `set_image(image)` runs the backbone once; `segment(boxes=...)` then prompts it again
    and again without recomputing it (SAM's way). A keypoint model's `keypoint_layout`
    (from_run reads it) gives its keypoint classes' instances keypoints.
    """

    def __init__(
        self,
        model: Detector | str | Path,  # a path: deprecated, see from_run
        *,
        class_names: Sequence[str] | None = None,
        label_to_cat_id: dict[int, int] | None = None,
        mask_classes: Sequence[str] = (),
        score_thresh: float = 0.5,
        mask_thresh: float = 0.5,
        cross_class_nms: float | None = None,
        precision: InferencePrecision | None = None,
        keypoint_layout: KeypointLayout | None = None,
        **run_options,
    ) -> None:
        self.score_thresh = check_fraction(score_thresh, name="score_thresh")
        self.mask_thresh = check_fraction(mask_thresh, name="mask_thresh")
        if cross_class_nms is not None:
            check_fraction(cross_class_nms, name="cross_class_nms")
        self.cross_class_nms = cross_class_nms
        if isinstance(model, (str, Path)):
            warnings.warn(
                "Predictor(run_dir) is deprecated: use Predictor.from_run(run_dir)",
                DeprecationWarning,
                stacklevel=2,
            )
            loaded = Predictor.from_run(
                model,
                score_thresh=score_thresh,
                mask_thresh=mask_thresh,
                cross_class_nms=cross_class_nms,
                precision=precision,
                **run_options,
            )
            self.__dict__.update(loaded.__dict__)
            return
        if run_options:
            raise TypeError(f"{', '.join(run_options)}: only Predictor.from_run takes these")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        num_classes = _foreground_classes(model)
        names = [f"class_{k}" for k in range(1, num_classes + 1)]
        self.class_names: list[str] = list(names if class_names is None else class_names)
        if len(self.class_names) != num_classes:
            raise ValueError(
                f"class_names: the model has {num_classes} classes, got {len(self.class_names)}"
            )
        identity = {k: k for k in range(1, num_classes + 1)}
        self.label_to_cat_id: dict[int, int] = dict(label_to_cat_id or identity)
        self.mask_classes: list[str] = list(mask_classes)
        self.precision = inference_precision(precision, trained="off", device=self.device)
        self.cfg: Config | None = None  # a run's config, set by from_run
        self.keypoint_layout = keypoint_layout
        self._image: ImageFeatures | None = None

    @classmethod
    def from_run(
        cls,
        run_dir,
        *,
        checkpoint: str = "last",
        device: str = "auto",
        score_thresh: float = 0.5,
        mask_thresh: float = 0.5,
        cross_class_nms: float | None = None,
        precision: InferencePrecision | None = None,
    ) -> Predictor:
        """The Predictor of `run_dir`'s checkpoint `checkpoint` ("last", "best", "model",
        "step_XXXXXXX" or a .pt path) on `device`, with the run's classes."""
        check_fraction(score_thresh, name="score_thresh")  # before the run loads
        check_fraction(mask_thresh, name="mask_thresh")
        run = load_run(run_dir, checkpoint=checkpoint, device=device)
        if isinstance(run.model, FCN):
            raise ValueError(
                f"{run_dir} is a semantic segmentation run (model.kind=fcn), not an instance "
                "segmenter: `everyseg predict` writes its label maps (everyseg.semantic_predict)"
            )
        device_of_model = next(run.model.parameters()).device
        predictor = cls(
            run.model,
            class_names=run.record.class_names,
            label_to_cat_id=run.record.label_to_cat_id,
            mask_classes=run.record.mask_classes,
            score_thresh=score_thresh,
            mask_thresh=mask_thresh,
            cross_class_nms=cross_class_nms,
            precision=inference_precision(
                precision, trained=run.config.train.amp, device=device_of_model
            ),
            keypoint_layout=(
                KeypointLayout.from_plain(run.record.keypoints) if run.record.keypoints else None
            ),
        )
        predictor.cfg = run.config
        return predictor

    @overload
    def __call__(self, images: ImageLike) -> Instances: ...

    @overload
    def __call__(self, images: list[ImageLike] | tuple[ImageLike, ...]) -> list[Instances]: ...

    @torch.inference_mode()
    def __call__(self, images):
        batch, is_batch = as_batch(images)
        tensors = [image_to_tensor(image) for image in batch]
        results = []
        for tensor, output in zip(tensors, self._detect(tensors), strict=True):
            # filter before pasting: only kept detections' masks ever reach image size
            keep = self._kept(output["boxes"], output["scores"])
            kept = (output[key][keep] for key in ("boxes", "scores", "labels", "box_masks"))
            instances = self._instances((tensor.shape[1], tensor.shape[2]), *kept)
            if self.keypoint_layout is not None and "keypoints" in output:
                layout = self.keypoint_layout
                points = output["keypoints"][keep]
                instances.keypoints = instance_keypoints(points, instances.class_names, layout)
                instances.skeletons = [layout.of_class(n)[1] for n in instances.class_names]
            results.append(instances)
        return results if is_batch else results[0]

    def _kept(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(N, 4), (N,) detections -> indices of those to return, best first."""
        keep = torch.where(scores >= self.score_thresh)[0]
        if self.cross_class_nms is not None:
            # the detector's NMS is per class (what COCO AP wants); a person reading an
            # overlay wants one label per object: the best-scoring class's
            keep = keep[nms(boxes[keep], scores[keep], self.cross_class_nms)]
        return keep

    @torch.inference_mode()
    def set_image(self, image: ImageLike) -> None:
        """Run `image` through the model's transform and backbone once, for `segment(boxes=...)`
        calls without an image to prompt; the features stay until the next set_image or
        reset_image."""
        tensor = image_to_tensor(image).to(self.device)
        with autocast(self.device, self.precision):
            self._image = encode_images(
                transform=self.model.transform, backbone=self.model.backbone, images=[tensor]
            )

    def reset_image(self) -> None:
        """Drop set_image's features (they hold the backbone's feature maps)."""
        self._image = None

    @torch.inference_mode()
    def segment(self, image: ImageLike | None = None, boxes=None, *, labels=None) -> Instances:
        """One mask per given (N, 4) xyxy box in image pixels, whatever its class (Deep-MAC).

        Without `image`, the boxes prompt the image of the last `set_image`, whose features
        are reused: the same masks as `segment(that_image, boxes)`, without the backbone.
        Boxes must be finite with X1 > X0 and Y1 > Y0; parts outside the image are clipped
        off (a box entirely outside it is an error). The class of each box is `labels` (N
        integers in 1..K) when given, else the detector's most likely foreground class on it
        (see the detector's `masks_for_boxes`); a class-specific mask head predicts that
        class's channel, a class-agnostic one ignores it. Scores are that class's score.
        Bad boxes or labels raise ValueError.
        """
        if boxes is None:
            raise ValueError("segment needs boxes: segment(image, boxes) or segment(boxes=...)")
        if image is not None:
            prompted: list[torch.Tensor] | ImageFeatures = [image_to_tensor(image).to(self.device)]
        elif self._image is not None:
            prompted = self._image
        else:
            raise ValueError("segment without an image needs set_image(image) first")
        boxes = _as_tensor(boxes, np.float32, "boxes")
        if boxes.ndim == 1 and boxes.numel() == 4:
            boxes = boxes[None]  # a single box
        if labels is not None:
            labels = [_as_tensor(labels, None, "labels").reshape(-1)]
        with autocast(self.device, self.precision):
            outputs = self.model.masks_for_boxes(prompted, [boxes], labels, paste=False)
        (output,) = outputs_to_float32(outputs)
        size = prompted.sizes[0] if isinstance(prompted, ImageFeatures) else prompted[0].shape[1:]
        # torchvision's paste pads the box by a pixel or two, so cut to the box: a prompt
        # bounds its mask
        return self._instances(
            (int(size[0]), int(size[1])),
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
        return self._detect([tensor])[0]

    def _detect(self, tensors: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """(3, H_i, W_i) float images -> predict_raw's detections of each, one forward."""
        with autocast(self.device, self.precision):
            outputs = self.model.detect([tensor.to(self.device) for tensor in tensors])
        return outputs_to_float32(outputs)

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
        points = instances.keypoints if instances.keypoints is not None else ()
        for result, values in zip(results, points):
            if (values[:, 2] > 0).any():  # a keypoint class's: COCO's keypoint result
                result["keypoints"] = values.ravel().tolist()
        return results


def _foreground_classes(model: Detector) -> int:
    """K, the classes an R-CNN's box classifier or FCOS's classification head scores besides
    the background."""
    if hasattr(model, "roi_heads"):
        return model.roi_heads.box_predictor.cls_score.out_features - 1
    return model.head.classification_head.num_classes - 1


def _as_tensor(values, dtype, name: str) -> torch.Tensor:
    try:
        return torch.as_tensor(np.asarray(values, dtype=dtype))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, got {values!r}") from None
