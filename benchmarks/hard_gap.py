"""Seen/unseen gap of finished runs, all scored on one fixed seen split (issue 15 item 1).

metrics.json splits seen/unseen by the run's own mask classes, so an oracle run (masks for all
classes) has no "unseen" subset. This reads each run's per-class figures and averages them
over the split given here (the hard benchmark's ``seen_classes.txt``), so the class-agnostic
baseline and the oracle are compared on the same classes:

- gt-box IoU: mean mask IoU on ground-truth boxes with the class given (metrics.json
  ``gt_boxes.per_class_iou``), weighted by the val instances of each class, as metrics.json's
  own seen/unseen figures are;
- gt-box AP and mask AP: the mean of the per-class APs (COCO's subset AP when every class has
  val instances, which this checks); box AP over all classes as metrics.json has it;
- gt-box IoU of the window and the hole classes (categories' "cutout" field in the hard
  data), the mean over those classes: does a head put the cut-out in the mask or not.

    python benchmarks/hard_gap.py DATA/seen_classes.txt DATA/annotations/val.json RUN [RUN ...]

One row per run, then per name prefix before "-s" (runs named KIND-sSEED) the mean and standard
deviation over seeds; the last line prints the mean unseen gt-box IoU of each kind. With
``--paired REF OTHER`` (two kinds, e.g. ``--paired baseline oracle``) it also prints OTHER - REF
per seed both have, and its mean with the half width of a 95 % Student t interval.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from everyseg.data.splits import resolve_mask_classes
from everyseg.engine.study_table import paired_interval

COLUMNS = (
    "iou_seen", "iou_unseen", "gtap_seen", "gtap_unseen", "ap_seen", "ap_unseen", "box_ap",
    "iou_window", "iou_hole",
)  # fmt: skip


def val_classes(val_json: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Val instances per class name, and each class's "cutout" (window | hole)."""
    data = json.loads(val_json.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    counts = Counter(names[a["category_id"]] for a in data["annotations"] if not a["iscrowd"])
    cutouts = {c["name"]: c.get("cutout", "") for c in data["categories"]}
    return {name: counts[name] for name in names.values()}, cutouts


def run_row(
    run: Path, seen: set[str], counts: dict[str, int], cutouts: dict[str, str]
) -> dict[str, float]:
    metrics = json.loads((run / "metrics.json").read_text())
    gt = metrics["gt_boxes"]
    row = {"box_ap": metrics["bbox"]["all"]["AP"]}
    for subset, names in (("seen", seen), ("unseen", set(counts) - seen)):
        weights = {n: counts[n] for n in names}
        ious = gt["per_class_iou"]
        row[f"iou_{subset}"] = sum(ious[n] * w for n, w in weights.items()) / sum(weights.values())
        row[f"gtap_{subset}"] = statistics.fmean(gt["segm"]["per_class"][n] for n in names)
        row[f"ap_{subset}"] = statistics.fmean(metrics["segm"]["per_class"][n] for n in names)
    for kind in ("window", "hole"):
        ious = [gt["per_class_iou"][n] for n in counts if cutouts[n] == kind]
        row[f"iou_{kind}"] = statistics.fmean(ious) if ious else float("nan")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seen", help="the seen split (a data.mask_classes spec)")
    parser.add_argument("val_json", type=Path, help="the val set the runs were scored on")
    parser.add_argument("runs", type=Path, nargs="+", help="run directories, named KIND-sSEED")
    parser.add_argument(
        "--paired", nargs=2, metavar=("REF", "OTHER"), help="print OTHER - REF paired by seed"
    )
    args = parser.parse_args()
    counts, cutouts = val_classes(args.val_json)
    if not all(counts.values()):
        raise SystemExit(
            f"classes without val instances: {[n for n, c in counts.items() if not c]}"
        )
    seen = set(resolve_mask_classes(args.seen, list(counts)))
    kinds = defaultdict(list)
    by_seed: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
    print(f"{'run':<16}" + "".join(f"{c:>14}" for c in COLUMNS))
    for run in args.runs:
        row = run_row(run, seen, counts, cutouts)
        kind, seed = run.name.rsplit("-s", 1)
        kinds[kind].append(row)
        by_seed[kind][int(seed)] = row
        print(f"{run.name:<16}" + "".join(f"{row[c]:>14.3f}" for c in COLUMNS))
    for kind, rows in kinds.items():
        cells = []
        for c in COLUMNS:
            values = [r[c] for r in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.3f}±{spread:.3f}")
        print(f"{kind + ' mean':<16}" + "".join(f"{cell:>14}" for cell in cells))
    summary = {
        k: round(statistics.fmean(r["iou_unseen"] for r in rows), 3) for k, rows in kinds.items()
    }
    print(f"unseen gt-box IoU by kind (mean over seeds): {summary}")
    if args.paired:
        print_paired(by_seed[args.paired[0]], by_seed[args.paired[1]], args.paired)


def print_paired(
    ref: dict[int, dict[str, float]], other: dict[int, dict[str, float]], names: list[str]
) -> None:
    """OTHER - REF for each seed both have, then the mean +- the 95 % interval's half width."""
    seeds = sorted(ref.keys() & other.keys())
    label = f"{names[1]} - {names[0]}"
    print(f"{label:<24}" + "".join(f"{c:>14}" for c in COLUMNS))
    for seed in seeds:
        cells = "".join(f"{other[seed][c] - ref[seed][c]:>14.3f}" for c in COLUMNS)
        print(f"{'seed ' + str(seed):<24}" + cells)
    cells = []
    for c in COLUMNS:
        found = paired_interval({s: other[s][c] for s in seeds}, {s: ref[s][c] for s in seeds})
        if found is None:
            cells.append("-")
        else:
            mean, half, _ = found
            cells.append(f"{mean:.3f}" + ("" if half is None else f"±{half:.3f}"))
    print(f"{f'mean, 95% CI ({len(seeds)} seeds)':<24}" + "".join(f"{x:>14}" for x in cells))


if __name__ == "__main__":
    main()
