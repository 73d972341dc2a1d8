"""COCO / LVIS instance JSON -> per-image training targets with per-instance `has_mask`.

Partial supervision is data: each annotation is judged on its own. It keeps its mask only if
it has a usable `segmentation` and its class is in `mask_classes`; otherwise it is a box-only
instance (`has_mask` False, all-zero mask). Nothing is inferred per image. Annotations that
cannot be training instances (crowd, degenerate box, unknown image) are skipped, and every
skip is counted by reason with its annotation ids in `summary()` -- never silently.
"""

from __future__ import annotations

import json
import operator
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pycocotools.mask as mask_utils
import torch
from torch import Tensor

from everyseg.data.splits import resolve_mask_classes
from everyseg.data.transforms import hflip, load_image

# Skip / box-only reasons, as printed by summary().
CROWD = "crowd (iscrowd=1)"
DEGENERATE = "degenerate box (< 1 px after clipping to the image)"
UNKNOWN_IMAGE = "image id not in 'images'"
NO_SEGMENTATION = "no segmentation"
NO_VALID_POLYGON = "no valid polygon (all have < 3 points)"
BAD_SEGMENTATION = "unreadable segmentation (bad format or RLE size != image size)"


@dataclass(frozen=True, slots=True)
class _Image:
    path: Path
    height: int
    width: int


@dataclass(frozen=True, slots=True)
class _Instance:
    ann_id: int
    label: int
    box: tuple[float, float, float, float]  # xyxy, clipped to the image
    segm: list | dict | None  # None: box-only


