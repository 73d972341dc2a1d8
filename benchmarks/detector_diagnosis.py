"""Where a run's detector loses box AP: classification or localisation, which sizes, the RPN.

    python benchmarks/detector_diagnosis.py RUN_DIR [--data VAL.json --images DIR]
        [--max-images N] [--score-thresh 0.3]

Prints, on the val set (default: the run's data.val_json):
- box AP / AP50 / AP75 / APs / APm / APl per class (COCO's) and class-agnostic (every class one
  category, the same detections): the gap between the two is what classification costs;
- the RPN's recall of ground-truth boxes at IoU 0.5 and 0.7 (its test-time proposals), by
  object size, and the ground-truth sizes against the RPN's anchor sizes;
- a confusion matrix of the detections scoring >= --score-thresh matched to a ground-truth
  box at IoU >= 0.5 whatever their classes (greedy by score), and the missed boxes per class.
The last line sums it up.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou
from tqdm import tqdm

from everyseg.data.coco import CocoInstances
from everyseg.engine.load import load_run

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# COCO's area ranges as sqrt(area) in pixels
SIZE_BINS = {"small": (0, 32), "medium": (32, 96), "large": (96, 1e5)}


@torch.inference_mode()
def detections_and_proposals(model, dataset, *, max_images: int):
    """Yields (target, detections, proposals, FPN level of each ground-truth box's RoI, the
    class the box head gives each ground-truth box) per image, boxes in the image's pixels;
    level 0 is P2."""
    for index in tqdm(range(min(len(dataset), max_images)), desc="detect"):
        image, target = dataset[index]
        size = tuple(image.shape[-2:])
        transformed, _ = model.transform([image])
        features = model.backbone(transformed.tensors)
        proposals, _ = model.rpn(transformed, features)
        detections, _ = model.roi_heads(features, proposals, transformed.image_sizes)
        scale = transformed.image_sizes[0]
        gt_boxes = resize_boxes(target["boxes"], size, scale)
        yield (
            target,
            model.transform.postprocess(detections, transformed.image_sizes, [size])[0],
            resize_boxes(proposals[0], scale, size),
            model.roi_heads.box_roi_pool.map_levels([gt_boxes]),
            # the box classifier's most likely foreground class on each ground-truth box
            model.masks_for_boxes([image], [target["boxes"]], paste=False)[0]["labels"],
        )


def box_ap(gt: dict, results: list[dict], *, agnostic: bool) -> dict[str, float]:
    if agnostic:
        gt = copy.deepcopy(gt)
        gt["categories"] = [{"id": 1, "name": "object"}]
        for ann in gt["annotations"]:
            ann["category_id"] = 1
        results = [dict(r, category_id=1) for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results) if results else COCO(), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: 100 * float(v) for name, v in zip(STATS, evaluator.stats[:6], strict=True)}


def _ap(value: float) -> str:
    return f"{value:5.1f}" if value >= 0 else "  n/a"  # COCO's -1: no such objects


def size_name(box: torch.Tensor) -> str:
    side = float(((box[2] - box[0]) * (box[3] - box[1])).clamp(min=0).sqrt())
    return next(name for name, (lo, hi) in SIZE_BINS.items() if lo <= side < hi)


def match(boxes, labels, scores, gt_boxes, gt_labels, *, thresh: float):
    """Greedy by score, class ignored: (gt index, detection index) pairs at IoU >= 0.5."""
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return []
    ious = box_iou(boxes, gt_boxes)
    taken, pairs = set(), []
    for d in torch.argsort(scores, descending=True).tolist():
        if scores[d] < thresh:
            break
        for g in torch.argsort(ious[d], descending=True).tolist():
            if ious[d, g] < 0.5:
                break
            if g not in taken:
                taken.add(g)
                pairs.append((g, d))
                break
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data", help="val COCO JSON (default: the run's data.val_json)")
    parser.add_argument("--images", help="images of --data")
    parser.add_argument("--max-images", type=int, default=10**9)
    parser.add_argument("--score-thresh", type=float, default=0.3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_run(args.run, device="cpu")
    model, data = loaded.model, loaded.config.data
    dataset = CocoInstances(
        json_path=args.data or data.val_json,
        images_dir=args.images or data.val_images,
        mask_classes="all",
    )
    names = dataset.class_names
    k = len(names)
    confusion = np.zeros((k, k + 1), dtype=int)  # true class x (predicted class | missed)
    recall = {t: {s: [0, 0] for s in SIZE_BINS} for t in (0.5, 0.7)}
    sides, results, image_ids, levels = [], [], [], []
    gt_box_right = 0
    for target, det, proposals, gt_levels, gt_box_labels in detections_and_proposals(
        model, dataset, max_images=args.max_images
    ):
        image_id = int(target["image_id"])
        image_ids.append(image_id)
        levels += gt_levels.tolist()
        gt_box_right += int((gt_box_labels == target["labels"]).sum())
        gt_boxes, gt_labels = target["boxes"], target["labels"]
        sides += [float(((b[2] - b[0]) * (b[3] - b[1])).sqrt()) for b in gt_boxes]
        best = box_iou(gt_boxes, proposals).max(1).values if len(proposals) else None
        for g, box in enumerate(gt_boxes):
            for t in recall:
                hit = best is not None and bool(best[g] >= t)
                recall[t][size_name(box)][0] += hit
                recall[t][size_name(box)][1] += 1
        for box, label, score in zip(det["boxes"], det["labels"], det["scores"], strict=True):
            x0, y0, x1, y1 = box.tolist()
            results.append(
                {
                    "image_id": image_id,
                    "category_id": dataset.label_to_cat_id[int(label)],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(score),
                }
            )
        pairs = match(
            det["boxes"], det["labels"], det["scores"], gt_boxes, gt_labels,
            thresh=args.score_thresh,
        )  # fmt: skip
        matched = {g for g, _ in pairs}
        for g, d in pairs:
            confusion[gt_labels[g] - 1, det["labels"][d] - 1] += 1
        for g in set(range(len(gt_boxes))) - matched:
            confusion[gt_labels[g] - 1, k] += 1
    gt = dataset.ground_truth()
    gt = dict(gt, images=[im for im in gt["images"] if im["id"] in set(image_ids)])
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in set(image_ids)]
    per_class = box_ap(gt, results, agnostic=False)
    agnostic = box_ap(gt, results, agnostic=True)
    print(f"\nrun {args.run} (step {loaded.step}), {len(image_ids)} val images")
    print("box AP          " + "  ".join(f"{s:>5}" for s in STATS))
    for name, stats in (("per class", per_class), ("class-agnostic", agnostic)):
        print(f"{name:<16}" + "  ".join(_ap(stats[s]) for s in STATS))
    counts = {s: recall[0.5][s][1] for s in SIZE_BINS}
    print("\nRPN recall      " + "  ".join(f"{s} ({counts[s]})" for s in SIZE_BINS))
    for t in recall:
        print(
            f"  IoU >= {t}     "
            + "  ".join(f"{recall[t][s][0] / max(recall[t][s][1], 1):.3f}" for s in SIZE_BINS)
        )
    q = np.percentile(sides, [0, 10, 50, 90, 100])
    anchors = loaded.config.model.rpn.anchor_sizes
    print(f"\nGT sqrt(area) px: min {q[0]:.0f} p10 {q[1]:.0f} median {q[2]:.0f} "
          f"p90 {q[3]:.0f} max {q[4]:.0f}; RPN anchor sizes {anchors}")  # fmt: skip
    print(
        f"class accuracy on ground-truth boxes (box head, localisation given): "
        f"{gt_box_right / max(len(sides), 1):.3f} of {len(sides)}"
    )
    share = np.bincount(np.asarray(levels, dtype=int), minlength=4) / max(len(levels), 1)
    print("RoI level of the GT boxes (box head's pooler): " + "  ".join(
        f"P{i + 2} {v:.0%}" for i, v in enumerate(share)
    ))  # fmt: skip
    print(f"\nconfusion of detections with score >= {args.score_thresh} matched at IoU >= 0.5")
    short = [n[:5] for n in names]
    print(f"{'true/pred':<12}" + "".join(f"{n:>6}" for n in short) + "  missed")
    for i, name in enumerate(names):
        print(
            f"{name:<12}" + "".join(f"{v:6d}" for v in confusion[i, :k]) + f"{confusion[i, k]:8d}"
        )
    found = confusion[:, :k].sum()
    right = np.trace(confusion[:, :k])
    missed = confusion[:, k].sum()
    print(
        f"\nsummary: box AP {per_class['AP']:.1f} (AP50 {per_class['AP50']:.1f}), class-agnostic "
        f"{agnostic['AP']:.1f} (AP50 {agnostic['AP50']:.1f}); RPN recall@0.5 "
        f"{sum(r[0] for r in recall[0.5].values()) / max(sum(counts.values()), 1):.3f}; "
        f"class accuracy on GT boxes {gt_box_right / max(len(sides), 1):.3f}; "
        f"matched detections labelled right {right}/{found}, GT missed {missed}/{found + missed}"
    )


if __name__ == "__main__":
    main()
