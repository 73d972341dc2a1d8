"""Record-level checks of COCO-format data, shared by the loader and `everyseg check-data`.

A check either raises `DataError` (the file as a whole cannot be used) or returns what is usable
plus `Finding`s. `Findings` applies the bad-sample policy in one place: `error` raises at the
first bad sample, `skip` collects it for the start-up summary, `warn` also warns at once.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from everyseg.config import ConfigError

POLICIES = ("error", "skip", "warn")
# Finding kinds. Bad samples (the policy applies): the image with its annotations is skipped, the
# annotation is skipped, or the mask is dropped and the box kept. Repairs and notes never raise.
IMAGE, ANNOTATION, MASK = "image", "annotation", "mask"
KEYPOINTS = "keypoints"  # the keypoints dropped, the box (and mask) kept (data.keypoints)
REPAIR, NOTE = "repair", "note"
BAD_KINDS = (IMAGE, ANNOTATION, MASK, KEYPOINTS)
# ids and sizes are stored as int64 (targets, COCOeval)
INT64_MAX = 2**63 - 1
# an image's shorter side once resized for the model: below this it holds no usable object
MIN_RESIZED_SIDE = 8
# a box and its mask's extent (both grown by 1 px, so rounding on tiny objects is no mismatch)
# with less overlap than this disagree: x0, y0, x1, y1 read as x, y, w, h, or 0..1 polygons
MIN_BOX_MASK_IOU = 0.5


class DataError(ValueError):
    """The data is at fault; the message names the file and the image / annotation id."""


class BadSampleWarning(UserWarning):
    """A bad image or annotation skipped under `data.on_bad_sample: warn`."""


class Reason(NamedTuple):
    key: str  # stable name for `check-data --json`
    kind: str
    text: str  # as printed in summaries


IMAGE_ENTRY = Reason("malformed_entry", IMAGE, "malformed image entry")
IMAGE_OUTSIDE = Reason("outside_images", IMAGE, "file_name leads outside the images folder")
IMAGE_MISSING = Reason("missing", IMAGE, "image file not found")
IMAGE_UNREADABLE = Reason("unreadable", IMAGE, "image file unreadable")
IMAGE_SIZE = Reason("size_mismatch", IMAGE, "image size differs from the JSON")
IMAGE_TOO_THIN = Reason(
    "unusable_size",
    IMAGE,
    f"a side under {MIN_RESIZED_SIDE} px once resized to data.min_size / data.max_size",
)
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
BOX_MASK_MISMATCH = Reason(
    "bbox_mask_mismatch",
    ANNOTATION,
    f"bbox and mask disagree (IoU of the box with the mask's extent < {MIN_BOX_MASK_IOU})",
)
NO_VALID_POLYGON = Reason("no_valid_polygon", MASK, "no valid polygon (all have < 3 points)")
POLYGON_PAIRS = Reason(
    "polygon_pairs",
    MASK,
    "polygon given as a list of [x, y] pairs (COCO wants flat [x0, y0, x1, y1, ...])",
)
BAD_POLYGON = Reason(
    "bad_polygon",
    MASK,
    "malformed polygon (odd coordinate count, or values not finite numbers "
    "within one image size of the image)",
)
RLE_SIZE = Reason("rle_size", MASK, "RLE size differs from the image")
BAD_RLE = Reason("bad_rle", MASK, "malformed RLE (runs must cover the H*W pixels exactly)")
BAD_SEGMENTATION = Reason("bad_segmentation", MASK, "segmentation is neither polygons nor RLE")
BAD_KEYPOINTS = Reason(
    "bad_keypoints",
    KEYPOINTS,
    "malformed keypoints (length, values, visibility, num_keypoints or outside the image)",
)
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
    except ValueError as err:  # an integer literal of more than 4300 digits
        raise DataError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"{path}: no top-level {key!r} (keys: {sorted(data)})")
        if not isinstance(data[key], list):
            raise DataError(f"{path}: {key!r} must be a list, got {type(data[key]).__name__}")
    return data


def read_categories(categories: list, source: Path) -> list[tuple[int, str]]:
    """(id, name) sorted by id, without a category 0 named background. Every label depends on
    the whole list, so errors are fatal."""
    pairs: list[tuple[int, str]] = []
    for i, cat in enumerate(categories):
        cat_id = as_int(cat.get("id")) if isinstance(cat, dict) else None
        if cat_id is None or not isinstance(cat.get("name"), str) or not cat["name"]:
            raise DataError(
                f"{source}: category #{i} needs an integer 'id' and a 'name': {cat!r:.80}"
            )
        if cat_id == 0 and cat["name"].strip().lower() == "background":
            continue  # some exporters list the model's background label: it is not a class
        pairs.append((cat_id, cat["name"]))
    if not pairs:
        raise DataError(f"{source}: 'categories' is empty")
    columns: dict[str, list[Any]] = {"id": [p[0] for p in pairs], "name": [p[1] for p in pairs]}
    for what, values in columns.items():
        dup = sorted(v for v, n in Counter(values).items() if n > 1)
        if dup:
            raise DataError(f"{source}: duplicate category {what}(s): {dup}")
    return sorted(pairs)


def as_int(value: Any) -> int | None:
    """An integer that fits int64, or an integral float (some exporters write 640.0); bools,
    1.5, NaN and 10**30 are not ids or sizes."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    # numpy integers too: ground truth built in code (evaluation) may hold them
    if isinstance(value, numbers.Integral) and -INT64_MAX <= int(value) <= INT64_MAX:
        return int(value)
    return None


def is_number(value: Any) -> bool:
    """A finite int or float (an int too big for a float is not: math would overflow)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) if isinstance(value, float) else abs(value) < 2**1000


def resized_size(
    width: int, height: int, *, min_sizes: Sequence[int], max_size: int
) -> tuple[float, float]:
    """The smallest (width, height) the model's resize gives (torchvision's rule: short side to
    min_size unless the long side would pass max_size), over the short sides in `min_sizes`."""
    short, long = min(width, height), max(width, height)
    scale = min(min(min_sizes) / short, max_size / long)
    return width * scale, height * scale


def resize_problem(
    width: int, height: int, *, min_sizes: Sequence[int], max_size: int
) -> str | None:
    """Why the model's resize would leave too little of the image, or None."""
    w, h = resized_size(width, height, min_sizes=min_sizes, max_size=max_size)
    if min(w, h) >= MIN_RESIZED_SIDE:
        return None
    aspect = max(width, height) / min(width, height)
    return (
        f"{width}x{height} (aspect ratio {aspect:.0f}:1) becomes {w:.1f}x{h:.1f} px with "
        f"data.min_size={list(min_sizes)}, data.max_size={max_size}"
    )


def check_box(bbox: Any, *, width: int, height: int) -> tuple[Reason | None, tuple | None]:
    """(problem or CLIPPED or None, xyxy box clipped to the image or None)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(map(is_number, bbox)):
        return BAD_BOX, None
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        return NEGATIVE_BOX, None
    box: tuple[float, ...] = (min(max(x, 0.0), width), min(max(y, 0.0), height))
    box += (min(max(x + w, 0.0), width), min(max(y + h, 0.0), height))
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        return DEGENERATE, None
    return (CLIPPED if box != (x, y, x + w, y + h) else None), box