class CocoInstances(torch.utils.data.Dataset):
    """Instance-segmentation dataset over a COCO-format (or LVIS) JSON file.

    `dataset[i]` or `dataset[(i, aug_seed)]` returns `(image, target)`:
      image: float32 (3, H, W) RGB in [0, 1].
      target: `boxes` float32 (N, 4) xyxy pixels, `labels` int64 (N,) in 1..K,
        `masks` uint8 (N, H, W) (zeros where `has_mask` is False), `has_mask` bool (N,),
        `image_id` int64 scalar, `ann_ids` int64 (N,).
    With a tuple key and `train=True`, the image is flipped left-right when
    `random.Random(f"{seed}:{aug_seed}").random() < hflip_prob`: the decision depends only on
    the key, so augmentation is reproducible whatever the DataLoader worker layout.
    """

    def __init__(
        self,
        *,
        json_path: str | os.PathLike,
        images_dir: str | os.PathLike,
        mask_classes="all",
        train: bool = False,
        hflip_prob: float = 0.0,
        seed: int = 0,
    ):
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        self.json_path = Path(json_path)
        self.train = train
        self.hflip_prob = hflip_prob
        self.seed = seed
        with open(self.json_path, encoding="utf-8") as f:
            data = json.load(f)

        self._index_categories(data["categories"])
        self.mask_class_names = resolve_mask_classes(mask_classes, self.class_names)
        mask_labels = {self.class_names.index(n) + 1 for n in self.mask_class_names}
        self._images = _index_images(data["images"], Path(images_dir))
        self.image_ids = sorted(self._images)
        # reason -> annotation ids. `skipped`: not training instances; `box_only`: mask-class
        # annotations kept without a mask because their segmentation is unusable.
        self.skipped: dict[str, list[int]] = defaultdict(list)
        self.box_only: dict[str, list[int]] = defaultdict(list)
        self._instances: dict[int, list[_Instance]] = defaultdict(list)
        self._num_json_annotations = len(data.get("annotations", []))
        for ann in data.get("annotations", []):
            self._add_annotation(ann, mask_labels)
        # Plain dicts from here on, so that reading an absent reason does not insert it.
        self.skipped, self.box_only = dict(self.skipped), dict(self.box_only)
        self._instances = dict(self._instances)

    def _index_categories(self, categories: list[dict]) -> None:
        cats = sorted(categories, key=lambda c: c["id"])
        ids = [c["id"] for c in cats]
        names = [c["name"] for c in cats]
        for what, values in (("id", ids), ("name", names)):
            dup = sorted(v for v, count in Counter(values).items() if count > 1)
            if dup:
                raise ValueError(f"{self.json_path}: duplicate category {what}(s): {dup}")
        self.class_names: list[str] = names
        self.cat_id_to_label: dict[int, int] = {cid: i + 1 for i, cid in enumerate(ids)}
        self.label_to_cat_id: dict[int, int] = {i + 1: cid for i, cid in enumerate(ids)}

    def _add_annotation(self, ann: dict, mask_labels: set[int]) -> None:
        ann_id = ann["id"]
        if ann["category_id"] not in self.cat_id_to_label:
            raise ValueError(
                f"{self.json_path}: annotation {ann_id} has category id {ann['category_id']}, "
                f"which is not in 'categories' (ids: {sorted(self.cat_id_to_label)})"
            )
        image = self._images.get(ann["image_id"])
        if image is None:
            self.skipped[UNKNOWN_IMAGE].append(ann_id)
            return
        if ann.get("iscrowd", 0):
            self.skipped[CROWD].append(ann_id)
            return
        if "bbox" not in ann:
            raise ValueError(f"{self.json_path}: annotation {ann_id} has no 'bbox'")
        box = _clip_xywh(ann["bbox"], image.width, image.height)
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            self.skipped[DEGENERATE].append(ann_id)
            return
        label = self.cat_id_to_label[ann["category_id"]]
        segm = None  # partial supervision: classes outside mask_classes are box-only
        if label in mask_labels:
            segm, problem = _usable_segmentation(ann.get("segmentation"), image)
            if problem:
                self.box_only[problem].append(ann_id)
        self._instances[ann["image_id"]].append(_Instance(ann_id, label, box, segm))

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict]:
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        image_id = self.image_ids[operator.index(index)]
        meta = self._images[image_id]
        image = self._load_checked(image_id, meta)
        target = _build_target(image_id, self._instances.get(image_id, []), meta)
        if self._should_flip(aug_seed):
            image, target = hflip(image, target)
        return image, target

    def _load_checked(self, image_id: int, meta: _Image) -> Tensor:
        if not meta.path.is_file():
            raise FileNotFoundError(f"image file {meta.path} (image id {image_id}) not found")
        image = load_image(meta.path)
        if tuple(image.shape[1:]) != (meta.height, meta.width):
            # Masks are decoded at the JSON size, so a mismatch would misalign them.
            raise ValueError(
                f"image {meta.path} (image id {image_id}) is {image.shape[2]}x{image.shape[1]} "
                f"(W x H, after EXIF orientation) but the JSON says {meta.width}x{meta.height}"
            )
        return image

    def _should_flip(self, aug_seed: int | None) -> bool:
        if aug_seed is None or not self.train or self.hflip_prob == 0.0:
            return False
        # A str seed is hashed with SHA-512 by `random`, so it is independent of PYTHONHASHSEED.
        return random.Random(f"{self.seed}:{aug_seed}").random() < self.hflip_prob

    def summary(self) -> str:
        """Images, annotations, boxes/masks per class, and every skip by reason with ids."""
        boxes, masks = Counter(), Counter()
        for instances in self._instances.values():
            for inst in instances:
                boxes[inst.label] += 1
                masks[inst.label] += inst.segm is not None
        empty = sum(1 for i in self.image_ids if not self._instances.get(i))
        lines = [
            f"{self.json_path.name}: {len(self.image_ids)} images ({empty} without instances), "
            f"{self._num_json_annotations} annotations -> {sum(boxes.values())} instances "
            f"({sum(masks.values())} with masks)",
            f"mask classes: {len(self.mask_class_names)} of {len(self.class_names)}",
            f"  {'class':<24} {'boxes':>7} {'masks':>7}",
        ]
        for label, name in enumerate(self.class_names, start=1):
            star = "*" if name in self.mask_class_names else " "
            lines.append(f"{star} {name:<24} {boxes[label]:>7} {masks[label]:>7}")
        lines.append("(* = mask class)")
        lines += _reason_lines("skipped (not training instances)", self.skipped)
        lines += _reason_lines("box-only in mask classes (segmentation unusable)", self.box_only)
        return "\n".join(lines)


