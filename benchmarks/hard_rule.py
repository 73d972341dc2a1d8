"""Has a run's mask head learnt the hard benchmark's rule? The share of each cut-out it fills.

On the hard data (`everyseg synth --preset hard`) a window class's mask holds its cut-out and a
hole class's does not. A head that has learnt the rule fills the visible cut-out of a window
class's object (share near 1) and leaves a hole class's empty (share near 0); a head that
predicts the filled outline for everything fills both. The val images are rendered again
from the generator's seed (the same pixels as the files) to know each object's outline, and
the run's head is prompted with each ground-truth box and its class (`Predictor.segment`).

    python benchmarks/hard_rule.py DATA RUN [RUN ...]

DATA is the `synth --preset hard` folder (its val.json's "info.args" gives the seed and
size). Per run: the mean share of cut-out pixels inside the predicted mask, over instances
whose visible cut-out has at least 10 pixels, for window / hole classes, seen / unseen
(DATA/seen_classes.txt), and the number of such instances.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from everyseg import Predictor
from everyseg.data import synthetic_hard as hard
from everyseg.data.splits import resolve_mask_classes
from everyseg.data.synthetic import image_rng

MIN_CUT_PX = 10


def val_objects(data: Path) -> list[tuple[np.ndarray, list[dict]]]:
    """Per val image, its (H, W, 3) pixels and kept objects with `cut_visible`: the (H, W)
    bool pixels of the object's cut-out that nothing above it hides."""
    val = json.loads((data / "annotations" / "val.json").read_text())
    seed, size = val["info"]["args"]["seed"], val["info"]["args"]["size"]
    shape_masks = hard._shape_masks

    def with_outline(label: int, polys: list[np.ndarray], size: int) -> dict:
        return {**shape_masks(label, polys, size), "outline": hard._raster(polys[0], size)}

    hard._shape_masks = with_outline  # the layout keeps each object's outline for this
    try:
        per_image = []
        for image in val["images"]:
            rng = image_rng(seed, "val", image["id"])
            pixels, kept = hard.render_hard(rng, size)
            cover = np.zeros((size, size), bool)
            for obj in reversed(kept):  # top first: what lies above hides the cut-out too
                obj["cut_visible"] = obj["outline"] & ~obj["solid"] & ~cover
                cover |= obj["solid"]
            per_image.append((pixels, kept))
    finally:
        hard._shape_masks = shape_masks
    return per_image


def cut_shares(run: Path, data: Path, images: list[tuple[np.ndarray, list[dict]]]) -> dict:
    """(kind, subset) -> shares of the visible cut-out inside the predicted mask."""
    predictor = Predictor.from_run(run, device="cpu")
    cat_to_label = {cat: label for label, cat in predictor.label_to_cat_id.items()}
    names = list(hard.CLASS_NAMES)
    seen = set(resolve_mask_classes(str(data / "seen_classes.txt"), names))
    shares = defaultdict(list)
    for pixels, kept in images:
        boxes = [_box(obj["visible"]) for obj in kept]
        labels = [cat_to_label[hard.CATEGORY_IDS[obj["label"]]] for obj in kept]
        masks = predictor.segment(pixels, np.array(boxes, np.float32), labels=labels).masks
        for obj, mask in zip(kept, masks, strict=True):
            cut = obj["cut_visible"]
            if cut.sum() >= MIN_CUT_PX:
                name = names[obj["label"]]
                kind = "window" if name in hard.WINDOW_CLASSES else "hole"
                subset = "seen" if name in seen else "unseen"
                shares[kind, subset].append(float((mask & cut).sum() / cut.sum()))
    return shares


def _box(mask: np.ndarray) -> list[float]:
    """The annotation's box (the visible mask's tight box) as xyxy."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="the `everyseg synth --preset hard` folder")
    parser.add_argument("runs", type=Path, nargs="+", help="run directories")
    args = parser.parse_args()
    images = val_objects(args.data)
    keys = [(k, s) for s in ("seen", "unseen") for k in ("window", "hole")]
    print(f"{'run':<16}" + "".join(f"{k + ' ' + s:>16}" for k, s in keys))
    for run in args.runs:
        shares = cut_shares(run, args.data, images)
        cells = [f"{statistics.fmean(shares[key]):.3f} (n={len(shares[key])})" for key in keys]
        print(f"{run.name:<16}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
