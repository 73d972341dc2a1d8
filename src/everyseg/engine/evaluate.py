"""COCO box and mask AP on all / seen / unseen classes and per class (metrics.json of DESIGN.md).

"seen" classes had masks in training, "unseen" ones only boxes. All numbers are AP in percent as
COCO tables print them; a number that has no ground truth to be measured on is ``None``.
LVIS ground truth is scored with LVIS's federated rules, and AP is also given by class-frequency
bucket (everyseg.engine.lvis_rules).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from everyseg.engine import distributed, lvis_rules
from everyseg.engine.ap_summary import (
    STAT_NAMES,
    bucket_summary,
    by_frequency_block,
    mean_ap,
    pr_curve,
    summarize,
)
from everyseg.engine.coco_results import (
    IouType,
    ground_truth_for,
    load_ground_truth,
    precision_array,
    to_coco_results,
)
from everyseg.engine.files import write_json
from everyseg.engine.gt_boxes import PROTOCOL, gt_box_results, mask_ious
from everyseg.engine.keypoint_eval import keypoint_metrics
from everyseg.engine.metrics_table import format_metrics_table
from everyseg.engine.precision import autocast, outputs_to_float32

__all__ = [
    "STAT_NAMES",
    "coco_metrics",
    "evaluate_model",
    "gt_box_metrics",
    "format_metrics_table",
    "to_coco_results",
    "write_metrics",
]

IOU_TYPES: tuple[IouType, ...] = ("segm", "bbox")


def coco_metrics(
    gt: str | os.PathLike | dict,
    results: list[dict[str, Any]],
    *,
    seen_cat_ids: Iterable[int],
    image_ids: Iterable[int] | None = None,
    train_counts: Mapping[str, int] | None = None,
    iou_types: Iterable[IouType] = IOU_TYPES,
) -> dict[str, Any]:
    """COCO segm and bbox AP, split into all / seen / unseen classes and per class.

    Args:
        gt: COCO JSON path or loaded dict (not modified).
        results: COCO result dicts as made by :func:`to_coco_results`; those without
            ``segmentation`` count only for bbox (a box-only model scores 0 segm AP).
        seen_cat_ids: category ids that had masks in training; every other category is unseen.
        image_ids: evaluate only these images (default: every image of ``gt``), e.g. when the
            model ran on a subset; images without predictions count as having none.
        train_counts: class name -> training instances, to bucket classes by when ``gt`` has
            no LVIS frequencies (see lvis_rules.class_buckets).
        iou_types: what to score, of "segm" and "bbox".

    Returns:
        The metrics.json dict: ``{"segm"|"bbox": {"all"|"seen"|"unseen": {AP, AP50, AP75, APs,
        APm, APl}, "per_class": {name: AP}, "pr_curve": {iou, recall, all, seen, unseen}},
        "seen_classes", "unseen_classes", "images"}`` (``pr_curve``: see ap_summary.pr_curve).
        A value is ``None`` where COCO would print -1 (no ground truth in that class / subset /
        area range), e.g. a class absent from the val set.
        With frequency buckets, each iou type adds ``"by_frequency": {"r"|"c"|"f": {AP, ...}}``
        (and ``AP_r``, ``AP_c``, ``AP_f`` for LVIS frequencies), and the top level
        ``"frequency_buckets"`` (by, rule, classes per bucket) and ``"class_frequency"``
        ({name: bucket}). LVIS ground truth adds ``"lvis": {"federated": true,
        "max_detections_per_image": 300}``.
    """
    dataset = load_ground_truth(gt)
    source = "ground truth" if isinstance(gt, dict) else str(gt)
    federated = lvis_rules.is_federated(dataset, source=source)
    if federated:
        results = lvis_rules.annotated_classes_only(dataset, lvis_rules.top_per_image(results))
    cats = sorted(dataset["categories"], key=lambda c: c["id"])
    seen = set(seen_cat_ids)
    unknown = seen - {c["id"] for c in cats}
    if unknown:
        raise ValueError(f"seen_cat_ids {sorted(unknown)} are not categories of the ground truth")
    img_ids = sorted({img["id"] for img in dataset["images"]} if image_ids is None else image_ids)
    # COCOeval orders categories by id; `cats` is sorted the same way, so index k matches.
    is_seen = np.array([c["id"] in seen for c in cats], dtype=bool)
    buckets = lvis_rules.class_buckets(cats, train_counts=train_counts, source=source)
    metrics: dict[str, Any] = {}
    for iou_type in iou_types:
        precision, iou_thrs = precision_array(
            ground_truth_for(dataset, iou_type=iou_type),
            _results_for(results, iou_type=iou_type),
            iou_type=iou_type,
            img_ids=img_ids,
            federated=federated,
        )
        metrics[iou_type] = {
            "all": summarize(precision, iou_thrs, np.ones_like(is_seen)),
            "seen": summarize(precision, iou_thrs, is_seen),
            "unseen": summarize(precision, iou_thrs, ~is_seen),
            "per_class": {
                c["name"]: mean_ap(precision[:, :, k, 0, -1]) for k, c in enumerate(cats)
            },
            "pr_curve": pr_curve(precision, iou_thrs, is_seen),
        }
        if buckets is not None:
            metrics[iou_type] |= by_frequency_block(precision, iou_thrs, cats, buckets)
    metrics["seen_classes"] = [c["name"] for c in cats if c["id"] in seen]
    metrics["unseen_classes"] = [c["name"] for c in cats if c["id"] not in seen]
    metrics["images"] = len(img_ids)
    if buckets is not None:
        metrics["frequency_buckets"] = bucket_summary(cats, buckets)
        metrics["class_frequency"] = {
            c["name"]: buckets.of_category[c["id"]] for c in cats if c["id"] in buckets.of_category
        }
    if federated:
        metrics["lvis"] = {
            "federated": True,
            "max_detections_per_image": lvis_rules.MAX_DETS_PER_IMAGE,
        }
    return metrics


def _results_for(results: list[dict[str, Any]], *, iou_type: str) -> list[dict[str, Any]]:
    """Fresh result dicts carrying only the geometry ``iou_type`` scores.

    loadRes takes a result with a ``bbox`` as a box result and gives it the box area, which
    would put masks in the wrong small/medium/large bin; so segm results carry no box. Fresh
    dicts also keep loadRes from writing ``id``/``area`` into the caller's results.
    """
    key = "segmentation" if iou_type == "segm" else "bbox"
    fields = ("image_id", "category_id", "score", key)
    return [{f: r[f] for f in fields} for r in results if key in r]


def evaluate_model(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    label_to_cat_id: dict[int, int],
    seen_cat_ids: Iterable[int],
    gt_json: str | os.PathLike | dict,
    ignore_labels: Iterable[int] = (),
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    num_workers: int = 0,
    precision: str = "fp32",
    progress: bool = True,
    train_counts: Mapping[str, int] | None = None,
    target_label_to_cat_id: Mapping[int, int] | None = None,
    keypoint_names: list[str] | None = None,
) -> dict[str, Any]:
    """Run ``model`` over ``dataset`` and return :func:`coco_metrics` of its detections.

    Args:
        model: torchvision-style detector: ``model(list of (3, H, W) float images)`` returns
            one dict per image (see :func:`to_coco_results`), or everyseg's, whose
            ``detect`` returns masks in their boxes. Its train/eval mode is restored.
        dataset: map-style dataset of ``(image, target)`` with ``target["image_id"]`` a scalar
            tensor (or int) naming the image in ``gt_json``.
        label_to_cat_id, seen_cat_ids, gt_json: see :func:`to_coco_results` / :func:`coco_metrics`.
        ignore_labels: labels whose detections are dropped before scoring: classes of the model
            that ``gt_json`` does not have (every other label needs a ``label_to_cat_id``).
        device: where the images go; the model must already be there.
        batch_size, num_workers: DataLoader settings.
        precision: fp32 | fp16 | bf16, the autocast of the model's forward passes (see
            everyseg.engine.precision); detections are scored as float32 whatever it is.
        progress: show a tqdm bar.
        train_counts: see :func:`coco_metrics`.
        target_label_to_cat_id: the dataset's labels -> category id. Given, the model
            (`masks_for_boxes`) also segments every ground-truth box with a mask, its class
            given, and the metrics gain "gt_boxes" (everyseg.engine.gt_boxes): ``{"segm":
            coco_metrics' segm block of those masks, "mean_iou": {"all"|"seen"|"unseen": IoU},
            "instances": {...: n}, "per_class_iou": {name: IoU}, "protocol": {...}}``; the
            targets then need ``has_mask``, ``labels``, ``boxes`` and ``ann_ids``.
        keypoint_names: a keypoint model's keypoint list: the metrics gain "keypoints",
            keypoint AP (OKS) of its keypoint classes (everyseg.engine.keypoint_eval).

    Only the images in ``dataset`` are evaluated (``metrics["images"]`` counts them).
    Inside a process group (under torchrun) rank r of W runs images r, r + W, ...; rank 0
    scores them all, in dataset order, and every rank returns the metrics.
    """
    prompting = target_label_to_cat_id is not None
    if prompting and not callable(getattr(model, "masks_for_boxes", None)):
        raise TypeError(
            f"{type(model).__name__} has no masks_for_boxes: mask quality on ground-truth "
            "boxes needs an everyseg detector (pass target_label_to_cat_id=None)"
        )
    rank, world = distributed.rank(), distributed.world_size()
    positions = range(rank, len(dataset), world)  # type: ignore[arg-type]
    device = torch.device(device)
    loader = DataLoader(
        Subset(dataset, positions) if world > 1 else dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate_pairs,
        pin_memory=device.type == "cuda",
    )
    # (position, image id, results, results of the ground-truth box prompts)
    mine: list[tuple[int, int, list[dict[str, Any]], list[dict[str, Any]]]] = []
    ignore = torch.tensor(sorted(set(ignore_labels)), dtype=torch.int64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            done = iter(positions)
            bar = tqdm(loader, desc="evaluate", disable=not (progress and distributed.is_main()))
            for images, targets in bar:
                on_device = [image.to(device, non_blocking=True) for image in images]
                with autocast(device, precision):
                    outputs = _detections(model, on_device)
                    prompted = (
                        gt_box_results(
                            model,
                            on_device,
                            targets,
                            label_to_cat_id=label_to_cat_id,
                            target_label_to_cat_id=target_label_to_cat_id,
                        )
                        if target_label_to_cat_id is not None
                        else [[] for _ in images]
                    )
                outputs = outputs_to_float32(outputs)
                for output, image, target, gt_box in zip(
                    outputs, images, targets, prompted, strict=True
                ):
                    image_id = int(target["image_id"])
                    output = _without_labels(output, ignore)
                    coco = to_coco_results(
                        output,
                        image_id=image_id,
                        label_to_cat_id=label_to_cat_id,
                        image_size=(image.shape[-2], image.shape[-1]),
                    )
                    mine.append((next(done), image_id, coco, gt_box))
    finally:
        model.train(was_training)
    # in dataset order, as one process would list them (COCOeval breaks score ties by order)
    every = sorted(item for share in distributed.gather(mine) for item in share)
    image_ids = [image_id for _, image_id, _, _ in every]
    seen = list(seen_cat_ids)

    def score() -> dict[str, Any]:
        results = [result for _, _, coco, _ in every for result in coco]
        metrics = coco_metrics(
            gt_json, results, seen_cat_ids=seen, image_ids=image_ids, train_counts=train_counts
        )
        if prompting:
            metrics["gt_boxes"] = gt_box_metrics(
                gt_json,
                [result for *_, prompted in every for result in prompted],
                seen_cat_ids=seen,
                image_ids=image_ids,
                train_counts=train_counts,
            )
        if keypoint_names:
            metrics["keypoints"] = keypoint_metrics(
                gt_json, results, names=keypoint_names, image_ids=image_ids
            )
        return metrics

    return distributed.broadcast(distributed.on_main(score))


def gt_box_metrics(
    gt: str | os.PathLike | dict,
    results: list[dict[str, Any]],
    *,
    seen_cat_ids: Iterable[int],
    image_ids: Iterable[int] | None = None,
    train_counts: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """metrics.json's "gt_boxes" (see :func:`evaluate_model`) of the masks
    everyseg.engine.gt_boxes.gt_box_results made for the ground-truth boxes of ``gt``."""
    seen_cat_ids = list(seen_cat_ids)
    segm = coco_metrics(
        gt,
        results,
        seen_cat_ids=seen_cat_ids,
        image_ids=image_ids,
        train_counts=train_counts,
        iou_types=("segm",),
    )["segm"]
    dataset = gt if isinstance(gt, dict) else load_ground_truth(gt)
    ious = mask_ious(dataset, results, seen_cat_ids=seen_cat_ids)
    return {"segm": segm, **ious, "protocol": dict(PROTOCOL)}


def _detections(model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict]:
    """The model's per-image detections. An everyseg detector's `detect` leaves masks M x M
    in their boxes, pasted one at a time when encoded, so memory stays bounded whatever the
    image size; other torchvision-style models give full-image masks."""
    detect = getattr(model, "detect", None)
    return detect(images) if callable(detect) else model(images)


def _without_labels(output: dict[str, torch.Tensor], labels: torch.Tensor) -> dict:
    """One image's detections minus those whose label is in ``labels`` (L,)."""
    if not len(labels):
        return output
    keep = ~torch.isin(output["labels"], labels.to(output["labels"].device))  # (N,)
    return {key: value[keep] for key, value in output.items()}


def _collate_pairs(batch: list[tuple[Any, Any]]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """[(image, target), ...] -> ((images...), (targets...)); images differ in size."""
    return tuple(image for image, _ in batch), tuple(target for _, target in batch)


def write_metrics(metrics: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``metrics`` as JSON (indent 2) atomically, non-finite numbers as null."""
    write_json(metrics, path)
