"""What merging data.train_sources did: the merged part of the start-up summary and of
`check-data` (each source's own report is `everyseg.data.report`'s)."""

from __future__ import annotations

import dataclasses
from collections import Counter

from everyseg.data.report import class_table, format_report, report
from everyseg.data.sources import DUPLICATE_IOU, MergedIndex


def merged_report(merged: MergedIndex) -> dict:
    """Per source what merging kept, left out and joined; the merged classes; name matches."""
    labels = merged.instances.labels  # (N,) a column: no Instance built
    boxes = Counter(labels.tolist())
    masks = Counter(labels[merged.instances.has_mask].tolist())
    mask_classes = set(merged.mask_class_names)
    classes = [
        {
            "name": name,
            "category_id": merged.label_to_cat_id[label],
            "mask_class": name in mask_classes,
            "boxes": boxes[label],
            "masks": masks[label],
        }
        for label, name in enumerate(merged.class_names, start=1)
    ]
    return {
        "json": "data.train_sources",
        "images_dir": ", ".join(str(s.images_dir) for s in merged.sources),
        "pixels_decoded": merged.decoded_images,
        "images": len(merged.image_ids),
        "instances": sum(boxes.values()),
        "with_masks": sum(masks.values()),
        "duplicate_iou": DUPLICATE_IOU,
        "sources": [
            {"json": str(s.json_path), **dataclasses.asdict(counts)}
            for s, counts in zip(merged.sources, merged.counts)
        ],
        "classes": classes,
        "name_matches": merged.vocabulary.notes,
        "num_bad": 0,  # bad samples are in the sources' own reports
    }


def format_merged_report(rep: dict) -> str:
    lines = [
        f"merged: {rep['images']} images, {rep['instances']} instances "
        f"({rep['with_masks']} with masks), {len(rep['classes'])} classes "
        f"({sum(c['mask_class'] for c in rep['classes'])} mask classes)"
    ]
    for source in rep["sources"]:
        lines.append(
            f"  {source['json']}: {source['images']} images, {source['shared']} merged into "
            f"an earlier source's copy, {source['duplicates']} duplicate instances dropped "
            f"(same class, box IoU >= {rep['duplicate_iou']}), {source['rescaled']} boxes "
            f"scaled to the merged image's size ({source['masks_dropped']} masks dropped), "
            f"{len(source['val_excluded'])} val images left out" + _ids(source["val_excluded"])
        )
        lines += [f"    {apart}" for apart in source["kept_apart"]]
    if rep["name_matches"]:
        lines += ["class names matched:", *(f"  {note}" for note in rep["name_matches"])]
    lines += class_table(rep["classes"], with_ids=True)
    return "\n".join(lines)


def format_merged_summary(merged: MergedIndex) -> str:
    """The start-up summary of several sources: each source's report, then the merge's."""
    parts = [
        f"== data.train_sources[{i}]\n{format_report(report(source))}"
        for i, source in enumerate(merged.sources)
    ]
    return "\n".join([*parts, format_merged_report(merged_report(merged))])


def _ids(ids: list[int], limit: int = 20) -> str:
    if not ids:
        return ""
    more = ", ..." if len(ids) > limit else ""
    return f" (image ids: {', '.join(map(str, ids[:limit]))}{more})"
