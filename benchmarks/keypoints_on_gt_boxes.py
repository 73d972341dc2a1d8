"""Keypoint AP (OKS) of a run's keypoint head on the val set's ground-truth boxes (the detector
held out), against a prior measured in the same run: every keypoint at its mean position
relative to its box over the training set's instances of that class.

    OMP_NUM_THREADS=1 python benchmarks/keypoints_on_gt_boxes.py RUN_DIR

Prints the head's and the prior's keypoint AP / AP50 and their ratio in its last line.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
from torchvision.models.detection.transform import resize_boxes, resize_keypoints

from everyseg.data.build import build_dataset
from everyseg.data.keypoints import KeypointLayout
from everyseg.engine.keypoint_eval import keypoint_metrics
from everyseg.engine.load import load_run


def relative_prior(dataset, layout: KeypointLayout) -> dict[int, np.ndarray]:
    """label -> (K, 2) mean keypoint position relative to the box (0..1), labelled ones."""
    sums: dict[int, np.ndarray] = defaultdict(lambda: np.zeros((len(layout.names), 3)))
    for instances in dataset.index.instances.values():
        for inst in instances:
            if inst.keypoints is None:
                continue
            x0, y0, x1, y1 = inst.box
            rel = (inst.keypoints[:, :2] - (x0, y0)) / (max(x1 - x0, 1e-6), max(y1 - y0, 1e-6))
            seen = inst.keypoints[:, 2:] > 0
            sums[inst.label] += np.concatenate([rel * seen, seen], axis=1)
    return {label: s[:, :2] / np.maximum(s[:, 2:], 1) for label, s in sums.items()}


@torch.inference_mode()
def head_keypoints(model, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(N, K, 3) the keypoint head's keypoints for (N, 4) boxes of one (3, H, W) image."""
    transformed, _ = model.transform([image])
    size, original = transformed.image_sizes[0], tuple(image.shape[-2:])
    features = model.backbone(transformed.tensors)
    rois = resize_boxes(boxes, original, size)
    (points,), _ = model.roi_heads.keypoint_branch.predict(features, [rois], [size])
    return resize_keypoints(points, size, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run")
    args = parser.parse_args()
    run = load_run(args.run, device="cpu")
    layout = KeypointLayout.from_plain(run.record.keypoints)
    val = build_dataset(run.config.data, split="val", keypoint_layout=layout)
    prior = relative_prior(build_dataset(run.config.data, split="train", keypoints=True), layout)
    results: dict[str, list] = {"head": [], "prior": []}
    errors: dict[str, list] = {"head": [], "prior": []}  # px, per labelled keypoint
    for i in range(len(val)):
        image, target = val[i]
        keep = target["has_keypoints"]
        if not keep.any():
            continue
        boxes, labels = target["boxes"][keep], target["labels"][keep]
        predicted = head_keypoints(run.model, image, boxes)
        truth = target["keypoints"][keep].numpy()
        for box, label, points, true in zip(
            boxes.numpy(), labels.tolist(), predicted.numpy(), truth
        ):
            cat = {
                "image_id": int(target["image_id"]),
                "category_id": run.record.label_to_cat_id[label],
                "score": 1.0,
            }
            results["head"].append(cat | {"keypoints": points.ravel().tolist()})
            xy = box[:2] + prior.get(label, np.full((len(layout.names), 2), 0.5)) * (
                box[2:] - box[:2]
            )
            guess = np.concatenate([xy, np.ones((len(layout.names), 1))], axis=1)
            results["prior"].append(cat | {"keypoints": guess.ravel().tolist()})
            seen = true[:, 2] > 0
            for name, xy_found in (("head", points[:, :2]), ("prior", xy)):
                errors[name] += np.linalg.norm(xy_found[seen] - true[seen, :2], axis=1).tolist()
    gt = val.ground_truth()
    scores = {
        name: keypoint_metrics(gt, found, names=layout.names)["all"]
        for name, found in results.items()
    }
    for name, block in scores.items():
        print(f"{name}: {block}")
    head, ref = scores["head"], scores["prior"]
    error = {name: float(np.mean(found)) for name, found in errors.items()}
    print(
        f"keypoints on gt boxes ({len(results['head'])} instances): head AP {head['AP']:.2f} "
        f"(AP50 {head['AP50']:.2f}), mean error {error['head']:.2f} px; prior AP "
        f"{ref['AP']:.2f} (AP50 {ref['AP50']:.2f}), mean error {error['prior']:.2f} px; "
        f"head / prior error {error['head'] / error['prior']:.2f}"
    )


if __name__ == "__main__":
    main()
