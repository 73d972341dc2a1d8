"""COCO box and mask AP on all / seen / unseen classes and per class (metrics.json of DESIGN.md).

"seen" classes had masks in training, "unseen" ones only boxes. All numbers are AP in percent as
COCO tables print them; a number that has no ground truth to be measured on is ``None``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from everyseg.engine import distributed
from everyseg.engine.coco_results import (
    IouType,
    ground_truth_for,
    load_ground_truth,
    precision_array,
    to_coco_results,
)
from everyseg.engine.files import write_json
from everyseg.engine.precision import autocast, outputs_to_float32

__all__ = [
    "coco_metrics",
    "evaluate_model",
    "format_metrics_table",
    "to_coco_results",
    "write_metrics",
]

IOU_TYPES: tuple[IouType, ...] = ("segm", "bbox")
SUBSETS = ("all", "seen", "unseen")
# Summary numbers as (name, IoU threshold or None for the 0.50:0.95 mean, area range index);
# all at maxDets=100, as in COCOeval.summarize().
_SUMMARY = (
    ("AP", None, 0),
    ("AP50", 0.5, 0),
    ("AP75", 0.75, 0),
    ("APs", None, 1),
    ("APm", None, 2),
    ("APl", None, 3),
)
STAT_NAMES = tuple(name for name, _, _ in _SUMMARY)


def coco_metrics(
    gt: str | os.PathLike | dict,
    results: list[dict[str, Any]],
    *,
    seen_cat_ids: Iterable[int],
    image_ids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """COCO segm and bbox AP, split into all / seen / unseen classes and per class.

    Args:
        gt: COCO JSON path or loaded dict (not modified).
        results: COCO result dicts as made by :func:`to_coco_results`; those without
            ``segmentation`` count only for bbox (a box-only model scores 0 segm AP).
        seen_cat_ids: category ids that had masks in training; every other category is unseen.
        image_ids: evaluate only these images (default: every image of ``gt``), e.g. when the
            model ran on a subset; images without predictions count as having none.

    Returns:
        The metrics.json dict: ``{"segm"|"bbox": {"all"|"seen"|"unseen": {AP, AP50, AP75, APs,
        APm, APl}, "per_class": {name: AP}}, "seen_classes", "unseen_classes", "images"}``.
        A value is ``None`` where COCO would print -1 (no ground truth in that class / subset /
        area range), e.g. a class absent from the val set.
    """
    dataset = load_ground_truth(gt)
    cats = sorted(dataset["categories"], key=lambda c: c["id"])
    seen = set(seen_cat_ids)
    unknown = seen - {c["id"] for c in cats}
    if unknown:
        raise ValueError(f"seen_cat_ids {sorted(unknown)} are not categories of the ground truth")
    img_ids = sorted({img["id"] for img in dataset["images"]} if image_ids is None else image_ids)
    # COCOeval orders categories by id; `cats` is sorted the same way, so index k matches.
    is_seen = np.array([c["id"] in seen for c in cats], dtype=bool)
    metrics: dict[str, Any] = {}
    for iou_type in IOU_TYPES:
        precision, iou_thrs = precision_array(
            ground_truth_for(dataset, iou_type=iou_type),
            _results_for(results, iou_type=iou_type),
            iou_type=iou_type,
            img_ids=img_ids,
        )
        metrics[iou_type] = {
            "all": _summarize(precision, iou_thrs, np.ones_like(is_seen)),
            "seen": _summarize(precision, iou_thrs, is_seen),
            "unseen": _summarize(precision, iou_thrs, ~is_seen),
            "per_class": {
                c["name"]: _mean_ap(precision[:, :, k, 0, -1]) for k, c in enumerate(cats)
            },
        }
    metrics["seen_classes"] = [c["name"] for c in cats if c["id"] in seen]
    metrics["unseen_classes"] = [c["name"] for c in cats if c["id"] not in seen]
    metrics["images"] = len(img_ids)
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
        lambda: coco_metrics(gt_json, results, seen_cat_ids=seen_cat_ids, image_ids=image_ids)
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


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """A printable table: summary APs for all/seen/unseen x segm/bbox, then per-class AP."""
    name_width = max([len(n) for n in metrics["segm"]["per_class"]] + [len("segm unseen")])
    lines = [
        f"{metrics['images']} images; {len(metrics['seen_classes'])} seen classes, "
        f"{len(metrics['unseen_classes'])} unseen",
        f"{'':<{name_width}} " + " ".join(f"{s:>6}" for s in STAT_NAMES),
    ]
    for iou_type in IOU_TYPES:
        for subset in SUBSETS:
            row = metrics[iou_type][subset]
            label = f"{iou_type} {subset}"
            lines.append(f"{label:<{name_width}} " + " ".join(_cell(row[s]) for s in STAT_NAMES))
    lines.append("")
    lines.append(f"{'class':<{name_width}} {'segm':>6} {'bbox':>6}  (AP; * = seen)")
    seen = set(metrics["seen_classes"])
    for name, segm_ap in metrics["segm"]["per_class"].items():
        mark = "*" if name in seen else " "
        bbox_ap = metrics["bbox"]["per_class"][name]
        lines.append(f"{name:<{name_width}} {_cell(segm_ap)} {_cell(bbox_ap)}  {mark}".rstrip())
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    """One table cell: AP with one decimal as COCO prints it, '-' when not measurable."""
    return f"{'-':>6}" if value is None else f"{value:6.1f}"


def write_metrics(metrics: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``metrics`` as JSON (indent 2) atomically, non-finite numbers as null."""
    write_json(metrics, path)
