"""`everyseg convert vg`: Visual Genome's image_data.json + objects.json -> COCO JSON, boxes only.

objects.json (~400 MB) is read twice, one image element at a time (`iter_json_array`): the first
pass counts classes, the second writes the annotations of the K most frequent straight to the
output file. Memory is bounded by image_data (one small tuple per image) and the class counts.

Output: categories {id, name} with id 1..K by frequency rank (ties by name); images {id (VG's
image_id), width, height, file_name, coco_id (when VG has one)}, only those with a kept object;
annotations {id 1..N, image_id, category_id, bbox clipped to the image, area, iscrowd 0,
vg_object_id}, no segmentation (box-only instances).
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple
from urllib.parse import urlsplit

from everyseg.data.json_stream import iter_json_array
from everyseg.data.validate import INT64_MAX, DataError, as_int
from everyseg.data.vg_names import class_name, read_aliases
from everyseg.engine.files import atomic_write_bytes

DROP_REASONS = {
    "rare_class": "class not among the {classes} most frequent",
    "degenerate": "degenerate box (width or height under 1 px, or not finite)",
    "outside": "box outside the image (under 1 px wide or tall once clipped to it)",
    "no_name": "no name and no synset",
    "no_image": "image not in image_data.json",
}
_WRITE_BATCH = 4096  # annotations per write: few syscalls, little held
_NUMBER_TYPES = {int, float}  # bool excluded: type(True) is bool


class VgImage(NamedTuple):
    width: int
    height: int
    file_name: str
    coco_id: int | None


class VgObject(NamedTuple):
    image_id: int
    object_id: int
    name: str
    box: list  # [x, y, w, h] clipped to the image
    clipped: bool  # the box reached outside the image


@dataclass
class VgSummary:
    classes_asked: int
    objects: int = 0  # read from objects.json
    kept: int = 0
    clipped: int = 0  # kept boxes that reached outside the image
    dropped: Counter = field(default_factory=Counter)  # DROP_REASONS key -> objects
    names_found: int = 0  # distinct classes before keeping the K most frequent
    classes: int = 0
    images: int = 0  # written (with at least one kept object)
    images_without_objects: int = 0  # in image_data.json, not written

    def format(self, objects: Path, out: Path) -> str:
        lines = [
            f"{objects}: {self.objects:,} objects read",
            f"kept {self.kept:,} objects of {self.classes:,} classes (of {self.names_found:,} "
            f"found; {self.classes_asked:,} asked) in {self.images:,} images -> {out}",
            f"dropped {sum(self.dropped.values()):,} objects:",
        ]
        for key, text in DROP_REASONS.items():
            reason = text.format(classes=self.classes_asked)
            lines.append(f"  {reason}: {self.dropped[key]:,}")
        lines.append(f"boxes clipped to their image: {self.clipped:,}")
        lines.append(f"images without a kept object (not written): {self.images_without_objects:,}")
        return "\n".join(lines)


def convert_vg(
    *,
    objects: str | Path,
    image_data: str | Path,
    classes: int,
    out: str | Path,
    aliases: str | Path | None = None,
) -> VgSummary:
    """Write `out` (COCO JSON, boxes only) from VG's files; see the module docstring.

    Raises FileNotFoundError or DataError (a ValueError) naming the file, and the image id /
    object id of a malformed entry.
    """
    objects, image_data, out = Path(objects), Path(image_data), Path(out)
    if classes < 1:
        raise ValueError(f"--classes must be at least 1, got {classes}")
    for source in (objects, image_data):
        if out.resolve() == source.resolve():
            raise ValueError(f"--out {out} would overwrite the input {source}")
    alias_map = read_aliases(aliases) if aliases is not None else None
    images = read_image_data(image_data)
    counts: Counter[str] = Counter()
    first_pass = VgSummary(classes)
    for obj in _usable_objects(objects, images, alias_map, first_pass):
        counts[obj.name] += 1
    if not counts:
        why = ", ".join(f"{DROP_REASONS[key]}: {n}" for key, n in first_pass.dropped.items())
        raise DataError(f"{objects}: no usable object in {first_pass.objects} ({why})")
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:classes]
    category_ids = {name: rank for rank, (name, _) in enumerate(ranked, start=1)}
    summary = VgSummary(classes, names_found=len(counts), classes=len(category_ids))

    def write(f: BinaryIO) -> None:
        kept = _write_annotations(
            f, _usable_objects(objects, images, alias_map, summary), category_ids, summary
        )
        entries = [_image_json(image_id, images[image_id]) for image_id in sorted(kept)]
        categories = [{"id": cat_id, "name": name} for name, cat_id in category_ids.items()]
        tail = f'], "images": {json.dumps(entries)}, "categories": {json.dumps(categories)}}}\n'
        f.write(tail.encode())
        summary.images = len(kept)
        summary.images_without_objects = len(images) - len(kept)

    print(f"{objects}: {len(counts):,} classes counted; writing {out}", file=sys.stderr)
    atomic_write_bytes(out, write)
    return summary


def read_image_data(path: Path) -> dict[int, VgImage]:
    """image_id -> VgImage for every entry of image_data.json (VG 1.0's `id` read as image_id)."""
    images: dict[int, VgImage] = {}
    for i, entry in enumerate(iter_json_array(path)):
        where = f"{path}: element {i}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
        image_id = _positive_int(entry.get("image_id", entry.get("id")), f"{where}: image_id")
        where = f"{path}: image {image_id}"
        if image_id in images:
            raise DataError(f"{where}: image_id appears twice")
        width = _positive_int(entry.get("width"), f"{where}: width")
        height = _positive_int(entry.get("height"), f"{where}: height")
        coco_id = entry.get("coco_id")
        if coco_id is not None:
            coco_id = _positive_int(coco_id, f"{where}: coco_id")
        url = entry.get("url")
        if url is not None and not isinstance(url, str):
            raise DataError(f"{where}: url must be a string, got {url!r:.80}")
        images[image_id] = VgImage(width, height, _file_name(url, image_id, where), coco_id)
    return images


def _file_name(url: str | None, image_id: int, where: str) -> str:
    """The url's file name (.../VG_100K_2/1.jpg -> 1.jpg), or IMAGE_ID.jpg without a url.

    One folder for all images, as VG's two zips are usually extracted (and `synth --vocab`
    writes them): image ids are unique across VG_100K and VG_100K_2.
    """
    name = urlsplit(url).path.rsplit("/", 1)[-1] if url else ""
    if name in (".", ".."):
        raise DataError(f"{where}: url {url!r} does not end in a file name")
    return name or f"{image_id}.jpg"


def _usable_objects(
    path: Path, images: dict[int, VgImage], aliases: dict[str, str] | None, summary: VgSummary
) -> Iterator[VgObject]:
    """Every object of objects.json with a name and a usable box; the others counted."""
    for i, entry in enumerate(iter_json_array(path)):
        image_id, objects = _image_element(entry, f"{path}: element {i}")
        image = images.get(image_id)
        where = f"{path}: image {image_id}"
        for obj in objects:
            summary.objects += 1
            object_id, box, names, synsets = _read_object(obj, where)
            name = class_name(names, synsets, aliases)
            reason, clipped = _check(name, box, image)
            if clipped is None:
                summary.dropped[reason] += 1
                continue
            yield VgObject(image_id, object_id, name, clipped, clipped != box)


def _image_element(entry: Any, where: str) -> tuple[int, list]:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    image_id = _positive_int(entry.get("image_id", entry.get("id")), f"{where}: image_id")
    objects = entry.get("objects")
    if not isinstance(objects, list):
        raise DataError(
            f"{where} (image {image_id}): 'objects' must be a list, got {objects!r:.60}"
        )
    return image_id, objects


def _read_object(obj: Any, where: str) -> tuple[int, list, list, list]:
    """(object_id, [x, y, w, h], names, synsets) of one VG object; schema errors raise.

    Runs for each of VG's ~4M objects, twice: checks by exact type (JSON gives int, float,
    str, list), messages built only on error.
    """
    if type(obj) is not dict:
        raise DataError(f"{where}: an object is not a JSON object: {obj!r:.80}")
    object_id = obj.get("object_id", obj.get("id"))
    if not (type(object_id) is int and 0 < object_id <= INT64_MAX):
        object_id = _positive_int(object_id, f"{where}: object_id")
    box = [obj.get("x"), obj.get("y"), obj.get("w"), obj.get("h")]
    if not {type(v) for v in box} <= _NUMBER_TYPES:
        key, value = next((k, v) for k, v in zip("xywh", box) if type(v) not in _NUMBER_TYPES)
        raise DataError(f"{where}, object {object_id}: {key!r} must be a number, got {value!r:.80}")
    names = obj.get("names", [obj["name"]] if "name" in obj else [])  # VG 1.0: one "name"
    synsets = obj.get("synsets", [])
    for key, value in (("names", names), ("synsets", synsets)):
        if not (type(value) is list and all(type(v) is str for v in value)):
            raise DataError(
                f"{where}, object {object_id}: {key!r} must be a list of strings, got {value!r:.80}"
            )
    return object_id, box, names, synsets


def _check(name: str, box: list, image: VgImage | None) -> tuple[str, list | None]:
    """(why the object is dropped, None), or ("", its [x, y, w, h] clipped to the image)."""
    if image is None:
        return "no_image", None
    if not name:
        return "no_name", None
    x, y, w, h = box
    if not (w >= 1 and h >= 1 and math.isfinite(x + y + w + h)):  # NaN / Inf anywhere: not finite
        return "degenerate", None
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, image.width), min(y + h, image.height)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return "outside", None
    return "", [x0, y0, x1 - x0, y1 - y0]


