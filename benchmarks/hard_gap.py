"""Seen/unseen gap of finished runs, all scored on one fixed seen split (issue 15 item 1).

metrics.json splits seen/unseen by the run's own mask classes, so an oracle run (masks for all
classes) has no "unseen" subset. This reads each run's per-class figures and averages them
over the split given here (the hard benchmark's ``seen_classes.txt``), so the class-agnostic
baseline and the oracle are compared on the same classes:

- gt-box IoU: mean mask IoU on ground-truth boxes with the class given (metrics.json
  ``gt_boxes.per_class_iou``), weighted by the val instances of each class, as metrics.json's
  own seen/unseen figures are;
- gt-box AP and mask AP: the mean of the per-class APs (COCO's subset AP when every class has
  val instances, which this checks); box AP over all classes as metrics.json has it.

    python benchmarks/hard_gap.py DATA/seen_classes.txt DATA/annotations/val.json RUN [RUN ...]

One row per run, then per name prefix before "-s" (runs named KIND-sSEED) the mean and standard
deviation over seeds; the last line prints the mean unseen gt-box IoU of each kind.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from everyseg.data.splits import resolve_mask_classes

COLUMNS = ("iou_seen", "iou_unseen", "gtap_seen", "gtap_unseen", "ap_seen", "ap_unseen", "box_ap")


def instance_counts(val_json: Path) -> dict[str, int]:
    data = json.loads(val_json.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    counts = Counter(names[a["category_id"]] for a in data["annotations"] if not a["iscrowd"])
    return {name: counts[name] for name in names.values()}


def run_row(run: Path, seen: set[str], counts: dict[str, int]) -> dict[str, float]:
    metrics = json.loads((run / "metrics.json").read_text())
    gt = metrics["gt_boxes"]
    row = {"box_ap": metrics["bbox"]["all"]["AP"]}
    for subset, names in (("seen", seen), ("unseen", set(counts) - seen)):
        weights = {n: counts[n] for n in names}
        ious = gt["per_class_iou"]
        row[f"iou_{subset}"] = sum(ious[n] * w for n, w in weights.items()) / sum(weights.values())
        row[f"gtap_{subset}"] = statistics.fmean(gt["segm"]["per_class"][n] for n in names)
        row[f"ap_{subset}"] = statistics.fmean(metrics["segm"]["per_class"][n] for n in names)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seen", help="the seen split (a data.mask_classes spec)")
    parser.add_argument("val_json", type=Path, help="the val set the runs were scored on")
    parser.add_argument("runs", type=Path, nargs="+", help="run directories, named KIND-sSEED")
    args = parser.parse_args()
    counts = instance_counts(args.val_json)
    if not all(counts.values()):
        raise SystemExit(
            f"classes without val instances: {[n for n, c in counts.items() if not c]}"
        )
    seen = set(resolve_mask_classes(args.seen, list(counts)))
    kinds = defaultdict(list)
    print(f"{'run':<16}" + "".join(f"{c:>12}" for c in COLUMNS))
    for run in args.runs:
        row = run_row(run, seen, counts)
        kinds[run.name.rsplit("-s", 1)[0]].append(row)
        print(f"{run.name:<16}" + "".join(f"{row[c]:>12.3f}" for c in COLUMNS))
    for kind, rows in kinds.items():
        cells = []
        for c in COLUMNS:
            values = [r[c] for r in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.3f}±{spread:.3f}")
        print(f"{kind + ' mean':<16}" + "".join(f"{cell:>12}" for cell in cells))
    summary = {
        k: round(statistics.fmean(r["iou_unseen"] for r in rows), 3) for k, rows in kinds.items()
    }
    print(f"unseen gt-box IoU by kind (mean over seeds): {summary}")


if __name__ == "__main__":
    main()
