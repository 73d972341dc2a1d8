"""Keypoint AP (OKS) through COCOeval: metrics.json's "keypoints" block.

The score is COCO's: object keypoint similarity OKS = mean over labelled keypoints of
exp(-d^2 / (2 s^2 (2 sigma)^2)), s^2 the object's area, matched as IoU is for boxes at
thresholds 0.50:0.95; areas all / medium / large, 20 detections per image. faster-coco-eval
runs it (pycocotools is the reference, checked equal in tests).

Sigmas (how far a keypoint may stray, relative to the object's size) are looked up by name:
COCO's person keypoints get COCO's own; any other name gets UNIFORM_SIGMA, 0.05, between
COCO's eyes (0.025) and wrists (0.062): strict enough that a few pixels matter on a small
object. Only the keypoint classes (categories whose ground truth lists `keypoints`) and
their detections are scored.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable, Sequence
from typing import Any

import faster_coco_eval
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from everyseg.engine.ap_summary import mean_ap
from everyseg.engine.coco_results import BACKEND, load_ground_truth

# COCO's person keypoint sigmas (cocoapi's COCOeval Params), by name
COCO_SIGMAS = {
    "nose": 0.026,
    **{f"{side}_{part}": sigma for side in ("left", "right") for part, sigma in (
        ("eye", 0.025), ("ear", 0.035), ("shoulder", 0.079), ("elbow", 0.072),
        ("wrist", 0.062), ("hip", 0.107), ("knee", 0.087), ("ankle", 0.089),
    )},
}  # fmt: skip
UNIFORM_SIGMA = 0.05
# (name, OKS threshold or None for the 0.50:0.95 mean, area range index: all, medium, large)
KEYPOINT_STATS = (
    ("AP", None, 0),
    ("AP50", 0.5, 0),
    ("AP75", 0.75, 0),
    ("APm", None, 1),
    ("APl", None, 2),
)


def sigmas_for(names: Sequence[str]) -> list[float]:
    return [COCO_SIGMAS.get(name, UNIFORM_SIGMA) for name in names]


def keypoint_metrics(
    gt: str | os.PathLike | dict,
    results: list[dict[str, Any]],
    *,
    names: Sequence[str],
    image_ids: Iterable[int] | None = None,
    backend: str | None = None,
) -> dict[str, Any] | None:
    """Keypoint AP of `results` (COCO keypoint results: image_id, category_id, score,
    keypoints [x, y, v] * K in `names`' order) against `gt` (annotations of the keypoint
    classes with `keypoints` in the same order and `num_keypoints`; data.index.CocoIndex's
    ground_truth()). Returns ``{"all": {AP, AP50, AP75, APm, APl}, "per_class": {name: AP},
    "classes": [...], "sigmas": {name: sigma}}`` in percent (None where COCO prints -1), or
    None when no category of `gt` lists keypoints.
    """
    dataset = load_ground_truth(gt)
    cats = sorted((c for c in dataset["categories"] if c.get("keypoints")), key=lambda c: c["id"])
    if not cats:
        return None
    cat_ids = {c["id"] for c in cats}
    sigmas = sigmas_for(names)
    gt_part = {
        **dataset,
        "categories": cats,
        "annotations": [a for a in dataset["annotations"] if a["category_id"] in cat_ids],
    }
    scored = [
        {k: r[k] for k in ("image_id", "category_id", "score", "keypoints")}
        for r in results
        if r["category_id"] in cat_ids and "keypoints" in r
    ]
    img_ids = sorted({i["id"] for i in dataset["images"]} if image_ids is None else image_ids)
    precision = _precision(gt_part, scored, sigmas=sigmas, img_ids=img_ids, backend=backend)
    return {
        "all": {name: _mean(precision, iou, area) for name, iou, area in KEYPOINT_STATS},
        "per_class": {c["name"]: mean_ap(precision[:, :, k, 0, -1]) for k, c in enumerate(cats)},
        "classes": [c["name"] for c in cats],
        "sigmas": dict(zip(names, sigmas, strict=True)),
    }


def _mean(precision: np.ndarray, iou: float | None, area: int) -> float | None:
    """COCOeval.summarize's arithmetic: the mean of entries > -1, in percent."""
    thresholds = np.linspace(0.5, 0.95, 10)
    chosen = precision if iou is None else precision[np.isclose(thresholds, iou)]
    return mean_ap(chosen[:, :, :, area, -1])


def _precision(
    dataset: dict, results: list[dict], *, sigmas: list[float], img_ids, backend
) -> np.ndarray:
    """COCOeval's (T, R, K, A, M) precision array of keypoint results."""
    backend = backend or BACKEND
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "pycocotools":
            coco_gt = COCO()
            coco_gt.dataset = dataset  # type: ignore[assignment]
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(results) if results else _empty(dataset)
            evaluator = COCOeval(coco_gt, coco_dt, iouType="keypoints")
        else:
            coco_gt = faster_coco_eval.COCO(dataset, print_function=_quiet)
            evaluator = faster_coco_eval.COCOeval_faster(
                coco_gt,
                coco_gt.loadRes(results),
                iouType="keypoints",
                print_function=_quiet,
                kpt_oks_sigmas=sigmas,
            )
        evaluator.params.kpt_oks_sigmas = np.array(sigmas)
        evaluator.params.imgIds = img_ids
        # every keypoint class, in id order, also those without ground truth here (-1 then)
        evaluator.params.catIds = sorted(c["id"] for c in dataset["categories"])
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator.eval["precision"]


def _empty(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = {**dataset, "annotations": []}  # type: ignore[typeddict-item]
    coco.createIndex()
    return coco


def _quiet(*args: Any, **kwargs: Any) -> None:
    """A print function that prints nothing."""


def format_keypoint_lines(block: dict[str, Any] | None) -> list[str]:
    """metrics.json's "keypoints" block as the evaluate table's closing lines."""
    if not block:
        return []
    cells = "  ".join(
        f"{name} {'-' if value is None else f'{value:.1f}'}" for name, value in block["all"].items()
    )
    return [f"keypoints (OKS) over {', '.join(block['classes'])}: {cells}"]
