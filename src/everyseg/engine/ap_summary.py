"""COCOeval's precision array summarised as metrics.json's numbers: the six summary APs of
a set of classes, the precision-recall curve, AP by class-frequency bucket (percent; None where
COCO would print -1)."""

from __future__ import annotations

from typing import Any

import numpy as np

from everyseg.data.lvis import FREQUENCIES
from everyseg.engine import lvis_rules

# Summary numbers as (name, IoU threshold or None for the 0.50:0.95 mean, area range index);
# all at the last maxDets (100; LVIS: 300), as in COCOeval.summarize().
SUMMARY_STATS = (
    ("AP", None, 0),
    ("AP50", 0.5, 0),
    ("AP75", 0.75, 0),
    ("APs", None, 1),
    ("APm", None, 2),
    ("APl", None, 3),
)
STAT_NAMES = tuple(name for name, _, _ in SUMMARY_STATS)
PR_CURVE_IOU = 0.5
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCOeval's recall thresholds (params.recThrs)


def by_frequency_block(
    precision: np.ndarray, iou_thrs: np.ndarray, cats: list[dict], buckets: lvis_rules.Buckets
) -> dict[str, Any]:
    """The summary APs of each frequency bucket; AP_r / AP_c / AP_f too for LVIS's own."""
    of_category = [buckets.of_category.get(c["id"]) for c in cats]
    by_frequency = {
        bucket: summarize(precision, iou_thrs, np.array([b == bucket for b in of_category]))
        for bucket in FREQUENCIES
    }
    block: dict[str, Any] = {"by_frequency": by_frequency}
    if buckets.by == "lvis_frequency":
        block |= {f"AP_{bucket}": by_frequency[bucket]["AP"] for bucket in FREQUENCIES}
    return block


def bucket_summary(cats: list[dict], buckets: lvis_rules.Buckets) -> dict[str, Any]:
    counts = {bucket: 0 for bucket in FREQUENCIES}
    for c in cats:
        if c["id"] in buckets.of_category:
            counts[buckets.of_category[c["id"]]] += 1
    return {"by": buckets.by, "rule": buckets.rule, "classes": counts}


def summarize(
    precision: np.ndarray, iou_thrs: np.ndarray, cat_mask: np.ndarray
) -> dict[str, float | None]:
    """The six COCO summary APs over the categories selected by ``cat_mask`` (K,) bool.

    Same arithmetic as COCOeval.summarize(): mean of the precision entries > -1.
    """
    summary = {}
    for name, iou, area in SUMMARY_STATS:
        p = precision[:, :, cat_mask, area, -1]
        if iou is not None:
            p = p[np.isclose(iou_thrs, iou)]
        summary[name] = mean_ap(p)
    return summary


def pr_curve(precision: np.ndarray, iou_thrs: np.ndarray, is_seen: np.ndarray) -> dict[str, Any]:
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


def mean_ap(precision: np.ndarray) -> float | None:
    """Mean of the valid (> -1) precision entries in percent, or None if there are none."""
    valid = precision[precision > -1]
    return float(valid.mean() * 100) if valid.size else None
