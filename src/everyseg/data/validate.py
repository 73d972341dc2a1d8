"""Record-level checks of COCO-format data, shared by the loader and `everyseg check-data`.

A check either raises `DataError` (the file as a whole cannot be used) or returns what is usable
plus `Finding`s. `Findings` applies the bad-sample policy in one place: `error` raises at the
first bad sample, `skip` collects it for the start-up summary, `warn` also warns at once.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from everyseg.config import ConfigError

POLICIES = ("error", "skip", "warn")
# Finding kinds. Bad samples (the policy applies): the image with its annotations is skipped, the
# annotation is skipped, or the mask is dropped and the box kept. Repairs and notes never raise.
IMAGE, ANNOTATION, MASK = "image", "annotation", "mask"
REPAIR, NOTE = "repair", "note"
BAD_KINDS = (IMAGE, ANNOTATION, MASK)


class DataError(ValueError):
    """The data is at fault; the message names the file and the image / annotation id."""


class BadSampleWarning(UserWarning):
    """A bad image or annotation skipped under `data.on_bad_sample: warn`."""


class Reason(NamedTuple):
    key: str  # stable name for `check-data --json`
    kind: str
    text: str  # as printed in summaries


IMAGE_ENTRY = Reason("malformed_entry", IMAGE, "malformed image entry")
IMAGE_MISSING = Reason("missing", IMAGE, "image file not found")
IMAGE_UNREADABLE = Reason("unreadable", IMAGE, "image file unreadable")
IMAGE_SIZE = Reason("size_mismatch", IMAGE, "image size differs from the JSON")
NO_ANNOTATIONS = Reason("without_annotations", NOTE, "images without annotations (negatives)")
ANN_ENTRY = Reason("malformed_entry", ANNOTATION, "annotation is not a JSON object")
ANN_ID = Reason("bad_id", ANNOTATION, "annotation id is not a positive integer")
ANN_DUPLICATE = Reason("duplicate_id", ANNOTATION, "duplicate annotation id (first one kept)")
UNKNOWN_IMAGE = Reason("unknown_image", ANNOTATION, "image id not in 'images'")
SKIPPED_IMAGE = Reason("image_skipped", ANNOTATION, "its image was skipped")
UNKNOWN_CATEGORY = Reason("unknown_category", ANNOTATION, "category id not in 'categories'")
BAD_CROWD_FLAG = Reason("bad_iscrowd", ANNOTATION, "iscrowd is not 0 or 1")
BAD_BOX = Reason("bad_bbox", ANNOTATION, "bbox missing or not 4 finite numbers")
NEGATIVE_BOX = Reason("negative_bbox", ANNOTATION, "negative box width or height")
DEGENERATE = Reason(
    "degenerate_bbox", ANNOTATION, "degenerate box (< 1 px after clipping to the image)"
)
NO_VALID_POLYGON = Reason("no_valid_polygon", MASK, "no valid polygon (all have < 3 points)")
BAD_POLYGON = Reason(
    "bad_polygon",
    MASK,
    "malformed polygon (odd coordinate count, or values not finite numbers "
    "within one image size of the image)",
)
BAD_RLE = Reason("bad_rle", MASK, "malformed RLE (size != image size or runs != H*W pixels)")
BAD_SEGMENTATION = Reason("bad_segmentation", MASK, "segmentation is neither polygons nor RLE")
CLIPPED = Reason("clipped_bbox", REPAIR, "box clipped to the image")
SHORT_POLYGON = Reason("short_polygon", REPAIR, "polygons with < 3 points dropped")
FLAT_POLYGON = Reason("flat_polygon", REPAIR, "flat coordinate list read as one polygon")
BAD_AREA = Reason("bad_area", REPAIR, "area not a number >= 0: box area used")
CROWD = Reason("crowd", NOTE, "crowd (iscrowd=1): not a training instance")
NO_SEGMENTATION = Reason("no_segmentation", NOTE, "no segmentation (box-only)")


@dataclass(frozen=True, slots=True)
class Finding:
    reason: Reason
    detail: str = ""
    image_id: Any = None
    ann_id: Any = None
    file: str | None = None

    def where(self) -> str:
        parts = [f"annotation {self.ann_id}"] if self.ann_id is not None else []
        parts += [f"image {self.image_id}"] if self.image_id is not None else []
        parts += [self.file] if self.file else []
        return ", ".join(parts) or "entry"

    def as_dict(self) -> dict:
        fields = ("image_id", "ann_id", "file", "detail")
        return {k: getattr(self, k) for k in fields if getattr(self, k) not in (None, "")}


class Findings:
    """Every finding of one JSON file, with the bad-sample policy applied as they come in."""

    def __init__(self, *, source: Path, policy: str):
        if policy not in POLICIES:
            raise ConfigError(f"data.on_bad_sample must be one of {POLICIES}, got {policy!r}")
        self.source = source
        self.policy = policy
        self.items: list[Finding] = []

    def add(self, finding: Finding) -> None:
        if finding.reason.kind in BAD_KINDS and self.policy != "skip":
            message = self.message(finding)
            if self.policy == "error":
                raise DataError(message)
            warnings.warn(message, BadSampleWarning, stacklevel=3)
        self.items.append(finding)

    def message(self, finding: Finding) -> str:
        detail = f": {finding.detail}" if finding.detail else ""
        return f"{self.source}: {finding.where()}: {finding.reason.text}{detail}"

    def by_reason(self, kinds: tuple[str, ...]) -> dict[Reason, list[Finding]]:
        grouped: dict[Reason, list[Finding]] = defaultdict(list)
        for finding in self.items:
            if finding.reason.kind in kinds:
                grouped[finding.reason].append(finding)
        return dict(grouped)

    @property
    def num_bad(self) -> int:
        return sum(f.reason.kind in BAD_KINDS for f in self.items)


def read_coco_json(path: Path) -> dict:
    """The parsed file, checked to hold `images`, `annotations` and `categories` lists."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {path} not found") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 JSON text ({err})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to be COCO") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"{path}: no top-level {key!r} (keys: {sorted(data)})")
        if not isinstance(data[key], list):
            raise DataError(f"{path}: {key!r} must be a list, got {type(data[key]).__name__}")
    return data


