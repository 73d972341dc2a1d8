"""The FCN paper's semantic segmentation metrics, from a confusion matrix.

With n_ij the pixels of class i predicted as class j, t_i = sum_j n_ij the pixels of class i
and n_cl the classes (background included, as in PASCAL VOC's 21):
  pixel accuracy              sum_i n_ii / sum_i t_i
  mean accuracy               (1 / n_cl) sum_i n_ii / t_i
  mean IU                     (1 / n_cl) sum_i n_ii / (t_i + sum_j n_ji - n_ii)
  frequency-weighted IU       (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)
A class with no pixel (t_i = 0) has no accuracy; one that is also never predicted has no IU:
both are left out of the means (the FCN authors' score.py takes nanmeans the same way), a
class never present but predicted has IU 0. IGNORE pixels are not counted. Figures are in
percent, as metrics.json's AP; undefined ones are null, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor
from tqdm import tqdm

from everyseg.config import Config
from everyseg.data.build import build_dataset
from everyseg.data.semantic import IGNORE, target_labels
from everyseg.engine.eval_data import map_classes
from everyseg.engine.precision import autocast
from everyseg.engine.run_dir import RunRecord


def confusion_matrix(labels: Tensor, predicted: Tensor, *, num_classes: int) -> Tensor:
    """(C, C) int64 counts n_ij (row: true class i, column: predicted j) of equally shaped
    label maps; IGNORE pixels of `labels` are not counted."""
    keep = labels != IGNORE
    pairs = labels[keep] * num_classes + predicted[keep]
    return torch.bincount(pairs, minlength=num_classes**2).reshape(num_classes, num_classes)


def semantic_metrics(
    confusion: Tensor, *, class_names: Sequence[str], seen: Sequence[str] = ()
) -> dict:
    """metrics.json's "semantic" section from a (K + 1, K + 1) confusion matrix, background
    first and `class_names` (K) after it; `seen` names the classes that had masks in training:
    "seen" / "unseen" hold the mean IU of those and of the others (background in neither)."""
    n = confusion.double()
    hits, truth, predicted = n.diagonal(), n.sum(1), n.sum(0)
    union = truth + predicted - hits
    accuracy = hits / truth  # NaN where t_i = 0
    iu = hits / union  # NaN where the class is neither present nor predicted
    total = truth.sum()
    names = ["background", *class_names]
    per_class = {name: _percent(v) for name, v in zip(names, iu.tolist())}
    seen_set = set(seen)
    return {
        "pixel_accuracy": _percent(float(hits.sum() / total)),
        "mean_accuracy": _percent(_nanmean(accuracy)),
        "mean_iu": _percent(_nanmean(iu)),
        "frequency_weighted_iu": _percent(float((truth * iu.nan_to_num()).sum() / total)),
        "seen": {"mean_iu": _mean_of(per_class, [c for c in class_names if c in seen_set])},
        "unseen": {"mean_iu": _mean_of(per_class, [c for c in class_names if c not in seen_set])},
        "per_class_iu": per_class,
        "per_class_accuracy": {name: _percent(v) for name, v in zip(names, accuracy.tolist())},
        "pixels": int(total),
    }


def evaluate_loaded_semantic(
    model,
    cfg: Config,
    record: RunRecord,
    *,
    device,
    data_json=None,
    images=None,
    precision: str = "fp32",
    progress=True,
) -> dict:
    """metrics.json of an FCN run on the config's val set (or `data_json` + `images`), the
    model run in `precision` (fp32 | fp16 | bf16):
    "semantic" (semantic_metrics), "seen_classes", "unseen_classes", "images". Classes are
    matched by name; a class of the file the run never learned is an error (map_classes)."""
    data = cfg.data
    if data_json is not None:
        data = replace(data, val_json=str(data_json), val_images=str(images))
    dataset = build_dataset(data, split="val")  # every class keeps its masks
    run_classes = list(record.class_names)
    map_classes(
        run_classes=run_classes,
        mask_classes=record.mask_classes,
        data_cat_ids={name: i for i, name in enumerate(dataset.class_names)},
        source=str(data.val_json),
    )
    label_map = torch.tensor([0] + [run_classes.index(n) + 1 for n in dataset.class_names])
    num_classes = len(run_classes) + 1
    confusion = evaluate_semantic(
        model,
        dataset,
        label_map=label_map,
        num_classes=num_classes,
        device=device,
        precision=precision,
        progress=progress,
    )
    seen = list(record.mask_classes)
    return {
        "semantic": semantic_metrics(confusion, class_names=run_classes, seen=seen),
        "seen_classes": [c for c in run_classes if c in set(seen)],
        "unseen_classes": [c for c in run_classes if c not in set(seen)],
        "images": len(dataset),
    }


@torch.inference_mode()
def evaluate_semantic(
    model,
    dataset,
    *,
    label_map: Tensor,
    num_classes: int,
    device,
    precision: str = "fp32",
    progress: bool = True,
) -> Tensor:
    """The (K + 1, K + 1) confusion matrix of `model` over `dataset` (CocoInstances, every
    image), its labels 0..K' mapped to the run's by `label_map` ((K' + 1,) int64; IGNORE for
    classes the run does not have)."""
    model.eval()
    confusion = torch.zeros((num_classes, num_classes), dtype=torch.int64)
    for i in tqdm(range(len(dataset)), desc="evaluate", disable=not progress):
        image, target = dataset[i]
        labels = target_labels(target, height=image.shape[-2], width=image.shape[-1])
        labels = torch.where(labels == IGNORE, IGNORE, label_map[labels.clamp(min=0)])
        with autocast(torch.device(device), precision):
            (output,) = model([image.to(device)])
        predicted = output["sem_seg"].argmax(0).cpu()  # (H, W)
        confusion += confusion_matrix(labels, predicted, num_classes=num_classes)
    return confusion


def format_semantic_table(metrics: dict) -> str:
    """The four FCN metrics and seen / unseen mean IU, as printed by `everyseg evaluate`."""
    s = metrics["semantic"]
    rows = [
        ("pixel accuracy", s["pixel_accuracy"]),
        ("mean accuracy", s["mean_accuracy"]),
        ("mean IU", s["mean_iu"]),
        ("frequency-weighted IU", s["frequency_weighted_iu"]),
        ("mean IU, seen classes", s["seen"]["mean_iu"]),
        ("mean IU, unseen classes", s["unseen"]["mean_iu"]),
    ]
    lines = [f"{name:<24} {'-' if v is None else f'{v:6.2f}'}" for name, v in rows]
    return "\n".join([f"semantic segmentation, {metrics['images']} images", *lines])


def _nanmean(values: Tensor) -> float:
    defined = values[~values.isnan()]
    return float(defined.mean()) if len(defined) else float("nan")


def _percent(value: float) -> float | None:
    return None if value != value else round(100.0 * value, 4)


def _mean_of(per_class: dict[str, float | None], names: list[str]) -> float | None:
    values = [v for name in names if (v := per_class[name]) is not None]
    return round(sum(values) / len(values), 4) if values else None
