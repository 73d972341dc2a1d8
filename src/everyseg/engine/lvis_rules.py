"""LVIS's evaluation rules, and the class-frequency buckets AP is also reported by.

A ground truth whose images carry LVIS's ``neg_category_ids`` / ``not_exhaustive_category_ids``
is scored with LVIS's federated rules (faster-coco-eval's ``lvis_style``, checked against a
hand-computed case in tests/test_lvis_eval.py): in each image only the classes annotated there
(present, or verified absent) are scored, the other detections are ignored; a detection of a
class marked not exhaustive that matches nothing is not a false positive; at most the 300
highest-scoring detections of an image count, whatever their classes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from everyseg.data.lvis import IMAGE_LISTS, image_lists, read_frequencies

MAX_DETS_PER_IMAGE = 300  # LVIS's per-image cap (lvis-api's LVISResults max_dets)
# LVIS's bucket bounds (training images per class); the same bounds on training instances
# bucket the classes of a file without LVIS frequencies
RARE_MAX, COMMON_MAX = 10, 100
BUCKET_NAMES = {"r": "rare", "c": "common", "f": "frequent"}


def is_federated(dataset: dict[str, Any], *, source: str) -> bool:
    """Whether the ground truth is LVIS-style (any image lists neg / not-exhaustive classes).

    ValueError naming the image and key if such a list is not a list of category ids.
    """
    federated = False
    for img in dataset["images"]:
        lists, problem = image_lists(img)
        if problem:
            raise ValueError(f"{source}: image id {img.get('id')!r}: {problem}")
        federated = federated or any(key in lists for key in IMAGE_LISTS)
    return federated


def annotated_classes_only(
    dataset: dict[str, Any], results: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The results whose class is present or verified absent in their image: LVIS ignores the
    others. faster-coco-eval ignores them too, but fails on an image with nothing else (it
    looks up the image's size for masks it has dropped), so they go before it sees them."""
    annotated: dict[int, set[int]] = defaultdict(set)
    for img in dataset["images"]:
        annotated[img["id"]].update(img.get("neg_category_ids", []))
    for ann in dataset["annotations"]:
        annotated[ann["image_id"]].add(ann["category_id"])
    return [r for r in results if r["category_id"] in annotated[r["image_id"]]]


def top_per_image(
    results: list[dict[str, Any]], *, limit: int = MAX_DETS_PER_IMAGE
) -> list[dict[str, Any]]:
    """The ``limit`` highest-scoring results of each image across classes, in their order."""
    by_image: dict[int, list[int]] = defaultdict(list)
    for position, result in enumerate(results):
        by_image[result["image_id"]].append(position)
    dropped: set[int] = set()
    for positions in by_image.values():
        if len(positions) > limit:
            ranked = sorted(positions, key=lambda i: -results[i]["score"])
            dropped.update(ranked[limit:])
    return [r for i, r in enumerate(results) if i not in dropped]


@dataclass(frozen=True)
class Buckets:
    """Which frequency bucket (r / c / f) each category id is in, and by what rule."""

    by: str  # "lvis_frequency" | "train_instances"
    rule: str
    of_category: dict[int, str]


def class_buckets(
    categories: list[dict[str, Any]], *, train_counts: Mapping[str, int] | None, source: str
) -> Buckets | None:
    """LVIS's r / c / f where the ground truth's categories have a ``frequency``, else buckets
    by ``train_counts`` (class name -> training instances; a class not in it had none) with
    LVIS's bounds, else None (no buckets). A category without a frequency in a file where others
    have one is in no bucket."""
    frequencies = read_frequencies(categories, source)
    if frequencies:
        rule = "LVIS v1 category frequency: r 1-10, c 11-100, f > 100 training images"
        return Buckets("lvis_frequency", rule, frequencies)
    if train_counts is None:
        return None
    rule = f"training instances: r <= {RARE_MAX}, c {RARE_MAX + 1}-{COMMON_MAX}, f > {COMMON_MAX}"
    of_category = {c["id"]: _bucket(train_counts.get(c["name"], 0)) for c in categories}
    return Buckets("train_instances", rule, of_category)


def _bucket(count: int) -> str:
    return "r" if count <= RARE_MAX else "c" if count <= COMMON_MAX else "f"