def _write_annotations(
    f: BinaryIO, objects: Iterator[VgObject], category_ids: dict[str, int], summary: VgSummary
) -> set[int]:
    """Write '{"annotations": [...' for the objects of kept classes; their image ids."""
    f.write(b'{"annotations": [')
    batch: list[str] = []
    images: set[int] = set()
    for obj in objects:
        category_id = category_ids.get(obj.name)
        if category_id is None:
            summary.dropped["rare_class"] += 1
            continue
        summary.kept += 1
        summary.clipped += obj.clipped
        images.add(obj.image_id)
        ann = {
            "id": summary.kept,
            "image_id": obj.image_id,
            "category_id": category_id,
            "bbox": obj.box,
            "area": obj.box[2] * obj.box[3],
            "iscrowd": 0,
            "vg_object_id": obj.object_id,
        }
        batch.append(json.dumps(ann, allow_nan=False))
        if len(batch) == _WRITE_BATCH:
            f.write(((", " if summary.kept > _WRITE_BATCH else "") + ", ".join(batch)).encode())
            batch = []
    if batch:
        f.write(((", " if summary.kept > len(batch) else "") + ", ".join(batch)).encode())
    return images


def _image_json(image_id: int, image: VgImage) -> dict:
    entry: dict[str, Any] = {
        "id": image_id,
        "width": image.width,
        "height": image.height,
        "file_name": image.file_name,
    }
    if image.coco_id is not None:
        entry["coco_id"] = image.coco_id
    return entry


def _positive_int(value: Any, what: str) -> int:
    number = as_int(value)
    if number is None or number < 1:
        raise DataError(f"{what} must be a positive integer, got {value!r:.80}")
    return number
