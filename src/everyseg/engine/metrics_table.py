"""metrics.json as a printed table that stays readable at 3,000 classes.

Summary rows (segm / bbox x all / seen / unseen, and frequency buckets when there are; with
"gt_boxes", the mask AP on ground-truth boxes as "gt-box segm" rows and the mean mask IoU
there), then classes sorted by mask AP (then box AP), best first, with their mask IoU on
ground-truth boxes. Past `max_classes` only the best and the worst measured classes are
printed, with a line saying how many more there are: every class's AP is in metrics.json
(`per_class`).
"""

from __future__ import annotations

from typing import Any

from everyseg.engine.lvis_rules import BUCKET_NAMES

SUBSETS = ("all", "seen", "unseen")
IOU_TYPES = ("segm", "bbox")
MAX_CLASSES = 30


def format_metrics_table(metrics: dict[str, Any], *, max_classes: int = MAX_CLASSES) -> str:
    """Summary APs for all/seen/unseen (and r/c/f) x segm/bbox, then per-class AP, sorted."""
    shown, hidden = _class_rows(metrics, max_classes=max_classes)
    names = [name for name, _, _ in shown]
    name_width = max([len(n) for n in names] + [len("gt-box segm unseen")])
    stat_names = list(metrics["segm"]["all"])  # AP, AP50, AP75, APs, APm, APl
    lines = [_headline(metrics), f"{'':<{name_width}} " + " ".join(f"{s:>6}" for s in stat_names)]
    for iou_type in IOU_TYPES:
        rows = [(subset, metrics[iou_type][subset]) for subset in SUBSETS]
        by_frequency = metrics[iou_type].get("by_frequency", {})
        rows += [(BUCKET_NAMES[b], row) for b, row in by_frequency.items()]
        for subset, row in rows:
            label = f"{iou_type} {subset}"
            lines.append(f"{label:<{name_width}} " + " ".join(_cell(row[s]) for s in stat_names))
    gt_boxes = metrics.get("gt_boxes")
    if gt_boxes is not None:
        for subset in SUBSETS:
            row = gt_boxes["segm"][subset]
            label = f"gt-box segm {subset}"
            lines.append(f"{label:<{name_width}} " + " ".join(_cell(row[s]) for s in stat_names))
        lines.append(_iou_line(gt_boxes))
    lines.append("")
    iou_column = f" {'gt-IoU':>6}" if gt_boxes is not None else ""
    lines.append(f"{'class':<{name_width}} {'segm':>6} {'bbox':>6}{iou_column}  (AP; * = seen)")
    class_iou = gt_boxes["per_class_iou"] if gt_boxes is not None else {}
    seen = set(metrics["seen_classes"])
    frequency = metrics.get("class_frequency", {})
    for position, (name, segm_ap, bbox_ap) in enumerate(shown):
        if hidden and position == len(shown) // 2:
            lines.append(hidden)
        mark = ("*" if name in seen else " ") + frequency.get(name, "")
        iou = f" {_iou_cell(class_iou.get(name))}" if gt_boxes is not None else ""
        lines.append(
            f"{name:<{name_width}} {_cell(segm_ap)} {_cell(bbox_ap)}{iou}  {mark}".rstrip()
        )
    return "\n".join(lines)


def _iou_line(gt_boxes: dict[str, Any]) -> str:
    """Mean mask IoU on ground-truth boxes (class given) per subset, with instance counts."""
    parts = [
        f"{subset} {_iou_cell(gt_boxes['mean_iou'][subset]).strip()} "
        f"({gt_boxes['instances'][subset]})"
        for subset in SUBSETS
    ]
    return "mask IoU on ground-truth boxes, class given (instances): " + ", ".join(parts)


def _iou_cell(value: float | None) -> str:
    """A mean IoU (0..1) with three decimals, '-' when there is no instance."""
    return f"{'-':>6}" if value is None else f"{value:6.3f}"


def _headline(metrics: dict[str, Any]) -> str:
    line = (
        f"{metrics['images']} images; {len(metrics['seen_classes'])} seen classes, "
        f"{len(metrics['unseen_classes'])} unseen"
    )
    if "lvis" in metrics:
        line += (
            f"; LVIS federated rules, at most {metrics['lvis']['max_detections_per_image']} "
            "detections per image"
        )
    if "frequency_buckets" in metrics:
        rule = metrics["frequency_buckets"]["rule"]
        line += f"\nfrequency buckets (r / c / f after a class's mark): {rule}"
    return line


def _class_rows(
    metrics: dict[str, Any], *, max_classes: int
) -> tuple[list[tuple[str, float | None, float | None]], str]:
    """The (name, segm AP, bbox AP) rows to print, best first, and the line standing for the
    rows left out ("" when none are)."""
    bbox = metrics["bbox"]["per_class"]
    rows = [(name, ap, bbox[name]) for name, ap in metrics["segm"]["per_class"].items()]
    rows.sort(key=_rank)
    if len(rows) <= max_classes:
        return rows, ""
    measured = [row for row in rows if row[1] is not None or row[2] is not None]
    half = max_classes // 2
    shown = measured if len(measured) <= 2 * half else measured[:half] + measured[-half:]
    unmeasured = len(rows) - len(measured)
    more = f"... {len(rows) - len(shown)} more classes"
    if unmeasured:
        more += f" ({unmeasured} without ground truth in these images)"
    return shown, more + "; every class's AP: per_class in metrics.json"


def _rank(row: tuple[str, float | None, float | None]) -> tuple:
    """Best mask AP first, then best box AP, then name; classes without AP last."""
    name, segm_ap, bbox_ap = row
    return (segm_ap is None, -(segm_ap or 0.0), bbox_ap is None, -(bbox_ap or 0.0), name)


def _cell(value: float | None) -> str:
    """One table cell: AP with one decimal as COCO prints it, '-' when not measurable."""
    return f"{'-':>6}" if value is None else f"{value:6.1f}"
