"""A study's numbers: mean and sample standard deviation over seeds, the paired (by seed)
difference to the reference row with a 95 % Student t interval, and study.md's tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# (column, path into metrics.json, digits); AP in percent, IoU in 0..1
METRICS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("mask AP seen", ("segm", "seen", "AP"), 1),
    ("mask AP unseen", ("segm", "unseen", "AP"), 1),
    ("box AP", ("bbox", "all", "AP"), 1),
    ("GT-box mask AP seen", ("gt_boxes", "segm", "seen", "AP"), 1),
    ("GT-box mask AP unseen", ("gt_boxes", "segm", "unseen", "AP"), 1),
    ("GT-box IoU seen", ("gt_boxes", "mean_iou", "seen"), 3),
    ("GT-box IoU unseen", ("gt_boxes", "mean_iou", "unseen"), 3),
)
# Student t's 0.975 quantile for 1..30 degrees of freedom
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
Z_975 = 1.959964


def t_quantile_975(df: int) -> float:
    """Student t's 0.975 quantile: the table to 30 degrees of freedom, then the
    Cornish-Fisher expansion around the normal's (error < 1e-3 beyond 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the deviation is None for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def paired_interval(
    values: Mapping[int, float], reference: Mapping[int, float]
) -> tuple[float, float | None, int] | None:
    """Mean of `values` minus `reference` over the seeds both have, the half width of its
    95 % t interval (None with one pair) and the number of pairs; None without a pair."""
    seeds = sorted(values.keys() & reference.keys())
    if not seeds:
        return None
    differences = [values[s] - reference[s] for s in seeds]
    mean, std = mean_std(differences)
    if std is None:
        return mean, None, 1
    return mean, t_quantile_975(len(seeds) - 1) * std / math.sqrt(len(seeds)), len(seeds)


def metric_value(metrics: Mapping[str, Any], path: Sequence[str]) -> float | None:
    node: Any = metrics
    for key in path:
        if not isinstance(node, Mapping) or node.get(key) is None:
            return None
        node = node[key]
    return float(node)


def per_seed(runs: Mapping[int, Mapping[str, Any]], path: Sequence[str]) -> dict[int, float]:
    """seed -> the metric at `path` of that seed's metrics.json, where it has one."""
    found = {seed: metric_value(metrics, path) for seed, metrics in runs.items()}
    return {seed: value for seed, value in found.items() if value is not None}


def summary_table(rows: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> str:
    """Markdown: per row, mean +- std over its finished seeds of every metric."""
    head = ["row", "seeds", *(name for name, _, _ in METRICS)]
    lines = [_markdown_row(head), _markdown_row(["---"] * len(head))]
    for name, runs in rows.items():
        cells = [name, str(len(runs))]
        for _, path, digits in METRICS:
            values = list(per_seed(runs, path).values())
            cells.append(_mean_std_cell(values, digits))
        lines.append(_markdown_row(cells))
    return "\n".join(lines)


def difference_table(rows: Mapping[str, Mapping[int, Mapping[str, Any]]], reference: str) -> str:
    """Markdown: per row, its paired difference to `reference`, mean [95 % interval]."""
    head = ["row", "pairs", *(f"Δ {name}" for name, _, _ in METRICS)]
    lines = [_markdown_row(head), _markdown_row(["---"] * len(head))]
    for name, runs in rows.items():
        if name == reference:
            continue
        pairs = len(runs.keys() & rows[reference].keys())
        cells = [name, str(pairs)]
        for _, path, digits in METRICS:
            found = paired_interval(per_seed(runs, path), per_seed(rows[reference], path))
            cells.append(_difference_cell(found, digits))
        lines.append(_markdown_row(cells))
    return "\n".join(lines)


def _mean_std_cell(values: Sequence[float], digits: int) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _difference_cell(found: tuple[float, float | None, int] | None, digits: int) -> str:
    if found is None:
        return "–"
    mean, half, _ = found
    if half is None:
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} [{mean - half:+.{digits}f}, {mean + half:+.{digits}f}]"


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def on_split(
    metrics: Mapping[str, Any], seen_names: Sequence[str], instances: Mapping[str, int]
) -> dict[str, Any]:
    """`metrics` with its seen / unseen AP and mean IoU (the tables' numbers) taken over
    another split: `seen_names`, the rest unseen. A row trained with other mask classes (the
    oracle) is so compared on the reference row's classes: AP as the mean of the per-class
    APs (COCO's subset AP), mean IoU weighted by each class's masked val `instances`."""
    seen = set(seen_names)
    out = {**metrics, "seen_classes": sorted(seen)}
    segm = metrics.get("segm", {})
    out["segm"] = {**segm, **_subset_aps(segm.get("per_class", {}), seen)}
    gt = metrics.get("gt_boxes")
    if gt is not None:
        ious = {
            subset: _weighted_mean(gt.get("per_class_iou", {}), instances, keep)
            for subset, keep in (("seen", lambda n: n in seen), ("unseen", lambda n: n not in seen))
        }
        gt_segm = {**gt["segm"], **_subset_aps(gt["segm"].get("per_class", {}), seen)}
        out["gt_boxes"] = {**gt, "segm": gt_segm, "mean_iou": {**gt["mean_iou"], **ious}}
    return out


def _subset_aps(per_class: Mapping[str, float | None], seen: set[str]) -> dict[str, dict]:
    subsets: dict[str, list[float]] = {"seen": [], "unseen": []}
    for name, ap in per_class.items():
        if ap is not None:
            subsets["seen" if name in seen else "unseen"].append(ap)
    return {s: {"AP": sum(v) / len(v) if v else None} for s, v in subsets.items()}


def _weighted_mean(per_class: Mapping[str, float | None], weights: Mapping[str, int], keep):
    pairs = [(v, weights.get(n, 0)) for n, v in per_class.items() if v is not None and keep(n)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None
