"""COCO glue for evaluation: model outputs -> results, ground truth -> evaluable, COCOeval runs.

Predictions become COCO result dicts (xywh boxes, compressed RLE masks). Ground truth is
normalised per evaluation type; for mask evaluation, box-only annotations (partial supervision)
become ignore regions, see :func:`ground_truth_for`. :func:`precision_array` runs COCOeval with
faster-coco-eval (same numbers as pycocotools, the reference, checked in tests; faster, and
it has LVIS's federated rules), or with pycocotools on request.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Iterable
from typing import Any, Literal, cast

import faster_coco_eval
import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from everyseg.data.segmentation import usable_segmentation
from everyseg.engine import lvis_rules
from everyseg.modeling.paste import Region, pasted_crops

BACKEND = "faster_coco_eval"
# Categories scored per evaluator pass. Both evaluators keep per (image, category) state, so a
# 3,000-class val set in one pass costs GBs; per-category APs do not depend on the others.
CATEGORIES_PER_PASS = 500
IouType = Literal["bbox", "segm"]


def to_coco_results(
    outputs: dict[str, torch.Tensor],
    *,
    image_id: int,
    label_to_cat_id: dict[int, int],
    mask_threshold: float = 0.5,
    image_size: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Turn one image's detections (torchvision convention) into COCO result dicts.

    Args:
        outputs: ``boxes`` (N, 4) xyxy in image pixels, ``labels`` (N,) contiguous 1..K,
            ``scores`` (N,), optional ``masks`` (N, 1, H, W) or (N, H, W) probabilities, or
            ``box_masks`` (N, 1, M, M) probabilities in the boxes (a detector's ``detect``),
            pasted one at a time into the same pixels, optional ``keypoints`` (N, K, 3).
        image_id: COCO image id the detections belong to.
        label_to_cat_id: contiguous label -> COCO category id.
        mask_threshold: a pixel is foreground when its probability is above this.
        image_size: (H, W) of the image, needed with ``box_masks``.

    Returns:
        N dicts with ``image_id``, ``category_id``, ``score``, ``bbox`` ([x, y, w, h] floats) and,
        when masks are present, ``segmentation`` (compressed RLE, ``counts`` as str), when
        keypoints are, ``keypoints`` ([x, y, v] * K, COCO's keypoint result).
    """
    boxes = outputs["boxes"].detach().float().cpu()
    labels = outputs["labels"].detach().cpu().tolist()
    scores = outputs["scores"].detach().float().cpu().tolist()
    unknown = sorted(set(labels) - set(label_to_cat_id))
    if unknown:
        raise ValueError(f"labels {unknown} have no entry in label_to_cat_id")
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    results = [
        {
            "image_id": int(image_id),
            "category_id": label_to_cat_id[label],
            "score": score,
            "bbox": box,
        }
        for label, score, box in zip(labels, scores, xywh, strict=True)
    ]
    rles = _segmentations(outputs, threshold=mask_threshold, image_size=image_size)
    if rles is not None:
        for result, rle in zip(results, rles, strict=True):
            result["segmentation"] = rle
    if "keypoints" in outputs:
        points = outputs["keypoints"].detach().float().cpu().flatten(1).tolist()  # (N, 3K)
        for result, values in zip(results, points, strict=True):
            result["keypoints"] = values
    return results


def _segmentations(
    outputs: dict[str, torch.Tensor], *, threshold: float, image_size: tuple[int, int] | None
) -> list[dict[str, Any]] | None:
    """The RLEs of one image's full-image "masks" or in-box "box_masks", None without masks."""
    if "masks" in outputs:
        return encode_masks(outputs["masks"], threshold=threshold)
    if "box_masks" not in outputs:
        return None
    if image_size is None:
        raise ValueError("box_masks need the image_size to be pasted into")
    crops = pasted_crops(outputs["box_masks"].detach(), outputs["boxes"].detach(), image_size)
    # threshold on the masks' device, one mask at a time: only its bool crop moves
    binary = ((region, (probs > threshold).cpu().numpy()) for region, probs in crops)
    return encode_crops(binary, image_size=image_size)


def encode_crops(
    crops: Iterable[tuple[Region, np.ndarray]], *, image_size: tuple[int, int]
) -> list[dict[str, Any]]:
    """Masks of an (H, W) image given as their regions (x0, y0, x1, y1) and the (y1 - y0,
    x1 - x0) bool crops there (background elsewhere) -> compressed RLEs, ``counts`` as str.

    One (H, W) byte plane is reused for every mask: memory stays one mask's whatever N is.
    """
    plane = np.zeros(image_size, dtype=np.uint8, order="F")
    rles = []
    for (x0, y0, x1, y1), crop in crops:
        plane[y0:y1, x0:x1] = crop
        # (H, W, 1) in, a list of one RLE out (pycocotools' stubs type only the (H, W) form)
        (rle,) = cast(list[dict[str, Any]], mask_util.encode(plane[:, :, None]))
        rle["counts"] = rle["counts"].decode("ascii")
        rles.append(rle)
        plane[y0:y1, x0:x1] = 0
    return rles


def encode_masks(masks: torch.Tensor, *, threshold: float = 0.5) -> list[dict[str, Any]]:
    """Threshold (N, 1, H, W) or (N, H, W) probabilities into N compressed RLEs.

    ``counts`` is decoded to str so the result is JSON-serialisable.
    """
    if masks.dim() == 4:
        masks = masks[:, 0]
    # Threshold on the masks' own device: moving uint8 to the host is 4x less than floats.
    binary = (masks.detach() > threshold).to(torch.uint8).cpu().numpy()
    # pycocotools wants (H, W, N) in Fortran order, and then returns a list (its stubs type
    # only the (H, W) form, which returns one RLE).
    encoded = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    rles = cast(list[dict[str, Any]], encoded)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def load_ground_truth(gt: str | os.PathLike | dict) -> dict[str, Any]:
    """Read a COCO JSON path, or deep-copy an already-loaded dict (the evaluators mutate it)."""
    if isinstance(gt, dict):
        return copy.deepcopy(gt)
    with open(gt) as f:
        return json.load(f)


