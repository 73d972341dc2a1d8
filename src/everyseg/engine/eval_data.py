"""Scoring a run on any COCO file: classes matched by name, metrics named after the file.

A category id means nothing outside its file: the same classes may be numbered 1..K in one
export and 0..K-1 in another, or listed in another order. So a model label becomes a class
name (the run's vocabulary), and the name becomes the evaluation file's category id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ClassMapping:
    """How a run's labels meet one evaluation file's categories."""

    label_to_cat_id: dict[int, int]  # model label 1..K -> the file's category id
    seen_cat_ids: list[int]  # the file's ids of the classes that had masks in training
    unscored: list[str]  # run classes the file lacks: their detections are dropped
    unscored_labels: list[int]


def map_classes(
    *,
    run_classes: list[str],
    mask_classes: list[str],
    data_cat_ids: dict[str, int],
    source: str,
) -> ClassMapping:
    """Match a run's classes (label i + 1 is `run_classes[i]`) to a file's by name.

    `data_cat_ids` is the file's class name -> category id. A class of the file that the run
    never learned cannot be scored fairly (its AP would be 0 by construction), so it is an
    error naming it; run classes the file lacks are listed in `unscored`.
    """
    unknown = [name for name in data_cat_ids if name not in set(run_classes)]
    if unknown:
        raise ValueError(
            f"{source}: class(es) {unknown} are not classes of the run, which learned "
            f"{list(run_classes)}; remove them from the file to score the others"
        )
    label_to_cat_id, unscored, unscored_labels = {}, [], []
    for label, name in enumerate(run_classes, start=1):
        if name in data_cat_ids:
            label_to_cat_id[label] = data_cat_ids[name]
        else:
            unscored.append(name)
            unscored_labels.append(label)
    seen = [data_cat_ids[name] for name in mask_classes if name in data_cat_ids]
    return ClassMapping(label_to_cat_id, seen, unscored, unscored_labels)


def metrics_file_name(data_json: str | Path) -> str:
    """`metrics-<stem>.json` for an evaluation file, the stem reduced to safe characters."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data_json).stem).strip("._-")
    return f"metrics-{stem or 'data'}.json"
