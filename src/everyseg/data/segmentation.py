"""Which `segmentation` values are usable masks: the one rule the loader and evaluation share.

Usable: polygons (flat [x0, y0, x1, y1, ...] lists, at least one with 3+ points; a single flat
list is read as one polygon), compressed RLE (`counts` a string), and uncompressed RLE
(`counts` a list of runs, as pycocotools' frPyObjects reads it), whose size is the image's and
whose runs cover its H*W pixels exactly. Anything else is box-only, with a reason that names
the form it has (docs/bad_input.md).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, TypedDict, cast

import numpy as np
import pycocotools.mask as mask_utils

from everyseg.data.validate import (
    BAD_POLYGON,
    BAD_RLE,
    BAD_SEGMENTATION,
    FLAT_POLYGON,
    MIN_BOX_MASK_IOU,
    NO_SEGMENTATION,
    NO_VALID_POLYGON,
    POLYGON_PAIRS,
    RLE_SIZE,
    SHORT_POLYGON,
    Reason,
    as_int,
)

# pycocotools needs >= 3 (x, y) points, and reads a 4-number list as a box
_MIN_POLYGON_COORDS = 6


def usable_segmentation(segm: Any, *, width: int, height: int) -> list | dict | None:
    """The mask in a form pycocotools decodes (polygons or RLE), or None: box-only."""
    return check_segmentation(segm, width=width, height=height)[0]


def check_segmentation(
    segm: Any, *, width: int, height: int
) -> tuple[list | dict | None, list[tuple[Reason, str]]]:
    """(polygons or RLE to decode, or None for box-only; (reason, detail) found on the way)."""
    if segm is None or segm == [] or segm == {}:
        return None, [(NO_SEGMENTATION, "")]
    if isinstance(segm, dict):
        return _check_rle(segm, width=width, height=height)
    if not isinstance(segm, list):
        return None, [(BAD_SEGMENTATION, f"segmentation is a {type(segm).__name__}")]
    found = []
    if all(_is_coordinate(v) for v in segm):
        segm, found = [segm], [(FLAT_POLYGON, "")]
    elif _is_pairs(segm) or all(isinstance(p, list) and _is_pairs(p) for p in segm):
        return None, [(POLYGON_PAIRS, f"{_short(segm)}")]
    limit = 2 * max(width, height)
    for i, polygon in enumerate(segm):
        if not _polygon_ok(polygon, limit=limit):
            return None, found + [(BAD_POLYGON, f"polygon {i}: {_polygon_problem(polygon)}")]
    polygons = [p for p in segm if len(p) >= _MIN_POLYGON_COORDS]
    if not polygons:
        points = ", ".join(str(len(p) // 2) for p in segm)
        return None, found + [(NO_VALID_POLYGON, f"polygon with {points} points")]
    if len(polygons) < len(segm):
        found.append((SHORT_POLYGON, ""))
    return polygons, found


def box_mask_mismatch(
    segm: list | dict, box: tuple[float, float, float, float], *, width: int, height: int
) -> str | None:
    """Why the xyxy `box` and the usable mask `segm` cannot be the same object, or None.

    Both are clipped to the image and grown by 1 px (so rounding on tiny objects is no
    mismatch) and must overlap with IoU >= MIN_BOX_MASK_IOU.
    """
    extent = _mask_extent(segm, width=width, height=height)
    if extent is None:
        return "the mask is empty"
    iou = _iou(_grow(box), _grow(extent))
    if iou >= MIN_BOX_MASK_IOU:
        return None
    shown = ", ".join(f"{v:g}" for v in extent)
    return (
        f"box (x0, y0, x1, y1) {[round(v, 1) for v in box]}, mask extent [{shown}], "
        f"IoU {iou:.2f}: a bbox written as x0, y0, x1, y1, or polygons in 0..1 coordinates?"
    )


class RLE(TypedDict):
    """Compressed run-length encoding as pycocotools reads and writes it."""

    size: list[int]
    counts: str | bytes


def to_rle(segm: list | dict, *, height: int, width: int) -> RLE:
    """A usable segmentation (polygons / compressed or uncompressed RLE) -> compressed RLE."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):
        # pycocotools' stubs type frPyObjects for compressed RLE only; it takes both
        return mask_utils.frPyObjects(cast(RLE, segm), height, width)
    return cast(RLE, segm)


def _mask_extent(segm: list | dict, *, width: int, height: int) -> tuple | None:
    """(x0, y0, x1, y1) of the mask within the image; None for an RLE without foreground."""
    if isinstance(segm, list):  # the polygons' extent: no need to rasterise
        xs = [min(max(v, 0), width) for p in segm for v in p[0::2]]
        ys = [min(max(v, 0), height) for p in segm for v in p[1::2]]
        return min(xs), min(ys), max(xs), max(ys)
    x, y, w, h = mask_utils.toBbox(to_rle(segm, height=height, width=width)).tolist()
    return None if w == 0 or h == 0 else (x, y, x + w, y + h)


