"""One COCO / LVIS JSON file checked entry by entry: what the loader and `check-data` share.

Bad data never passes silently: every entry and every image file's header is checked at
start-up (the catalogue: docs/bad_input.md), `on_bad_sample` (error | skip | warn) is applied,
and every finding is kept, by reason, for the summary (`everyseg.data.report.report`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from everyseg.data.columns import NO_SEGM, GroundTruthTable, InstanceTable, SegmColumns
from everyseg.data.compact_masks import compact
from everyseg.data.images import image_file_problem
from everyseg.data.json_stream import read_coco_streamed
from everyseg.data.keypoints import (
    NO_KEYPOINTS,
    KeypointLayout,
    KeypointTable,
    build_layout,
    class_keypoint_names,
    keypoint_ground_truth,
    read_keypoints,
)
from everyseg.data.lvis import image_lists, read_frequencies
from everyseg.data.segmentation import box_mask_mismatch, check_segmentation
from everyseg.data.splits import resolve_mask_classes
from everyseg.data.validate import (
    ANN_DUPLICATE,
    ANN_ENTRY,
    ANN_ID,
    BAD_AREA,
    BAD_CROWD_FLAG,
    BAD_KEYPOINTS,
    BOX_MASK_MISMATCH,
    CROWD,
    IMAGE,
    IMAGE_ENTRY,
    IMAGE_TOO_THIN,
    NO_ANNOTATIONS,
    NO_SEGMENTATION,
    SKIPPED_IMAGE,
    UNKNOWN_CATEGORY,
    UNKNOWN_IMAGE,
    DataError,
    Finding,
    Findings,
    Reason,
    as_int,
    check_box,
    is_number,
    read_categories,
    resize_problem,
)


@dataclass(frozen=True, slots=True)
class ImageMeta:
    path: Path
    height: int
    width: int


class CocoIndex:
    """The usable images and annotations of one COCO JSON file, and every finding about it.

    Raises DataError for problems of the file as a whole (not JSON, missing top-level lists,
    bad or duplicate categories, duplicate image ids, no usable image), and under
    `on_bad_sample="error"` for the first bad image or annotation. `decode_images` decodes every
    image instead of reading its header and end only (slower; finds corrupt pixel data).

    An image's `file_name` must lead inside `images_dir` (no absolute paths, `..` or symlinks
    out) unless `allow_outside_images`. With `min_sizes` and `max_size` (the model's resize),
    an image whose shorter side would shrink under MIN_RESIZED_SIDE px is a bad image.

    The file's 'annotations' are read one at a time (data.json_stream), and what is kept is
    stored as columns (data.columns): `instances` maps an image id to its `Instance`s.

    Keypoints (data.keypoints) are read only when asked: `keypoint_classes` (a
    data.keypoint_classes spec) builds the shared keypoint list from the file's categories,
    `keypoint_layout` (a trained model's) reads the file into that list; `keypoint_layout`
    is then the list used, else None.
    """

    def __init__(
        self,
        *,
        json_path: str | os.PathLike,
        images_dir: str | os.PathLike,
        mask_classes="all",
        on_bad_sample: str = "skip",
        decode_images: bool = False,
        allow_outside_images: bool = False,
        min_sizes: Sequence[int] | None = None,
        max_size: int | None = None,
        keypoint_classes=None,
        keypoint_layout: KeypointLayout | None = None,
    ):
        self.json_path = Path(json_path)
        self.images_dir = Path(images_dir)
        self._allow_outside_images = allow_outside_images
        self.decoded_images = decode_images
        self._resize = None if min_sizes is None or max_size is None else (min_sizes, max_size)
        self.findings = Findings(source=self.json_path, policy=on_bad_sample)
        data, annotations, self.num_json_annotations = read_coco_streamed(self.json_path)
        categories = read_categories(data["categories"], self.json_path)
        self.class_names: list[str] = [name for _, name in categories]
        # LVIS fields, kept for federated evaluation (everyseg.data.lvis)
        self.category_frequency = read_frequencies(data["categories"], self.json_path)
        self.image_lists: dict[int, dict[str, list[int]]] = {}
        self.cat_id_to_label = {cid: i + 1 for i, (cid, _) in enumerate(categories)}
        self.label_to_cat_id = {label: cid for cid, label in self.cat_id_to_label.items()}
        self.mask_class_names = resolve_mask_classes(mask_classes, self.class_names)
        mask_labels = {self.class_names.index(n) + 1 for n in self.mask_class_names}
        self._read_keypoint_categories(data["categories"], keypoint_classes, keypoint_layout)
        self.skipped_image_ids: set[int] = set()
        self.coco_ids: dict[int, int] = {}  # image id -> its entry's `coco_id`, where it has one
        entries = self._read_image_entries(data["images"])
        self.num_json_images = len(data["images"])
        del data  # the entries as Python objects: only what was kept stays
        self.images = self._check_image_files(entries, decode=decode_images)
        self.image_ids = sorted(self.images)
        self._segms = SegmColumns()
        self.instances = InstanceTable(self._segms, self.keypoints)
        # every kept annotation (crowd ones too) as sanitised COCO, for evaluation
        self._ground_truth = GroundTruthTable(self._segms)
        seen: set[int] = set()
        for position, ann in enumerate(annotations):
            self._add_annotation(ann, position=position, seen=seen, mask_labels=mask_labels)
        for table in (self._segms, self.instances, self._ground_truth, self.keypoints):
            table.freeze()
        for image_id in self.image_ids:
            if image_id not in self.instances:
                self.findings.add(Finding(NO_ANNOTATIONS, image_id=image_id))
        if not self.image_ids:
            raise DataError(f"{self.json_path}: no usable images ({self._why_empty()})")

    def _read_keypoint_categories(self, categories, spec, layout) -> None:
        if layout is None and spec is not None:
            layout = build_layout(
                categories, class_names=self.class_names, spec=spec, source=self.json_path
            )
        self.keypoint_layout: KeypointLayout | None = layout
        self.keypoints = KeypointTable(len(layout.names) if layout else 0)
        # label -> its category's keypoint names, for the keypoint classes
        self._keypoint_names = class_keypoint_names(
            categories, layout, class_names=self.class_names, source=self.json_path
        )

    def _flag(self, reason: Reason, detail: str = "", **where) -> None:
        self.findings.add(Finding(reason, detail, **where))

    def _read_image_entries(self, images: list) -> dict[int, ImageMeta]:
        ids = [as_int(img.get("id")) for img in images if isinstance(img, dict)]
        dup = sorted(i for i, n in Counter(ids).items() if i is not None and n > 1)
        if dup:
            # annotations could not be told apart between the duplicates
            raise DataError(f"{self.json_path}: duplicate image id(s) in 'images': {dup}")
        entries: dict[int, ImageMeta] = {}
        for position, img in enumerate(images):
            image_id, meta, problem = _image_entry(img, self.images_dir)
            if image_id is None or meta is None:  # then `problem` says why
                self._flag(IMAGE_ENTRY, f"images[{position}]: {problem}", image_id=image_id)
            elif self._resize and (
                thin := resize_problem(
                    meta.width, meta.height, min_sizes=self._resize[0], max_size=self._resize[1]
                )
            ):
                self._flag(IMAGE_TOO_THIN, thin, image_id=image_id, file=str(meta.path))
            else:
                entries[image_id] = meta
                # Visual Genome's link to the same picture in COCO (data.sources merges them)
                if (coco_id := as_int(img.get("coco_id"))) is not None:
                    self.coco_ids[image_id] = coco_id
                lists, _ = image_lists(img)
                if lists:
                    self.image_lists[image_id] = lists
        self.skipped_image_ids.update(i for i in ids if i is not None and i not in entries)
        return entries

    def _check_image_files(self, entries: dict[int, ImageMeta], *, decode: bool) -> dict:
        inside = None if self._allow_outside_images else os.path.realpath(self.images_dir)

        def probe(meta: ImageMeta):
            return image_file_problem(
                meta.path,
                width=meta.width,
                height=meta.height,
                decode=decode,
                real_images_dir=inside,
            )

        usable = {}
        # threads: the cost is file-system latency, which overlaps well
        pool = ThreadPoolExecutor(max_workers=8)
        try:
            problems = pool.map(probe, entries.values())
            for (image_id, meta), problem in zip(entries.items(), problems):
                if problem is None:
                    usable[image_id] = meta
                    continue
                self.skipped_image_ids.add(image_id)
                self._flag(*problem, image_id=image_id, file=str(meta.path))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return usable

    def _add_annotation(self, ann, *, position: int, seen: set[int], mask_labels: set) -> None:
        resolved = self._resolve(ann, position=position, seen=seen)
        if resolved is None:
            return
        where, image, label, crowd = resolved
        reason, box = check_box(ann.get("bbox"), width=image.width, height=image.height)
        if reason:
            self._flag(reason, f"bbox {ann.get('bbox')!r}", **where)
        if box is None:
            return
        segm = NO_SEGM
        if label in mask_labels:
            usable, found = check_segmentation(
                ann.get("segmentation"), width=image.width, height=image.height
            )
            for reason, detail in found:
                if not (crowd and reason is NO_SEGMENTATION):
                    self._flag(reason, detail, **where)
            mismatch = usable and box_mask_mismatch(
                usable, box, width=image.width, height=image.height
            )
            if mismatch:
                self._flag(BOX_MASK_MISMATCH, mismatch, **where)
                return
            if usable is not None:
                compacted = compact(usable, height=image.height, width=image.width)
                segm = self._segms.append(compacted)
        keypoints = NO_KEYPOINTS
        if label in self._keypoint_names and not crowd:
            keypoints = self._add_keypoints(ann, where, image, self._keypoint_names[label])
        if crowd:
            self._flag(CROWD, **where)
        else:
            self.instances.add(**where, label=label, box=box, segm=segm, keypoints=keypoints)
        self._add_ground_truth(ann, where, segm=segm, crowd=crowd)

    def _add_keypoints(self, ann, where: dict, image: ImageMeta, local: list[str]) -> int:
        """The annotation's keypoint row, NO_KEYPOINTS when it has none or bad ones (flagged:
        its box and mask are kept)."""
        assert self.keypoint_layout is not None
        values, problem = read_keypoints(
            ann, local=local, layout=self.keypoint_layout, width=image.width, height=image.height
        )
        if problem:
            self._flag(BAD_KEYPOINTS, problem, **where)
        if values is None:
            return NO_KEYPOINTS
        return self.keypoints.append(where["ann_id"], values)

    def _resolve(self, ann, *, position: int, seen: set[int]) -> tuple | None:
        """(where, image, label, crowd flag) if the annotation's ids resolve, else None."""
        if not isinstance(ann, dict):
            self._flag(ANN_ENTRY, f"annotations[{position}] is {type(ann).__name__}")
            return None
        raw_id = ann.get("id")
        ann_id = as_int(raw_id)
        if ann_id is None or ann_id <= 0:
            # COCOeval treats a ground-truth id of 0 as "unmatched"
            self._flag(ANN_ID, f"annotations[{position}] has id {raw_id!r}", ann_id=_scalar(raw_id))
            return None
        if ann_id in seen:
            self._flag(ANN_DUPLICATE, ann_id=ann_id, image_id=_scalar(ann.get("image_id")))
            return None
        seen.add(ann_id)
        image = self._image_of(ann, ann_id)
        if image is None:
            return None
        where = {"ann_id": ann_id, "image_id": as_int(ann["image_id"])}
        cat_id = as_int(ann.get("category_id"))
        label = None if cat_id is None else self.cat_id_to_label.get(cat_id)
        if label is None:
            cats = sorted(self.cat_id_to_label)
            detail = f"category_id {ann.get('category_id')!r}; categories: {cats}"
            self._flag(UNKNOWN_CATEGORY, detail, **where)
            return None
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            self._flag(BAD_CROWD_FLAG, f"iscrowd {crowd!r}", **where)
            return None
        return where, image, label, crowd

    def _image_of(self, ann: dict, ann_id: int) -> ImageMeta | None:
        image_id = as_int(ann.get("image_id"))
        if image_id in self.skipped_image_ids:
            self._flag(SKIPPED_IMAGE, ann_id=ann_id, image_id=image_id)
            return None
        if image_id not in self.images:
            self._flag(UNKNOWN_IMAGE, f"image_id {ann.get('image_id')!r}", ann_id=ann_id)
            return None
        return self.images[image_id]

    def _add_ground_truth(self, ann: dict, where: dict, *, segm: int, crowd) -> None:
        # the JSON's own box and area, not the clipped box: AP stays comparable with COCO's tools
        x, y, w, h = (float(v) for v in ann["bbox"])
        area = ann.get("area", w * h)  # COCOeval needs an area; the box's is the usual stand-in
        if not is_number(area) or area < 0:
            self._flag(BAD_AREA, f"area {area!r}", **where)
            area = w * h
        self._ground_truth.add(
            ann_id=where["ann_id"],
            image_id=where["image_id"],
            category_id=as_int(ann["category_id"]),
            bbox=(x, y, w, h),
            area=float(area),
            crowd=int(crowd),
            segm=segm,
        )

    def _why_empty(self) -> str:
        if not self.num_json_images:
            return "'images' is empty"
        skipped = [f for f in self.findings.items if f.reason.kind == IMAGE]
        counts = Counter(f.reason.text for f in skipped)
        reasons = ", ".join(f"{n} {text}" for text, n in counts.items())
        example = skipped[0].where() + (f": {skipped[0].detail}" if skipped[0].detail else "")
        return f"all {self.num_json_images} skipped: {reasons}; e.g. {example}"

    def ground_truth(self) -> dict:
        """The usable part as a COCO dict for evaluation: crowd annotations included, and
        segmentations of the mask classes (build with mask_classes="all" to score every mask)."""
        sizes = {i: (m.height, m.width) for i, m in self.images.items()}
        gt = {
            "images": [
                {"id": i, "width": m.width, "height": m.height, "file_name": str(m.path)}
                | self.image_lists.get(i, {})
                for i, m in sorted(self.images.items())
            ],
            "annotations": self._ground_truth.annotations(sizes),
            "categories": [
                self._gt_category(label, name)
                for label, name in enumerate(self.class_names, start=1)
            ],
        }
        if self.keypoint_layout is None:
            return gt
        cat_ids = {self.label_to_cat_id[label] for label in self._keypoint_names}
        return keypoint_ground_truth(gt, self.keypoints, self.keypoint_layout, cat_ids=cat_ids)

    def _gt_category(self, label: int, name: str) -> dict:
        cat_id = self.label_to_cat_id[label]
        frequency = self.category_frequency.get(cat_id)
        return {"id": cat_id, "name": name} | ({"frequency": frequency} if frequency else {})

    def class_counts(self) -> list[dict]:
        """Per class: name, category id, whether it is a mask class, boxes and masks kept."""
        labels, num_labels = self.instances.labels, len(self.class_names) + 1
        boxes = np.bincount(labels, minlength=num_labels)  # (K + 1,) by label
        masks = np.bincount(labels[self.instances.has_mask], minlength=num_labels)
        mask_classes = set(self.mask_class_names)
        return [
            {
                "name": name,
                "category_id": self.label_to_cat_id[label],
                "mask_class": name in mask_classes,
                "boxes": int(boxes[label]),
                "masks": int(masks[label]),
            }
            for label, name in enumerate(self.class_names, start=1)
        ]


def _image_entry(img, images_dir: Path) -> tuple[int | None, ImageMeta | None, str | None]:
    """(image id, metadata, problem) of one entry of 'images'."""
    if not isinstance(img, dict):
        return None, None, f"not a JSON object: {img!r:.60}"
    image_id = as_int(img.get("id"))
    width, height = as_int(img.get("width")), as_int(img.get("height"))
    name = img.get("file_name")
    if name is None and isinstance(img.get("coco_url"), str):
        # LVIS has no file_name; detectron2's convention: <images_dir>/<split>/<file>
        name = "/".join(img["coco_url"].split("/")[-2:])
    if image_id is None:
        return None, None, f"id {img.get('id')!r} is not an integer"
    if width is None or height is None or width <= 0 or height <= 0:
        return image_id, None, f"width/height {img.get('width')!r}/{img.get('height')!r}"
    if not isinstance(name, str) or not name:
        return image_id, None, "no 'file_name' (or LVIS 'coco_url')"
    _, lvis_problem = image_lists(img)
    if lvis_problem:
        return image_id, None, lvis_problem
    return image_id, ImageMeta(images_dir / name, height, width), None


def _scalar(value):
    """An id as it can go in a report (JSON-safe): None, ints and strings as they are."""
    if value is None or (isinstance(value, (int, str)) and not isinstance(value, bool)):
        return value
    return repr(value)
