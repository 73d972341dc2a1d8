"""Time and peak memory of evaluating a 3,000-class model: faster-coco-eval vs pycocotools.

A synthetic ground truth (default 500 images of 320 x 240, 8 masked objects each, classes drawn
Zipf-like from 3,000, so some classes are frequent and most rare) and a model's results on it
(100 detections per image with RLE masks, as a detector keeping its top 100 gives: a jittered
hit and two wrong-class copies per object, the rest anywhere) are written to JSON once. Each
variant then runs `everyseg.engine.evaluate.coco_metrics` (segm and bbox, per class, seen /
unseen) in a fresh child process, which reports the wall time of the call and its peak RSS
(ru_maxrss) minus its RSS before the call (ground truth path and results loaded):

- pycocotools: the reference COCOeval;
- faster-coco-eval: everyseg's default;
- faster-coco-eval LVIS: the same files with LVIS's fields (frequencies, 20 verified-absent
  classes per image), scored with the federated rules.

    python benchmarks/eval_scaling.py [--images 500] [--classes 3000] [--variants ...]

The last line prints every variant's figures and the time ratio pycocotools / faster-coco-eval.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_util

WIDTH, HEIGHT = 320, 240
OBJECTS, DETECTIONS = 8, 100
NEG_PER_IMAGE = 20
VARIANTS = ("pycocotools", "faster_coco_eval", "faster_coco_eval_lvis")


def _box(rng: np.random.Generator) -> list[float]:
    w, h = rng.uniform(8, WIDTH / 3), rng.uniform(8, HEIGHT / 3)
    return [float(rng.uniform(0, WIDTH - w)), float(rng.uniform(0, HEIGHT - h)), w, h]


def _ellipse(box: list[float]) -> list[list[float]]:
    """A 16-point polygon inscribed in the box: masks that are not their boxes."""
    x, y, w, h = box
    t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    xs, ys = x + w / 2 * (1 + np.cos(t)), y + h / 2 * (1 + np.sin(t))
    return [np.stack([xs, ys], 1).ravel().round(2).tolist()]


def _rle(polygon: list[list[float]]) -> dict:
    rle = mask_util.merge(mask_util.frPyObjects(polygon, HEIGHT, WIDTH))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _jitter(box: list[float], rng: np.random.Generator, scale: float) -> list[float]:
    x, y, w, h = (v + rng.normal(0, scale) for v in box)
    return [max(x, 0.0), max(y, 0.0), max(w, 2.0), max(h, 2.0)]


def make_files(folder: Path, *, images: int, classes: int, seed: int = 0) -> None:
    """gt.json, gt_lvis.json and results.json under `folder`."""
    rng = np.random.default_rng(seed)
    # Zipf-like class frequencies: class k drawn with weight 1 / (k + 1)
    weights = 1.0 / np.arange(1, classes + 1)
    weights /= weights.sum()
    gt: dict = {"images": [], "annotations": [], "categories": []}
    gt["categories"] = [{"id": k, "name": f"class {k}"} for k in range(1, classes + 1)]
    results = []
    for image_id in range(1, images + 1):
        gt["images"].append({"id": image_id, "width": WIDTH, "height": HEIGHT})
        dets = []
        for cat in rng.choice(classes, size=OBJECTS, p=weights) + 1:
            box = _box(rng)
            polygon = _ellipse(box)
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": int(cat),
                    "bbox": box,
                    "area": float(mask_util.area(_rle_bytes(polygon))),
                    "iscrowd": 0,
                    "segmentation": polygon,
                }
            )
            dets.append((int(cat), _jitter(box, rng, 2.0), float(rng.uniform(0.3, 1))))
            for wrong in rng.integers(1, classes + 1, size=2):
                dets.append((int(wrong), _jitter(box, rng, 4.0), float(rng.uniform(0, 0.6))))
        while len(dets) < DETECTIONS:
            cat = int(rng.choice(classes, p=weights)) + 1
            dets.append((cat, _box(rng), float(rng.uniform(0, 0.5))))
        for cat, box, score in dets:
            results.append(
                {
                    "image_id": image_id,
                    "category_id": cat,
                    "score": score,
                    "bbox": box,
                    "segmentation": _rle(_ellipse(box)),
                }
            )
    (folder / "gt.json").write_text(json.dumps(gt))
    (folder / "results.json").write_text(json.dumps(results))
    counts = np.bincount([a["category_id"] for a in gt["annotations"]], minlength=classes + 1)
    for cat in gt["categories"]:
        n = counts[cat["id"]]
        cat["frequency"] = "r" if n <= 10 else "c" if n <= 100 else "f"
    for img in gt["images"]:
        img["neg_category_ids"] = (rng.choice(classes, NEG_PER_IMAGE, replace=False) + 1).tolist()
        img["not_exhaustive_category_ids"] = []
    (folder / "gt_lvis.json").write_text(json.dumps(gt))


def _rle_bytes(polygon: list[list[float]]) -> dict:
    return mask_util.merge(mask_util.frPyObjects(polygon, HEIGHT, WIDTH))


def _rss_mb() -> float:
    """This process's resident set size now, in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_variant(folder: Path, variant: str) -> dict:
    """In this (child) process: score the results once, report seconds and MB."""
    from everyseg.engine import coco_results
    from everyseg.engine.evaluate import coco_metrics

    results = json.loads((folder / "results.json").read_text())
    gt = folder / ("gt_lvis.json" if variant.endswith("_lvis") else "gt.json")
    coco_results.BACKEND = variant.removesuffix("_lvis")
    base = _rss_mb()
    start = time.perf_counter()
    metrics = coco_metrics(gt, results, seen_cat_ids=range(1, 81))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "variant": variant,
        "seconds": round(seconds, 1),
        "peak_mb": round(peak - base),
        "segm_AP": round(metrics["segm"]["all"]["AP"], 3),
        "bbox_AP": round(metrics["bbox"]["all"]["AP"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--classes", type=int, default=3000)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(Path(args.child[0]), args.child[1])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_files(folder, images=args.images, classes=args.classes)
        rows = {}
        for variant in args.variants:
            argv = [sys.executable, __file__, "--child", str(folder), variant]
            done = subprocess.run(argv, capture_output=True, text=True, check=True)
            rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
            print(rows[variant], flush=True)
    summary = "; ".join(
        f"{name}: {r['seconds']} s, +{r['peak_mb']} MB, segm AP {r['segm_AP']}"
        for name, r in rows.items()
    )
    if {"pycocotools", "faster_coco_eval"} <= rows.keys():
        ratio = rows["pycocotools"]["seconds"] / max(rows["faster_coco_eval"]["seconds"], 1e-9)
        summary += f"; pycocotools / faster-coco-eval time {ratio:.1f}x"
    print(
        f"eval_scaling ({args.images} images, {args.classes} classes, {DETECTIONS} dets/image): "
        + summary
    )


if __name__ == "__main__":
    main()
