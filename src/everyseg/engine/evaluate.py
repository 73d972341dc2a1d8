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

from everyseg.data.lvis import FREQUENCIES
from everyseg.engine import distributed, lvis_rules
from everyseg.engine.coco_results import (
    IouType,
    ground_truth_for,
    load_ground_truth,
    precision_array,
    to_coco_results,
)
from everyseg.engine.files import write_json
from everyseg.engine.metrics_table import format_metrics_table
from everyseg.engine.precision import autocast, outputs_to_float32

__all__ = [
    "coco_metrics",
    "evaluate_model",
    "format_metrics_table",
    "to_coco_results",
    "write_metrics",
]

IOU_TYPES: tuple[IouType, ...] = ("segm", "bbox")
# Summary numbers as (name, IoU threshold or None for the 0.50:0.95 mean, area range index);
# all at the last maxDets (100; LVIS: 300), as in COCOeval.summarize().
_SUMMARY = (
    ("AP", None, 0),
    ("AP50", 0.5, 0),
    ("AP75", 0.75, 0),
    ("APs", None, 1),
    ("APm", None, 2),
    ("APl", None, 3),
)
STAT_NAMES = tuple(name for name, _, _ in _SUMMARY)
PR_CURVE_IOU = 0.5
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCOeval's recall thresholds (params.recThrs)