def _grow(box) -> tuple[float, float, float, float]:
    return box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _is_coordinate(value: Any) -> bool:
    """A real number; a bool (also an int to Python) is not a coordinate."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_pairs(values: list) -> bool:
    """[[x, y], [x, y], [x, y], ...]: three or more points as 2-number lists."""
    return len(values) >= 3 and all(
        isinstance(p, list) and len(p) == 2 and all(map(_is_coordinate, p)) for p in values
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _polygon_ok(polygon: Any, *, limit: int) -> bool:
    """Pairs of finite numbers within `limit` of the image (fast: COCO has ~1M polygons).

    pycocotools rasterises at 5x and allocates by the polygon's extent, so a point far outside
    the image (garbage, never a real annotation) would cost gigabytes.
    """
    if not isinstance(polygon, list) or len(polygon) % 2:
        return False
    if not polygon:
        return True
    # exact types first (fast); then numpy scalars, from callers that build dicts in code
    if not all(type(v) is float or type(v) is int for v in polygon):
        if not all(map(_is_coordinate, polygon)):
            return False
    if not -limit <= min(polygon) <= max(polygon) <= limit:
        return False
    return math.isfinite(sum(polygon))  # NaN can hide from min / max, not from a sum


def _polygon_problem(polygon: Any) -> str:
    """What is wrong with a polygon `_polygon_ok` refused (the slow path: only on failure)."""
    if not isinstance(polygon, list):
        return f"a {type(polygon).__name__}, not a list of coordinates"
    if len(polygon) % 2:
        return f"an odd number of coordinates ({len(polygon)})"
    odd = next((v for v in polygon if not _is_coordinate(v)), None)
    if odd is not None:
        return f"a coordinate that is a {type(odd).__name__}: {_short(odd)}"
    if not all(math.isfinite(v) for v in polygon):
        return "a coordinate that is not finite (NaN or Infinity)"
    return "a point more than one image size outside the image"


def _check_rle(rle: dict, *, width: int, height: int) -> tuple[dict | None, list]:
    """The RLE in the form pycocotools takes, if its size is the image's and its runs cover
    the image exactly. pycocotools decodes runs into an H*W buffer without checking that they
    fill it, which reads or writes out of bounds; so the run total is checked here."""
    size, counts = rle.get("size"), rle.get("counts")
    if not isinstance(size, list) or len(size) != 2 or None in map(as_int, size):
        return None, [(BAD_RLE, f"'size' is {_short(size)}, not [height, width]")]
    if [as_int(v) for v in size] != [height, width]:
        detail = f"RLE of size {size[0]}x{size[1]} for a {height}x{width} image (H x W)"
        return None, [(RLE_SIZE, detail)]
    if isinstance(counts, str):
        total = _compressed_total(counts)
        if total is None:
            return None, [(BAD_RLE, "'counts' is not a valid compressed RLE string")]
    elif isinstance(counts, list):
        runs = [r for r in map(as_int, counts) if r is not None and r >= 0]
        if len(runs) != len(counts):
            return None, [(BAD_RLE, "uncompressed 'counts' hold a negative or non-integer run")]
        total, counts = sum(runs), runs
    else:
        return None, [(BAD_RLE, f"'counts' is a {type(counts).__name__}")]
    if total != width * height:
        detail = f"runs add up to {total} pixels, the image has {width * height}"
        return None, [(BAD_RLE, detail)]
    return {"size": [height, width], "counts": counts}, []


def _compressed_total(counts: str) -> int | None:
    """Sum of the runs of a compressed RLE string (pycocotools' rleFrString), None if malformed.

    Each run is a little-endian group of 5-bit digits (char - 48; bit 0x20: more digits follow;
    bit 0x10 of the last: negative) and, from the third run on, a delta to the run two before.
    """
    if not counts.isascii():
        return None
    c = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0 or c.min() < 0 or c.max() > 63 or c[-1] & 0x20:
        return None
    ends = np.flatnonzero((c & 0x20) == 0)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 7:  # more than 35 bits: no valid run is that long
        return None
    digit = np.arange(c.size) - np.repeat(starts, lengths)
    runs = np.add.reduceat((c & 0x1F) << (5 * digit), starts)
    negative = (c[ends] & 0x10) != 0
    runs[negative] |= np.left_shift(-1, 5 * lengths[negative])
    runs[3::2] = np.cumsum(runs[1::2])[1:]
    runs[2::2] = np.cumsum(runs[2::2])
    if runs.min() < 0 or runs.max() >= 2**32:
        return None
    return int(runs.sum())