def ground_truth_for(dataset: dict[str, Any], *, iou_type: IouType) -> dict[str, Any]:
    """A COCO dataset dict ready for ``COCOeval`` of ``iou_type`` ("bbox" or "segm").

    Annotations are shallow-copied (the evaluators write ``ignore``/RLE fields into them), so
    ``dataset`` is not changed. Missing ``iscrowd`` defaults to 0 and missing ``area`` to the box
    area, as COCOeval needs both.

    For "bbox", every annotation is ordinary COCO ground truth. For "segm", an annotation without
    a usable mask (box-only, as partial supervision allows) cannot be scored, so it becomes an
    ignore region: its box as a polygon with ``iscrowd=1``. COCOeval then matches detections to
    it by intersection over the detection's area and drops them from the count, so a prediction
    on a box-only object is neither rewarded nor penalised, and the object is not a missed GT.
    """
    sizes = {img["id"]: (img["height"], img["width"]) for img in dataset["images"]}
    anns = []
    for ann in dataset["annotations"]:
        ann = dict(ann)
        x, y, w, h = ann["bbox"]
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", w * h)
        if iou_type == "segm":
            height, width = sizes[ann["image_id"]]
            segm = usable_segmentation(ann.get("segmentation"), height=height, width=width)
            if segm is None:
                segm = [[x, y, x + w, y, x + w, y + h, x, y + h]]
                ann["iscrowd"] = 1
            ann["segmentation"] = segm
        anns.append(ann)
    return {**dataset, "annotations": anns}


def precision_array(
    dataset: dict[str, Any],
    results: list[dict[str, Any]],
    *,
    iou_type: IouType,
    img_ids: list[int],
    federated: bool = False,
    backend: str | None = None,
    categories_per_pass: int = CATEGORIES_PER_PASS,
) -> tuple[np.ndarray, np.ndarray]:
    """Run COCOeval on ``img_ids``; return its precision array (T, R, K, A, M) and IoU thresholds.

    K follows the ground truth's category ids in increasing order; A is (all, small, medium,
    large); M is maxDets (1, 10, 100; with ``federated``, LVIS's rules, 1, 10, 300); entries
    without ground truth are -1. ``dataset`` and ``results`` are written into (RLEs, ids): pass
    fresh ones. ``backend`` defaults to BACKEND; only faster-coco-eval has LVIS's rules.
    Categories are scored ``categories_per_pass`` at a time, which bounds memory.
    """
    backend = backend or BACKEND
    if federated:
        if backend != "faster_coco_eval":
            raise ValueError(f"LVIS's federated rules need faster-coco-eval, not {backend}")
        evaluator = _faster_coco_eval(dataset, results, iou_type=iou_type, federated=True)
        evaluator.params.maxDets = [1, 10, lvis_rules.MAX_DETS_PER_IMAGE]
    else:
        run = {"pycocotools": _pycocotools_eval, "faster_coco_eval": _faster_coco_eval}
        evaluator = run[backend](dataset, results, iou_type=iou_type)
    evaluator.params.imgIds = img_ids
    cat_ids = sorted(evaluator.params.catIds)
    passes = [
        cat_ids[i : i + categories_per_pass] for i in range(0, len(cat_ids), categories_per_pass)
    ]
    precisions = []
    # pycocotools prints progress; callers print the table they want.
    with contextlib.redirect_stdout(io.StringIO()):
        for categories in passes or [cat_ids]:
            evaluator.params.catIds = categories
            evaluator.evaluate()
            evaluator.accumulate()
            precisions.append(evaluator.eval["precision"])  # (T, R, K of this pass, A, M)
    return np.concatenate(precisions, axis=2), evaluator.params.iouThrs


def _pycocotools_eval(
    dataset: dict[str, Any], results: list[dict[str, Any]], *, iou_type: IouType
) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = _indexed_coco(dataset)
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # pycocotools' loadRes fails on an empty list
            coco_dt = _indexed_coco({**dataset, "annotations": []})
    return COCOeval(coco_gt, coco_dt, iouType=iou_type)


def _indexed_coco(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    # parsed JSON: a plain dict, where pycocotools' stubs want their own TypedDict
    coco.dataset = dataset  # type: ignore[assignment]
    coco.createIndex()
    return coco


def _faster_coco_eval(
    dataset: dict[str, Any],
    results: list[dict[str, Any]],
    *,
    iou_type: IouType,
    federated: bool = False,
) -> Any:
    # Its loadRes handles an empty list; its messages go to logging unless silenced here.
    coco_gt = faster_coco_eval.COCO(dataset, print_function=_quiet)
    coco_dt = coco_gt.loadRes(results)
    return _COCOevalFaster(
        coco_gt, coco_dt, iouType=iou_type, print_function=_quiet, lvis_style=federated
    )


class _COCOevalFaster(faster_coco_eval.COCOeval_faster):
    def _prepare_freq_group(self) -> list[list[int]]:
        # Its LVIS mode groups classes by frequency for its own summary, failing on a category
        # without one; everyseg buckets classes itself (lvis_rules.class_buckets).
        return [[] for _ in self.params.img_count_lbl]


def _quiet(*args: Any, **kwargs: Any) -> None:
    """A print function that prints nothing."""