def coco_metrics(
    gt: str | os.PathLike | dict,
    results: list[dict[str, Any]],
    *,
    seen_cat_ids: Iterable[int],
    image_ids: Iterable[int] | None = None,
    train_counts: Mapping[str, int] | None = None,
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

    Returns:
        The metrics.json dict: ``{"segm"|"bbox": {"all"|"seen"|"unseen": {AP, AP50, AP75, APs,
        APm, APl}, "per_class": {name: AP}, "pr_curve": {iou, recall, all, seen, unseen}},
        "seen_classes", "unseen_classes", "images"}`` (``pr_curve``: see :func:`_pr_curve`).
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
    for iou_type in IOU_TYPES:
        precision, iou_thrs = precision_array(
            ground_truth_for(dataset, iou_type=iou_type),
            _results_for(results, iou_type=iou_type),
            iou_type=iou_type,
            img_ids=img_ids,
            federated=federated,
        )
        metrics[iou_type] = {
            "all": _summarize(precision, iou_thrs, np.ones_like(is_seen)),
            "seen": _summarize(precision, iou_thrs, is_seen),
            "unseen": _summarize(precision, iou_thrs, ~is_seen),
            "per_class": {
                c["name"]: _mean_ap(precision[:, :, k, 0, -1]) for k, c in enumerate(cats)
            },
            "pr_curve": _pr_curve(precision, iou_thrs, is_seen),
        }
        if buckets is not None:
            metrics[iou_type] |= _by_frequency(precision, iou_thrs, cats, buckets)
    metrics["seen_classes"] = [c["name"] for c in cats if c["id"] in seen]
    metrics["unseen_classes"] = [c["name"] for c in cats if c["id"] not in seen]
    metrics["images"] = len(img_ids)
    if buckets is not None:
        metrics["frequency_buckets"] = _bucket_summary(cats, buckets)
        metrics["class_frequency"] = {
            c["name"]: buckets.of_category[c["id"]] for c in cats if c["id"] in buckets.of_category
        }
    if federated:
        metrics["lvis"] = {
            "federated": True,
            "max_detections_per_image": lvis_rules.MAX_DETS_PER_IMAGE,
        }
    return metrics


def _by_frequency(
    precision: np.ndarray, iou_thrs: np.ndarray, cats: list[dict], buckets: lvis_rules.Buckets
) -> dict[str, Any]:
    """The summary APs of each frequency bucket; AP_r / AP_c / AP_f too for LVIS's own."""
    of_category = [buckets.of_category.get(c["id"]) for c in cats]
    by_frequency = {
        bucket: _summarize(precision, iou_thrs, np.array([b == bucket for b in of_category]))
        for bucket in FREQUENCIES
    }
    block: dict[str, Any] = {"by_frequency": by_frequency}
    if buckets.by == "lvis_frequency":
        block |= {f"AP_{bucket}": by_frequency[bucket]["AP"] for bucket in FREQUENCIES}
    return block


def _bucket_summary(cats: list[dict], buckets: lvis_rules.Buckets) -> dict[str, Any]:
    counts = {bucket: 0 for bucket in FREQUENCIES}
    for c in cats:
        if c["id"] in buckets.of_category:
            counts[buckets.of_category[c["id"]]] += 1
    return {"by": buckets.by, "rule": buckets.rule, "classes": counts}


def _results_for(results: list[dict[str, Any]], *, iou_type: str) -> list[dict[str, Any]]:
    """Fresh result dicts carrying only the geometry ``iou_type`` scores.

    loadRes takes a result with a ``bbox`` as a box result and gives it the box area, which
    would put masks in the wrong small/medium/large bin; so segm results carry no box. Fresh
    dicts also keep loadRes from writing ``id``/``area`` into the caller's results.
    """
    key = "segmentation" if iou_type == "segm" else "bbox"
    fields = ("image_id", "category_id", "score", key)
    return [{f: r[f] for f in fields} for r in results if key in r]


def _summarize(
    precision: np.ndarray, iou_thrs: np.ndarray, cat_mask: np.ndarray
) -> dict[str, float | None]:
    """The six COCO summary APs over the categories selected by ``cat_mask`` (K,) bool.

    Same arithmetic as COCOeval.summarize(): mean of the precision entries > -1.
    """
    summary = {}
    for name, iou, area in _SUMMARY:
        p = precision[:, :, cat_mask, area, -1]
        if iou is not None:
            p = p[np.isclose(iou_thrs, iou)]
        summary[name] = _mean_ap(p)
    return summary


def _pr_curve(precision: np.ndarray, iou_thrs: np.ndarray, is_seen: np.ndarray) -> dict[str, Any]:
    """The precision-recall curve at IoU 0.5 of all / seen / unseen classes: at each of
    COCO's 101 recall points, the precision (0..1) averaged over the classes with ground truth,
    or None where a subset has none. Their mean over recall points is that subset's AP50."""
    at_half = precision[np.isclose(iou_thrs, PR_CURVE_IOU)][0, :, :, 0, -1]  # (R, K)
    curve: dict[str, Any] = {"iou": PR_CURVE_IOU, "recall": RECALL_POINTS.round(2).tolist()}
    for subset, cat_mask in (
        ("all", np.ones_like(is_seen)),
        ("seen", is_seen),
        ("unseen", ~is_seen),
    ):
        p = at_half[:, cat_mask & (at_half > -1).any(axis=0)]  # (R, classes with ground truth)
        curve[subset] = p.mean(axis=1).round(4).tolist() if p.shape[1] else None
    return curve


def _mean_ap(precision: np.ndarray) -> float | None:
    """Mean of the valid (> -1) precision entries in percent, or None if there are none."""
    valid = precision[precision > -1]
    return float(valid.mean() * 100) if valid.size else None


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

    Only the images in ``dataset`` are evaluated (``metrics["images"]`` counts them).
    Inside a process group (under torchrun) rank r of W runs images r, r + W, ...; rank 0
    scores them all, in dataset order, and every rank returns the metrics.
    """
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
    mine: list[tuple[int, int, list[dict[str, Any]]]] = []  # (position, image id, results)
    ignore = torch.tensor(sorted(set(ignore_labels)), dtype=torch.int64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            done = iter(positions)
            bar = tqdm(loader, desc="evaluate", disable=not (progress and distributed.is_main()))
            for images, targets in bar:
                with autocast(device, precision):
                    outputs = _detections(
                        model, [image.to(device, non_blocking=True) for image in images]
                    )
                outputs = outputs_to_float32(outputs)
                for output, image, target in zip(outputs, images, targets, strict=True):
                    image_id = int(target["image_id"])
                    output = _without_labels(output, ignore)
                    coco = to_coco_results(
                        output,
                        image_id=image_id,
                        label_to_cat_id=label_to_cat_id,
                        image_size=(image.shape[-2], image.shape[-1]),
                    )
                    mine.append((next(done), image_id, coco))
    finally:
        model.train(was_training)
    # in dataset order, as one process would list them (COCOeval breaks score ties by order)
    every = sorted(item for share in distributed.gather(mine) for item in share)
    results = [result for _, _, coco in every for result in coco]
    image_ids = [image_id for _, image_id, _ in every]
    metrics = distributed.on_main(
        lambda: coco_metrics(
            gt_json,
            results,
            seen_cat_ids=seen_cat_ids,
            image_ids=image_ids,
            train_counts=train_counts,
        )
    )
    return distributed.broadcast(metrics)


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
