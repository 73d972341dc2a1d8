"""Is a run's detection weight w_det an informative class embedding for masks?

Mask^X R-CNN predicts a class's mask weights from its box weights, which can only help classes
without masks if classes with similar box weights also have similar masks. This measures that
on a trained run: for every pair of classes it compares

  * the cosine similarity of their w_det (box classifier row, box regressor rows, both), and
  * the similarity of their mask shapes: 1 - mean |difference| of the two classes' mean
    ground-truth masks, each mask cropped to its box and resized to M x M,

and prints the Spearman rank correlation over all pairs per w_det kind (1: similar boxes
weights mean similar masks; 0: w_det carries no mask information).

    python benchmarks/transfer_embedding.py RUN_DIR [--max-images N] [--resolution M]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import roi_align
from tqdm import tqdm

from everyseg.data.coco import CocoInstances
from everyseg.engine.checkpoint import load_checkpoint
from everyseg.engine.run_dir import RunDir


def mean_class_masks(dataset: CocoInstances, *, max_images: int, resolution: int) -> np.ndarray:
    """(K, M, M) mean box-cropped ground-truth mask of each class (NaN where a class has none)."""
    num_classes = len(dataset.class_names)
    sums = torch.zeros(num_classes, resolution, resolution)
    counts = torch.zeros(num_classes)
    for index in tqdm(range(min(len(dataset), max_images)), desc="masks"):
        _, target = dataset[index]
        keep = target["has_mask"]
        if not keep.any():
            continue
        masks = target["compact_masks"].to_dense()[keep].float()[:, None]  # (N, 1, H, W)
        boxes = target["boxes"][keep].float()
        rois = torch.cat([torch.arange(len(boxes), dtype=torch.float)[:, None], boxes], dim=1)
        crops = roi_align(masks, rois, resolution, aligned=True)[:, 0]  # (N, M, M)
        labels = target["labels"][keep] - 1
        sums.index_add_(0, labels, crops)
        counts.index_add_(0, labels, torch.ones(len(labels)))
    return (sums / counts[:, None, None]).numpy()


def detection_embeddings(model_state: dict, num_classes: int) -> dict[str, np.ndarray]:
    """(K, D) w_det per input kind, foreground classes only, as Mask^X's transfer reads them."""
    cls = model_state["roi_heads.box_predictor.cls_score.weight"][1 : num_classes + 1]
    box = model_state["roi_heads.box_predictor.bbox_pred.weight"].reshape(num_classes + 1, -1)
    box = box[1:]
    return {"cls": cls.numpy(), "box": box.numpy(), "cls+box": torch.cat([cls, box], 1).numpy()}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    rank_a, rank_b = (np.argsort(np.argsort(x)).astype(float) for x in (a, b))
    return float(np.corrcoef(rank_a, rank_b)[0, 1])


def pair_similarities(embedding: np.ndarray, shapes: np.ndarray, classes: list[int]):
    unit = embedding / np.linalg.norm(embedding, axis=1, keepdims=True)
    pairs = list(itertools.combinations(classes, 2))
    weights = np.array([unit[i] @ unit[j] for i, j in pairs])
    masks = np.array([1 - np.abs(shapes[i] - shapes[j]).mean() for i, j in pairs])
    return weights, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--max-images", type=int, default=300)
    parser.add_argument("--resolution", type=int, default=28)
    args = parser.parse_args()
    state = load_checkpoint(RunDir(Path(args.run)).last)
    data = state["config"]["data"]
    dataset = CocoInstances(
        json_path=data["train_json"], images_dir=data["train_images"], mask_classes="all"
    )
    names = list(dataset.class_names)
    shapes = mean_class_masks(dataset, max_images=args.max_images, resolution=args.resolution)
    classes = [k for k in range(len(names)) if not np.isnan(shapes[k]).any()]
    embeddings = detection_embeddings(state["model"], len(names))
    rng = np.random.default_rng(0)
    embeddings["randn (control)"] = rng.standard_normal((len(names), 300))
    parts = []
    for kind, embedding in embeddings.items():
        weights, masks = pair_similarities(embedding, shapes, classes)
        parts.append(f"{kind} {spearman(weights, masks):+.2f}")
    pairs = len(classes) * (len(classes) - 1) // 2
    print(
        f"transfer_embedding {args.run}: Spearman(w_det cosine, mask-shape similarity) over "
        f"{pairs} class pairs: {'; '.join(parts)}"
    )


if __name__ == "__main__":
    main()
