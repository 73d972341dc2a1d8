"""Why a softmax (multinomial) mask head scores what it scores: its class channel against its
foreground, on the val set's true boxes and classes.

    python benchmarks/softmax_mask_diagnosis.py RUN_DIR [--max-images N]

RUN_DIR trained with `model.mask_head.loss=softmax`. For each true box the head gives a
per-pixel softmax over background + K classes; the run's inference thresholds the box's class
channel at 0.5. Printed, as mean mask IoU against the true masks:
- class       p(class) > 0.5 (what `evaluate` measures);
- argmax      the class channel is the pixel's most likely one (FCN's reading);
- foreground  1 - p(background) > 0.5 (the class channels pooled: how well the head separates
              object from background, whatever class it thinks the pixels are);
and the median over boxes of the class channel's highest probability. Foreground near the
sigmoid head's IoU with class near zero means the head segments but cannot classify pixels.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from pycocotools.coco import COCO
from tqdm import tqdm

from everyseg.data.images import load_image
from everyseg.modeling.mask_heads import SoftmaxMaskHead
from everyseg.predictor import Predictor

READINGS = ("class", "argmax", "foreground")


def reading_of(probs: torch.Tensor, labels: torch.Tensor, reading: str) -> torch.Tensor:
    """(R, K + 1, M, M) softmax, (R,) labels -> (R, M, M) a map that is > 0.5 where the pixel
    is the box's object under `reading`."""
    rows = torch.arange(len(labels))
    own = probs[rows, labels]  # (R, M, M)
    if reading == "class":
        return own
    if reading == "foreground":
        return 1 - probs[:, 0]
    others = probs.clone()
    others[rows, labels] = -1
    return own / (own + others.max(1).values)  # > 0.5 exactly where own is the argmax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--max-images", type=int, default=None, help="default: all")
    args = parser.parse_args()
    predictor = Predictor.from_run(args.run, device="cpu")
    head = predictor.model.roi_heads.mask_head
    if not isinstance(head, SoftmaxMaskHead):
        raise SystemExit(f"{args.run} was not trained with model.mask_head.loss=softmax")
    data = predictor.cfg.data
    coco = COCO(data.val_json)
    cat_to_label = {cat: label for label, cat in predictor.label_to_cat_id.items()}
    peaks: list[float] = []
    state = {"reading": "class"}

    def predict(roi_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        probs = head(roi_features, labels).softmax(dim=1)  # (R, K + 1, M, M)
        if state["reading"] == "class":
            peaks.extend(probs[torch.arange(len(labels)), labels].amax((1, 2)).tolist())
        return reading_of(probs, labels, state["reading"])[:, None]

    head.predict = predict  # the same features and boxes, only the reading changes
    image_ids = coco.getImgIds()[: args.max_images]
    for reading in READINGS:
        state["reading"] = reading
        ious = []
        for image_id in tqdm(image_ids, desc=reading, leave=False):
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
            if not anns:
                continue
            info = coco.loadImgs(image_id)[0]
            image = load_image(f"{data.val_images}/{info['file_name']}")
            boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
            labels = [cat_to_label[a["category_id"]] for a in anns]
            masks = predictor.segment(image, boxes, labels=labels).masks > 0.5
            for ann, mask in zip(anns, masks.reshape(len(anns), *masks.shape[-2:])):
                truth = coco.annToMask(ann).astype(bool)
                ious.append((truth & mask).sum() / max((truth | mask).sum(), 1))
        print(f"{reading:>10}: mean IoU {np.mean(ious):.3f} over {len(ious)} true boxes")
    print(f"median over boxes of max p(class): {np.median(peaks):.3f}")


if __name__ == "__main__":
    main()
