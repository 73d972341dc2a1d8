"""Mean mask IoU of box-prompted segmentation on ground-truth boxes, seen vs unseen classes.

Deep-MAC's question: given the true box of an object whose class never had masks in training,
how good is the mask? Every val instance with a mask is prompted with its own box through
`Predictor.segment` (the class is the box classifier's guess, as a user would get it).

    python benchmarks/box_prompt_iou.py RUN_DIR [--data VAL.json --images DIR] [--max-images N]

The last line prints the mean IoU on seen and unseen classes.
"""

from __future__ import annotations

import argparse

import numpy as np
from tqdm import tqdm

from everyseg.data.coco import CocoInstances
from everyseg.predictor import Predictor


def instance_ious(predictor: Predictor, dataset: CocoInstances, *, max_images: int):
    """Yields (class name, IoU) for every val instance that has a mask."""
    for index in tqdm(range(min(len(dataset), max_images)), desc="segment"):
        image, target = dataset[index]
        keep = target["has_mask"].numpy()
        if not keep.any():
            continue
        array = image.permute(1, 2, 0).numpy()  # (H, W, 3) float in [0, 1]
        instances = predictor.segment(array, target["boxes"].numpy()[keep])
        truths = target["compact_masks"].to_dense().numpy()[keep].astype(bool)
        labels = target["labels"].numpy()[keep]
        for predicted, truth, label in zip(instances.masks, truths, labels):
            union = np.logical_or(predicted, truth).sum()
            yield dataset.class_names[label - 1], np.logical_and(predicted, truth).sum() / union


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data", help="val COCO JSON (default: the run's data.val_json)")
    parser.add_argument("--images", help="images of --data")
    parser.add_argument("--max-images", type=int, default=10**9)
    args = parser.parse_args()
    predictor = Predictor.from_run(args.run)
    data = predictor.cfg.data
    dataset = CocoInstances(
        json_path=args.data or data.val_json,
        images_dir=args.images or data.val_images,
        mask_classes="all",
    )
    seen = set(predictor.mask_classes)
    ious = {"seen": [], "unseen": []}
    for name, iou in instance_ious(predictor, dataset, max_images=args.max_images):
        ious["seen" if name in seen else "unseen"].append(iou)
    parts = [
        f"{key} {np.mean(values):.3f} ({len(values)} instances)" if values else f"{key} n/a"
        for key, values in ious.items()
    ]
    print(f"box_prompt_iou {args.run}: mean mask IoU on ground-truth boxes: {'; '.join(parts)}")


if __name__ == "__main__":
    main()
