"""LVIS v1's own fields, read as they are and checked: what federated evaluation needs.

LVIS annotates each image exhaustively only for some classes. Its images list the classes
verified absent (``neg_category_ids``) and those whose instances are not all annotated
(``not_exhaustive_category_ids``); its categories carry a ``frequency``: ``r`` (rare, 1-10
training images), ``c`` (common, 11-100) or ``f`` (frequent, > 100). Plain COCO files have
none of these, and then nothing here applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from everyseg.data.validate import DataError, as_int

FREQUENCIES = ("r", "c", "f")
IMAGE_LISTS = ("neg_category_ids", "not_exhaustive_category_ids")


def read_frequencies(categories: list, source: str | Path) -> dict[int, str]:
    """Category id -> LVIS frequency, for the categories that have one (none in COCO files).

    A frequency other than r / c / f is a DataError naming the category: every AP_r / AP_c /
    AP_f depends on the whole list, as labels depend on the whole category list.
    """
    frequencies = {}
    for cat in categories:
        cat_id = as_int(cat.get("id"))  # read_categories has checked ids and names
        if "frequency" not in cat or cat_id is None:
            continue
        frequency = cat["frequency"]
        if frequency not in FREQUENCIES:
            raise DataError(
                f"{source}: category id {cat['id']} ({cat['name']!r}): frequency "
                f"{frequency!r} is not one of r, c, f (LVIS v1: rare, common, frequent)"
            )
        frequencies[cat_id] = frequency
    return frequencies


def image_lists(img: dict[str, Any]) -> tuple[dict[str, list[int]], str | None]:
    """(the image entry's LVIS lists as present, problem): a list that is not a list of integer
    category ids is a problem of the entry, named by key. Ids of no category are kept: they
    only say what is not in the image, and no detection can have them."""
    lists = {}
    for key in IMAGE_LISTS:
        if key not in img:
            continue
        value = img[key]
        ids = [as_int(v) for v in value] if isinstance(value, list) else [None]
        valid = [i for i in ids if i is not None]
        if len(valid) != len(ids):
            return {}, f"{key} must be a list of integer category ids, got {value!r:.60}"
        lists[key] = valid
    return lists, None