def collate(batch: list[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """DataLoader collate_fn: images differ in size, so keep lists (torchvision convention)."""
    return [image for image, _ in batch], [target for _, target in batch]


def _index_images(images: list[dict], images_dir: Path) -> dict[int, _Image]:
    index: dict[int, _Image] = {}
    for img in images:
        if img["id"] in index:
            raise ValueError(f"duplicate image id {img['id']} in 'images'")
        index[img["id"]] = _Image(images_dir / _file_name(img), img["height"], img["width"])
    return index


def _file_name(img: dict) -> str:
    if "file_name" in img:
        return img["file_name"]
    # LVIS has no file_name; detectron2's convention: <images_dir>/<split>/<file> from coco_url.
    return "/".join(img["coco_url"].split("/")[-2:])


def _clip_xywh(bbox: list[float], width: int, height: int) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in bbox)
    return (
        min(max(x, 0.0), width),
        min(max(y, 0.0), height),
        min(max(x + w, 0.0), width),
        min(max(y + h, 0.0), height),
    )


def _usable_segmentation(segm, image: _Image) -> tuple[list | dict | None, str | None]:
    """Return (segmentation to decode or None, box-only reason or None)."""
    if not segm:  # missing key, None, [] and {} all mean "box only"
        return None, NO_SEGMENTATION
    if isinstance(segm, dict):
        ok = "counts" in segm and list(segm.get("size", ())) == [image.height, image.width]
        return (segm, None) if ok else (None, BAD_SEGMENTATION)
    if not isinstance(segm, list) or not all(isinstance(p, list) for p in segm):
        return None, BAD_SEGMENTATION
    # pycocotools needs >= 3 (x, y) points per polygon; odd lengths are malformed.
    polygons = [p for p in segm if len(p) >= 6 and len(p) % 2 == 0]
    return (polygons, None) if polygons else (None, NO_VALID_POLYGON)


def _to_rle(segm: list | dict, height: int, width: int) -> dict:
    """Polygons / compressed RLE / uncompressed RLE -> one compressed RLE."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def _build_target(image_id: int, instances: list[_Instance], meta: _Image) -> dict:
    n = len(instances)
    masks = torch.zeros((n, meta.height, meta.width), dtype=torch.uint8)
    rows = [i for i, inst in enumerate(instances) if inst.segm is not None]
    if rows:
        # One decode call for the whole image: (H, W, M) -> (M, H, W).
        rles = [_to_rle(instances[i].segm, meta.height, meta.width) for i in rows]
        masks[rows] = torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1)
    return {
        "boxes": torch.tensor([inst.box for inst in instances], dtype=torch.float32).reshape(n, 4),
        "labels": torch.tensor([inst.label for inst in instances], dtype=torch.int64),
        "masks": masks,
        "has_mask": torch.tensor([inst.segm is not None for inst in instances], dtype=torch.bool),
        "image_id": torch.tensor(image_id, dtype=torch.int64),
        "ann_ids": torch.tensor([inst.ann_id for inst in instances], dtype=torch.int64),
    }


def _reason_lines(title: str, by_reason: dict[str, list[int]], max_ids: int = 20) -> list[str]:
    lines = [f"{title}: {sum(len(v) for v in by_reason.values())}"]
    for reason, ids in sorted(by_reason.items()):
        shown = ", ".join(map(str, ids[:max_ids])) + (", ..." if len(ids) > max_ids else "")
        lines.append(f"  {reason}: {len(ids)} (annotation ids: {shown})")
    return lines
