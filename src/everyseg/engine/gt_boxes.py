"""Mask quality apart from detection: the model's masks for the val set's ground-truth boxes.

Every non-crowd val instance with a mask prompts the model (`masks_for_boxes`) with its own
box and its own class: neither the detector's boxes nor its classifier enter the measurement.
(benchmarks/box_prompt_iou.py instead lets the box classifier guess the class, as a user of
`everyseg segment` gets it; metrics.json reports the given-class numbers.) Two measures come
of the prompts, in metrics.json's "gt_boxes" (see evaluate.evaluate_model):

- mean mask IoU of each instance's mask with its own ground truth (0..1), over the instances
  of all / seen / unseen classes (instance-weighted) and per class: `mask_ious`;
- mask AP with each prompt as one detection, scored by COCOeval as the detections are (crowd
  regions, area ranges, box-only instances as ignore regions and LVIS's rules all hold). A
  detection's score is its mask's mean foreground probability (`mask_confidence`): with one
  score for all, AP would depend on the arbitrary order of tied detections; the mask head's
  own confidence ranks its masks without asking the detector.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from pycocotools import mask as mask_util
from torch import Tensor

from everyseg.data.segmentation import to_rle, usable_segmentation
from everyseg.engine.coco_results import to_coco_results
from everyseg.engine.precision import outputs_to_float32

PROTOCOL = {
    "boxes": "ground truth",
    "class": "ground truth",
    "score": "mean foreground probability of the mask",
}


def gt_box_results(
    model: torch.nn.Module,
    images: Sequence[Tensor],
    targets: Sequence[dict[str, Any]],
    *,
    label_to_cat_id: Mapping[int, int],
    target_label_to_cat_id: Mapping[int, int],
    mask_threshold: float = 0.5,
) -> list[list[dict[str, Any]]]:
    """Per image, the COCO results of the model's masks for its ground-truth boxes.

    Args:
        model: an everyseg detector (`masks_for_boxes`), in eval mode.
        images: (3, H, W) float images on the model's device.
        targets: their targets: ``boxes`` (N, 4), ``labels`` (N,), ``has_mask`` (N,),
            ``ann_ids`` (N,), ``image_id``; instances without a mask prompt nothing.
        label_to_cat_id: model label -> category id (a class is named by its category id).
        target_label_to_cat_id: the targets' labels -> category id.

    Returns:
        Per image, one result per prompt as `to_coco_results` makes them, with the prompt's
        ``ann_id``, its class's ``category_id`` and `mask_confidence` as ``score``. One
        `masks_for_boxes` call serves every image of the batch.
    """
    model_label = {cat_id: label for label, cat_id in label_to_cat_id.items()}
    asked = [
        (i, prompt)
        for i, target in enumerate(targets)
        if (prompt := _prompts(target, target_label_to_cat_id, model_label)) is not None
    ]
    results: list[list[dict[str, Any]]] = [[] for _ in images]
    if not asked:
        return results
    device = images[asked[0][0]].device
    outputs = model.masks_for_boxes(  # type: ignore[operator]
        [images[i] for i, _ in asked],
        [prompt.boxes.to(device) for _, prompt in asked],
        [prompt.labels.to(device) for _, prompt in asked],
        paste=False,
    )
    for (i, prompt), output in zip(asked, outputs_to_float32(outputs), strict=True):
        box_masks = output["box_masks"]  # (P, 1, M, M) probabilities in the boxes
        coco = to_coco_results(
            {
                "boxes": output["boxes"],  # the prompts clipped to the image
                "labels": prompt.labels,
                "scores": mask_confidence(box_masks, threshold=mask_threshold),
                "box_masks": box_masks,
            },
            image_id=int(targets[i]["image_id"]),
            label_to_cat_id=dict(label_to_cat_id),
            mask_threshold=mask_threshold,
            image_size=(images[i].shape[-2], images[i].shape[-1]),
        )
        for result, ann_id in zip(coco, prompt.ann_ids, strict=True):
            result["ann_id"] = ann_id
        results[i] = coco
    return results


class _Prompts(NamedTuple):
    """One image's masked instances as prompts."""

    boxes: Tensor  # (P, 4) xyxy in the image's pixels
    labels: Tensor  # (P,) model labels of their classes
    ann_ids: list[int]


def _prompts(
    target: dict[str, Any], target_label_to_cat_id: Mapping[int, int], model_label: dict[int, int]
) -> _Prompts | None:
    """One image's masked instances as prompts, or None when it has none."""
    keep = target["has_mask"].bool()
    if not keep.any():
        return None
    labels = []
    for label in target["labels"][keep].tolist():
        cat_id = target_label_to_cat_id[label]
        if cat_id not in model_label:
            raise ValueError(
                f"image {int(target['image_id'])}: category id {cat_id} is not a class of the "
                "model, so its ground-truth boxes cannot be prompted with their class"
            )
        labels.append(model_label[cat_id])
    return _Prompts(
        boxes=target["boxes"][keep].float(),
        labels=torch.tensor(labels, dtype=torch.int64),
        ann_ids=target["ann_ids"][keep].tolist(),
    )


def mask_confidence(box_masks: Tensor, *, threshold: float = 0.5) -> Tensor:
    """(N, 1, M, M) mask probabilities -> (N,) mean probability of each mask's foreground
    (the pixels above `threshold`), 0 for a mask without foreground."""
    probs = box_masks.flatten(1)  # (N, M * M)
    foreground = probs > threshold
    return (probs * foreground).sum(1) / foreground.sum(1).clamp(min=1)


def mask_ious(
    gt: Mapping[str, Any], results: Iterable[dict[str, Any]], *, seen_cat_ids: Iterable[int]
) -> dict[str, Any]:
    """Mean IoU of each prompted mask with its own ground-truth mask.

    Args:
        gt: the COCO dict the prompts came from (read, not modified).
        results: `gt_box_results`' results (``ann_id``, compressed RLE ``segmentation``).
        seen_cat_ids: category ids that had masks in training.

    Returns:
        ``{"mean_iou": {"all"|"seen"|"unseen": IoU}, "instances": {"all"|"seen"|"unseen": n},
        "per_class_iou": {name: IoU}}``, IoU in 0..1, None where there is no instance.
    """
    anns = {ann["id"]: ann for ann in gt["annotations"]}
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    ious: dict[int, list[float]] = {c["id"]: [] for c in cats}
    for result in results:
        ann = anns[result["ann_id"]]
        ious[ann["category_id"]].append(_iou(result["segmentation"], ann, sizes[ann["image_id"]]))
    seen = set(seen_cat_ids)
    subsets = {
        "all": [iou for values in ious.values() for iou in values],
        "seen": [iou for cat_id, values in ious.items() if cat_id in seen for iou in values],
        "unseen": [iou for cat_id, values in ious.items() if cat_id not in seen for iou in values],
    }
    return {
        "mean_iou": {subset: _mean(values) for subset, values in subsets.items()},
        "instances": {subset: len(values) for subset, values in subsets.items()},
        "per_class_iou": {c["name"]: _mean(ious[c["id"]]) for c in cats},
    }


def _iou(predicted: dict[str, Any], ann: dict[str, Any], size: tuple[int, int]) -> float:
    height, width = size
    segm = usable_segmentation(ann["segmentation"], width=width, height=height)
    if segm is None:
        raise ValueError(f"annotation {ann['id']} has no usable mask to measure a prompt on")
    truth = to_rle(segm, height=height, width=width)
    mask = to_rle(predicted, height=height, width=width)
    return float(np.asarray(mask_util.iou([mask], [truth], [0]))[0, 0])


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None