def read_categories(categories: list, source: Path) -> list[tuple[int, str]]:
    """(id, name) sorted by id. Every label depends on the whole list, so errors are fatal."""
    pairs = []
    for i, cat in enumerate(categories):
        ok = isinstance(cat, dict) and as_int(cat.get("id")) is not None
        if not ok or not isinstance(cat.get("name"), str) or not cat["name"]:
            raise DataError(
                f"{source}: category #{i} needs an integer 'id' and a 'name': {cat!r:.80}"
            )
        pairs.append((as_int(cat["id"]), cat["name"]))
    if not pairs:
        raise DataError(f"{source}: 'categories' is empty")
    for what, values in (("id", [p[0] for p in pairs]), ("name", [p[1] for p in pairs])):
        dup = sorted(v for v, n in Counter(values).items() if n > 1)
        if dup:
            raise DataError(f"{source}: duplicate category {what}(s): {dup}")
    return sorted(pairs)


def as_int(value: Any) -> int | None:
    """An integer, or an integral float (some exporters write 640.0); bools are not ids."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_box(bbox: Any, *, width: int, height: int) -> tuple[Reason | None, tuple | None]:
    """(problem or CLIPPED or None, xyxy box clipped to the image or None)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(map(is_number, bbox)):
        return BAD_BOX, None
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        return NEGATIVE_BOX, None
    box = (min(max(x, 0.0), width), min(max(y, 0.0), height))
    box += (min(max(x + w, 0.0), width), min(max(y + h, 0.0), height))
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        return DEGENERATE, None
    return (CLIPPED if box != (x, y, x + w, y + h) else None), box


def check_segmentation(segm: Any, *, width: int, height: int) -> tuple[Any, list[Reason]]:
    """(polygons or RLE to decode, or None for box-only; reasons found along the way)."""
    if segm is None or segm == [] or segm == {}:
        return None, [NO_SEGMENTATION]
    if isinstance(segm, dict):
        rle = _usable_rle(segm, width=width, height=height)
        return (rle, []) if rle else (None, [BAD_RLE])
    if not isinstance(segm, list):
        return None, [BAD_SEGMENTATION]
    reasons = []
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in segm):
        segm, reasons = [segm], [FLAT_POLYGON]
    if not all(_polygon_ok(p, limit=2 * max(width, height)) for p in segm):
        return None, reasons + [BAD_POLYGON]
    # pycocotools needs >= 3 (x, y) points, and reads a 4-number list as a box
    polygons = [p for p in segm if len(p) >= 6]
    if not polygons:
        return None, reasons + [NO_VALID_POLYGON]
    return polygons, reasons + ([SHORT_POLYGON] if len(polygons) < len(segm) else [])


def _polygon_ok(polygon: Any, *, limit: int) -> bool:
    """Pairs of finite numbers within `limit` of the image (fast: COCO has ~1M polygons).

    pycocotools rasterises at 5x and allocates by the polygon's extent, so a point far outside
    the image (garbage, never a real annotation) would cost gigabytes.
    """
    if not isinstance(polygon, list) or len(polygon) % 2:
        return False
    if not polygon:
        return True
    # exact types: a bool is not a coordinate
    if not all(type(v) is float or type(v) is int for v in polygon):
        return False
    if not -limit <= min(polygon) <= max(polygon) <= limit:
        return False
    return math.isfinite(sum(polygon))  # NaN can hide from min / max, not from a sum


def _usable_rle(rle: dict, *, width: int, height: int) -> dict | None:
    """The RLE in the form pycocotools takes, or None if it does not cover the image exactly.

    pycocotools decodes runs into an H*W buffer without checking that they fill it, which
    reads or writes out of bounds; so the run total is checked here.
    """
    size, counts = rle.get("size"), rle.get("counts")
    if not isinstance(size, list) or [as_int(v) for v in size] != [height, width]:
        return None
    if isinstance(counts, str) and _compressed_total(counts) == width * height:
        return {"size": [height, width], "counts": counts}
    if isinstance(counts, list) and all(as_int(c) is not None and c >= 0 for c in counts):
        runs = [as_int(c) for c in counts]
        return {"size": [height, width], "counts": runs} if sum(runs) == width * height else None
    return None


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
