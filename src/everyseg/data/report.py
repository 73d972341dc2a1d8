"""What a dataset holds and what is wrong with it: the start-up summary and `check-data`.

From a `CocoIndex`: images found / missing / unreadable / size-mismatched / without
annotations, annotations skipped, masks dropped and repairs by reason with their ids, and per
class the boxes and masks kept. The catalogue of bad inputs and what happens to each is
docs/bad_input.md; tests/test_bad_input.py has one test per kind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from everyseg.data.index import CocoIndex
from everyseg.data.validate import (
    ANNOTATION,
    IMAGE,
    KEYPOINTS,
    MASK,
    NO_SEGMENTATION,
    NOTE,
    REPAIR,
    Finding,
    Reason,
)

# report section -> finding kind; the first three are bad samples
SECTIONS = {
    "skipped_images": IMAGE,
    "skipped_annotations": ANNOTATION,
    "dropped_masks": MASK,
    "dropped_keypoints": KEYPOINTS,
    "repaired": REPAIR,
    "notes": NOTE,
}
_BAD_SECTIONS = ("skipped_images", "skipped_annotations", "dropped_masks", "dropped_keypoints")
_IMAGE_COUNTS = (
    "missing",
    "unreadable",
    "size_mismatch",
    "malformed_entry",
    "outside_images",
    "unusable_size",
)
# images whose file was never opened: the entry or the config already ruled them out
_NOT_LOOKED_FOR = ("missing", "malformed_entry", "outside_images", "unusable_size")


def report(index: CocoIndex) -> dict:
    """Counts, classes and every finding by section and reason, as JSON-ready data."""
    sections = {
        section: {
            reason.key: {"reason": reason.text, "items": [f.as_dict() for f in found]}
            for reason, found in index.findings.by_reason((kind,)).items()
        }
        for section, kind in SECTIONS.items()
    }
    skipped = sections["skipped_images"]
    images = {key: len(skipped.get(key, {}).get("items", ())) for key in _IMAGE_COUNTS}
    images = {"total": index.num_json_images, "usable": len(index.image_ids), **images}
    images["found"] = images["total"] - sum(images[key] for key in _NOT_LOOKED_FOR)
    images["without_annotations"] = len(
        sections["notes"].get("without_annotations", {}).get("items", ())
    )
    classes = index.class_counts()
    return {
        "json": str(index.json_path),
        "images_dir": str(index.images_dir),
        "on_bad_sample": index.findings.policy,
        # False: headers and PNG / JPEG end markers were read, not the pixels (`--decode`)
        "pixels_decoded": index.decoded_images,
        "images": images,
        "annotations": {
            "total": index.num_json_annotations,
            "instances": sum(c["boxes"] for c in classes),
            "with_masks": sum(c["masks"] for c in classes),
        },
        "classes": classes,
        **sections,
        "num_bad": index.findings.num_bad,
    }


MAX_CLASS_ROWS = 40


def class_table(classes: list[dict], *, with_ids: bool = False) -> list[str]:
    """Boxes and masks per class. A large vocabulary (over MAX_CLASS_ROWS classes, e.g. 3,000
    from Visual Genome) shows its mask classes and its most and least frequent classes only,
    and says where the full list is."""
    rows = classes
    if len(classes) > MAX_CLASS_ROWS:
        by_boxes = sorted(classes, key=lambda c: (-c["boxes"], c["name"]))
        half = MAX_CLASS_ROWS // 2
        masked = [c for c in by_boxes if c["mask_class"]][:half]
        rest = [c for c in by_boxes if not c["mask_class"]]
        rows = masked + rest[: half // 2] + rest[len(rest) - half // 2 :]
    id_head = f" {'id':>6}" if with_ids else ""
    lines = [f"  {'class':<24}{id_head} {'boxes':>7} {'masks':>7}"]
    for c in rows:
        star = "*" if c["mask_class"] else " "
        cat_id = f" {c['category_id']:>6}" if with_ids else ""
        lines.append(f"{star} {c['name']:<24}{cat_id} {c['boxes']:>7} {c['masks']:>7}")
    if len(rows) < len(classes):
        lines.append(
            f"... {len(classes) - len(rows)} more classes (shown: the most frequent mask "
            "classes, then the most and the least frequent others); `everyseg check-data "
            "--json` lists every class"
        )
    lines.append("(* = mask class)")
    return lines


def format_report(rep: dict) -> str:
    """The report as the start-up summary prints it: every bad sample named with its reason."""
    im, ann = rep["images"], rep["annotations"]
    masked = sum(c["mask_class"] for c in rep["classes"])
    lines = [
        f"{Path(rep['json']).name}: {im['usable']} images ({im['without_annotations']} without "
        f"instances), {ann['total']} annotations -> {ann['instances']} instances "
        f"({ann['with_masks']} with masks)",
        f"images in the JSON: {im['total']}, found {im['found']}, missing {im['missing']}, "
        f"unreadable {im['unreadable']}, size mismatch {im['size_mismatch']}, "
        f"malformed entries {im['malformed_entry']}, outside the images folder "
        f"{im['outside_images']}, too small once resized {im['unusable_size']}",
        f"mask classes: {masked} of {len(rep['classes'])}",
        *class_table(rep["classes"]),
    ]
    lines.append(
        f"bad samples: {rep['num_bad']} (data.on_bad_sample={rep['on_bad_sample']}: image "
        "skipped, annotation skipped, or mask dropped and box kept)"
    )
    for section in _BAD_SECTIONS:  # every bad sample is named
        lines += _reason_lines(rep[section], max_ids=None, detailed=section == "skipped_images")
    for section in ("repaired", "notes"):  # normal enough to abbreviate
        if rep[section]:
            lines += [f"{section}:", *_reason_lines(rep[section], max_ids=20)]
    return "\n".join(lines)


def _reason_lines(groups: dict[str, dict], *, max_ids: int | None, detailed=False) -> list[str]:
    lines = []
    for group in groups.values():
        items = group["items"]
        if detailed:  # skipped images: few, and the file and the why are what the user needs
            lines.append(f"  {group['reason']}: {len(items)}")
            lines += [f"    {_image_line(item)}" for item in items]
            continue
        what = "annotation ids" if "ann_id" in items[0] else "image ids"
        ids = [item.get("ann_id", item.get("image_id", item.get("detail"))) for item in items]
        shown = ids if max_ids is None else ids[:max_ids]
        more = ", ..." if len(shown) < len(ids) else ""
        lines.append(
            f"  {group['reason']}: {len(ids)} ({what}: {', '.join(map(str, shown))}{more})"
        )
    return lines


def _image_line(item: dict) -> str:
    line = f"image {item.get('image_id', '?')}" + (f", {item['file']}" if "file" in item else "")
    return line + (f": {item['detail']}" if "detail" in item else "")


def training_problem(index: CocoIndex) -> str | None:
    """Why this set cannot train what it is meant to, or None: it has no instance at all,
    or mask classes without a single usable mask (the mask loss would be 0 all run)."""
    labels = index.instances.labels  # (N,) every kept instance's, a column: no Instance built
    if not len(labels):
        skipped = _reason_counts(index.findings.by_reason((ANNOTATION,)))
        return (
            f"{index.json_path}: no usable instance in {index.num_json_annotations} "
            f"annotations ({skipped or 'none given'}); nothing to train on"
        )
    if not index.mask_class_names or index.instances.has_mask.any():
        return None
    mask_labels = [index.class_names.index(n) + 1 for n in index.mask_class_names]
    num = int(np.isin(labels, mask_labels).sum())
    dropped = index.findings.by_reason((MASK,))
    box_only = [f for f in index.findings.items if f.reason is NO_SEGMENTATION]
    if box_only:
        dropped[NO_SEGMENTATION] = box_only
    names = ", ".join(index.mask_class_names[:8])
    more = ", ..." if len(index.mask_class_names) > 8 else ""
    return (
        f"{index.json_path}: none of the {num} instances of the mask classes ({names}{more}) "
        f"has a usable mask, so the mask loss would be 0 all run: "
        f"{_reason_counts(dropped) or 'they have no instances'}. Fix the segmentations "
        "(everyseg check-data lists them), or set data.mask_classes=none to train boxes only"
    )


def _reason_counts(grouped: dict[Reason, list[Finding]]) -> str:
    """'reason: count, ...' with an example's detail: what the start-up error shows."""
    parts = []
    for reason, found in grouped.items():
        example = next((f.detail for f in found if f.detail), "")
        parts.append(f"{reason.text}: {len(found)}" + (f" (e.g. {example})" if example else ""))
    return "; ".join(parts)
