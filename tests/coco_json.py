"""The JSON entries of the tiny COCO set that conftest's `coco_files` writes: plain data
builders, imported by test modules because @pytest.mark.parametrize tables are built before
any fixture exists."""

from __future__ import annotations

W, H = 40, 30
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
SQUARE = [[2, 3, 12, 3, 12, 11, 2, 11]]


def image_entry(image_id: int, name: str, width: int = W, height: int = H) -> dict:
    return {"id": image_id, "file_name": name, "width": width, "height": height}


def ann(ann_id: int, image_id: int = 1, **fields) -> dict:
    base = {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [2, 3, 10, 8]}
    return {**base, "area": 80, "iscrowd": 0, "segmentation": SQUARE, **fields}
