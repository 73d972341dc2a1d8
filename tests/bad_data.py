"""A tiny valid COCO dataset to break one way at a time (shared by the bad-input tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from everyseg.data.coco import CocoInstances
from everyseg.data.report import report

W, H = 40, 30
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
SQUARE = [[2, 3, 12, 3, 12, 11, 2, 11]]


def image_entry(image_id: int, name: str, width: int = W, height: int = H) -> dict:
    return {"id": image_id, "file_name": name, "width": width, "height": height}


def ann(ann_id: int, image_id: int = 1, **fields) -> dict:
    base = {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [2, 3, 10, 8]}
    return {**base, "area": 80, "iscrowd": 0, "segmentation": SQUARE, **fields}


def write_image(path: Path, width: int = W, height: int = H, mode: str = "RGB") -> None:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(width, dtype=np.uint8) * 5
    Image.fromarray(pixels).convert(mode).save(path)


def write_dataset(root: Path, *, images=None, annotations=None, categories=None) -> Path:
    """Two 40x30 images (ids 1, 2), annotations 10 (image 1) and 20 (image 2) unless given."""
    images = [image_entry(1, "a.png"), image_entry(2, "b.png")] if images is None else images
    if annotations is None:
        annotations = [ann(10), ann(20, image_id=2)]
    (root / "img").mkdir(exist_ok=True)
    for img in images:
        if isinstance(img, dict) and isinstance(img.get("file_name"), str):
            target = root / "img" / img["file_name"]
            if not target.exists():
                write_image(target)
    data = {
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES if categories is None else categories,
    }
    path = root / "ann.json"
    path.write_text(json.dumps(data))
    return path


def load(root: Path, json_path: Path | None = None, **kwargs) -> CocoInstances:
    json_path = json_path or root / "ann.json"
    return CocoInstances(json_path=json_path, images_dir=root / "img", **kwargs)


def found(dataset: CocoInstances, section: str) -> dict[str, list]:
    """reason key -> annotation ids (or image ids) of one report section."""
    groups = report(dataset.index)[section]
    return {
        key: [item.get("ann_id", item.get("image_id")) for item in group["items"]]
        for key, group in groups.items()
    }
