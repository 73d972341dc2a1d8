"""Seeded large-vocabulary stand-in for "COCO masks + Visual Genome boxes" training.

Writes three data sets of textured shapes drawn from `synthetic_vocab`'s classes::

    OUT/vg/image_data.json, OUT/vg/objects.json, OUT/vg/images/<image_id>.png
        Visual Genome's own schema, boxes only, every class, long-tailed class frequency
    OUT/coco/annotations/train.json, OUT/coco/train/<id:012d>.png
        COCO format with masks, only the few mask classes (as COCO's 80 are to VG's 3,000)
    OUT/val/annotations.json, OUT/val/images/<id:012d>.png
        COCO format with masks for every class

Some VG images are COCO images (`coco_id`, the same pixels and size): COCO annotates their
mask-class objects, VG annotates every object with its own, slightly different box, so a
merge of the sources has duplicate boxes to remove and boxes of other classes to add.

Objects sit in the cells of a grid (3 x 3 at 128 px, denser at larger sizes), so none is
occluded and every scheduled box is visible: each class gets at least `MIN_VG_BOXES` VG
boxes and `VAL_PER_CLASS` val instances. VG frequency follows Zipf's law over a seeded class
ranking, the mask classes taken among the frequent ones, as COCO's are in VG.
"""

from __future__ import annotations

import io
import json
import math
import shlex
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from everyseg.data.synthetic import (
    MIN_SIZE,
    _contrasting_texture,
    _full_mask,
    _segmentation,
    _texture,
)
from everyseg.data.synthetic_vocab import ShapeClass, unit_outline, vocabulary
from everyseg.data.synthetic_vocab_plan import (
    default_counts,
    default_mask_classes,
    grid_side,
    make_plan,
)

NOISY_NAME_EVERY = 8  # about one VG name in this many is spelled unnormalised, as in VG
_STREAM = {"vg": 1, "coco": 2, "val": 3}  # make_plan draws from stream 0


# --- drawing ----------------------------------------------------------------------------------


def _place(rng: np.random.Generator, shape: ShapeClass, cell: tuple[float, float], side: float):
    """Any rotation, extent 60-92% of the cell side, anywhere inside the cell."""
    theta = rng.uniform(0, 2 * math.pi)
    c, s = math.cos(theta), math.sin(theta)
    polys = [p @ np.array([[c, s], [-s, c]]) for p in unit_outline(shape)]
    lo, hi = polys[0].min(0), polys[0].max(0)
    scale = side * rng.uniform(0.6, 0.92) / (hi - lo).max()
    lo, hi = lo * scale, hi * scale
    shift = np.asarray(cell) + rng.uniform(-lo, side - hi)
    return [np.round(p * scale + shift, 2) for p in polys]  # JSON polygon = painted shape


def render(rng: np.random.Generator, labels: list[int], vocab, size: int):
    """(H, W, 3) uint8 pixels and one object per label: label, polys, full/visible mask, area."""
    grid = grid_side(size)
    side = size / grid
    cells = rng.choice(grid * grid, len(labels), replace=False)
    objects = []
    for label, cell in zip(labels, cells.tolist(), strict=True):
        corner = ((cell % grid) * side, (cell // grid) * side)
        polys = _place(rng, vocab[label], corner, side)
        full = _full_mask(polys, size)
        objects.append({"label": label, "polys": polys, "full": full, "visible": full})
    coords = tuple(np.mgrid[0:size, 0:size].astype(np.float32))
    canvas = _texture(rng, coords)
    for obj in objects:
        obj["area"] = int(obj["full"].sum())
        canvas[obj["full"]] = _contrasting_texture(rng, coords, canvas, obj["full"])[obj["full"]]
    canvas += rng.normal(0, rng.uniform(0, 6), canvas.shape).astype(np.float32)
    return np.clip(canvas, 0, 255).round().astype(np.uint8), objects


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def mask_box(mask: np.ndarray) -> list[int]:
    """[x, y, w, h] in whole pixels of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]


# --- files ------------------------------------------------------------------------------------


def _misspell(rng: np.random.Generator, name: str) -> str:
    """A spelling VG's normal form maps back to ``name`` (VG's names are typed by people)."""
    variants = (name.capitalize(), name.upper(), f" {name}", f"{name} ", name.replace(" ", "  "))
    return variants[int(rng.integers(len(variants)))]


def _vg_object(rng: np.random.Generator, obj: dict, object_id: int, vocab, size: int) -> dict:
    x, y, w, h = mask_box(obj["visible"])
    # VG's annotators drew their own boxes: every edge moves by up to a pixel
    x0, y0, x1, y1 = np.clip(np.array([x, y, x + w, y + h]) + rng.integers(-1, 2, 4), 0, size)
    name = vocab[obj["label"]].name
    if rng.integers(NOISY_NAME_EVERY) == 0:
        name = _misspell(rng, name)
    return {
        "object_id": object_id,
        "x": int(x0),
        "y": int(y0),
        "w": int(x1 - x0),
        "h": int(y1 - y0),
        "names": [name],
        "synsets": [],
    }


def _coco_annotation(obj: dict, image_id: int) -> dict:
    return {
        "image_id": image_id,
        "category_id": obj["label"] + 1,
        "segmentation": _segmentation(obj),
        "bbox": [float(v) for v in mask_box(obj["visible"])],
        "area": obj["area"],
        "iscrowd": 0,
    }


def _coco_json(images: list[dict], anns: dict[int, list[dict]], vocab, ids, info: dict) -> dict:
    numbered = [
        {"id": i, **ann}
        for i, ann in enumerate((a for image in images for a in anns[image["id"]]), start=1)
    ]
    categories = [
        {"id": k + 1, "name": vocab[k].name, "supercategory": vocab[k].family} for k in ids
    ]
    return {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": numbered,
        "categories": categories,
    }


def _write_json(path: Path, data, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, separators=(",", ":"), **kwargs))


def generate_vocab(
    out_dir: str | Path,
    *,
    vocab: int,
    num_vg: int | None = None,
    num_coco: int | None = None,
    num_val: int | None = None,
    num_mask: int | None = None,
    size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, str]:
    """Write the VG, COCO and val sets (see the module docstring); counts left None take
    `default_counts`. The same arguments give byte-identical files. Returns absolute paths
    under ``vg_objects``, ``vg_image_data``, ``vg_images``, ``coco_json``, ``coco_images``,
    ``val_json`` and ``val_images``."""
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    classes = vocabulary(vocab)
    defaults = default_counts(vocab, size)
    num_mask = default_mask_classes(vocab) if num_mask is None else num_mask
    if not 1 <= num_mask <= vocab:
        raise ValueError(f"the number of mask classes must be in [1, {vocab}], got {num_mask}")
    plan = make_plan(
        vocab=vocab,
        num_vg=num_vg or defaults["num_vg"],
        num_coco=num_coco or defaults["num_coco"],
        num_val=num_val or defaults["num_val"],
        num_mask=num_mask,
        grid=grid_side(size),
        seed=seed,
    )
    out = Path(out_dir).resolve()
    paths = {
        "vg_objects": out / "vg" / "objects.json",
        "vg_image_data": out / "vg" / "image_data.json",
        "vg_images": out / "vg" / "images",
        "coco_json": out / "coco" / "annotations" / "train.json",
        "coco_images": out / "coco" / "train",
        "val_json": out / "val" / "annotations.json",
        "val_images": out / "val" / "images",
    }
    for key in ("vg_images", "coco_images", "val_images"):
        paths[key].mkdir(parents=True, exist_ok=True)
    args = {"vocab": vocab, "size": size, "seed": seed}
    coco_images, coco_anns = _write_vg(paths, plan, classes, size, seed, progress)
    _write_coco_only(paths, plan, classes, size, seed, progress, coco_images, coco_anns)
    info = {"description": "everyseg large-vocabulary shapes, COCO source", "args": args}
    ids = plan.mask_classes
    _write_json(paths["coco_json"], _coco_json(coco_images, coco_anns, classes, ids, info))
    _write_val(paths, plan, classes, size, seed, progress, args)
    return {key: str(path) for key, path in paths.items()}


def _write_vg(paths, plan, classes, size, seed, progress) -> tuple[list[dict], dict]:
    """VG images and files; the COCO images and annotations of the shared ones."""
    mask_set = set(plan.mask_classes)
    image_data, objects_json = [], []
    coco_images: list[dict] = []
    coco_anns: dict[int, list[dict]] = {}
    object_id = 0
    for image_id, labels in enumerate(tqdm(plan.vg, desc="synth vg", disable=not progress), 1):
        rng = np.random.default_rng([seed, _STREAM["vg"], image_id])
        pixels, objects = render(rng, labels, classes, size)
        png = _png(pixels)
        (paths["vg_images"] / f"{image_id}.png").write_bytes(png)
        coco_id = plan.shared.get(image_id)
        url = f"https://vg.everyseg.invalid/VG_100K/{image_id}.png"
        image_data.append(
            {"image_id": image_id, "width": size, "height": size, "coco_id": coco_id, "url": url}
        )
        entries = []
        for obj in objects:
            object_id += 1
            entries.append(_vg_object(rng, obj, object_id, classes, size))
        objects_json.append({"image_id": image_id, "objects": entries})
        if coco_id is not None:
            coco_images.append(_coco_image(paths, coco_id, png, size))
            kept = [obj for obj in objects if obj["label"] in mask_set]
            coco_anns[coco_id] = [_coco_annotation(obj, coco_id) for obj in kept]
    _write_json(paths["vg_image_data"], image_data)
    _write_json(paths["vg_objects"], objects_json)
    return coco_images, coco_anns


def _coco_image(paths, image_id: int, png: bytes, size: int) -> dict:
    file_name = f"{image_id:012d}.png"
    (paths["coco_images"] / file_name).write_bytes(png)
    return {"id": image_id, "file_name": file_name, "width": size, "height": size}


def _write_coco_only(paths, plan, classes, size, seed, progress, coco_images, coco_anns):
    num_coco = len(plan.coco_only) + len(plan.shared)
    free = [i for i in range(1, num_coco + 1) if i not in coco_anns]
    for image_id, labels in zip(
        tqdm(free, desc="synth coco", disable=not progress), plan.coco_only, strict=True
    ):
        rng = np.random.default_rng([seed, _STREAM["coco"], image_id])
        pixels, objects = render(rng, labels, classes, size)
        coco_images.append(_coco_image(paths, image_id, _png(pixels), size))
        coco_anns[image_id] = [_coco_annotation(obj, image_id) for obj in objects]
    coco_images.sort(key=lambda image: image["id"])


def _write_val(paths, plan, classes, size, seed, progress, args) -> None:
    images, anns = [], {}
    for image_id, labels in enumerate(tqdm(plan.val, desc="synth val", disable=not progress), 1):
        rng = np.random.default_rng([seed, _STREAM["val"], image_id])
        pixels, objects = render(rng, labels, classes, size)
        file_name = f"{image_id:012d}.png"
        (paths["val_images"] / file_name).write_bytes(_png(pixels))
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        anns[image_id] = [_coco_annotation(obj, image_id) for obj in objects]
    info = {"description": "everyseg large-vocabulary shapes, val: masks for every class"}
    data = _coco_json(images, anns, classes, range(len(classes)), {**info, "args": args})
    _write_json(paths["val_json"], data)


def usage(paths: dict[str, str], *, vocab: int) -> str:
    """Where the files went and the commands that convert VG and train on all three."""
    vg_json = str(Path(paths["vg_objects"]).with_name("vg.json"))
    sources = (
        f"[{{json: {json.dumps(paths['coco_json'])}, images: {json.dumps(paths['coco_images'])}, "
        f"mask_classes: all, weight: 3}}, {{json: {json.dumps(vg_json)}, "
        f"images: {json.dumps(paths['vg_images'])}, mask_classes: none}}]"
    )
    convert = [
        "everyseg", "convert", "vg", "--objects", paths["vg_objects"],
        "--image-data", paths["vg_image_data"], "--classes", str(vocab), "--out", vg_json,
    ]  # fmt: skip
    train = [
        "everyseg", "train", "maskx-vg-tiny", "--out", "runs/vocab",
        "--set", f"data.train_sources={sources}",
        "--set", f"data.val_json={paths['val_json']}",
        "--set", f"data.val_images={paths['val_images']}",
    ]  # fmt: skip
    return "\n".join(
        [
            f"{vocab} classes of shapes:",
            f"  VG source, boxes only:  {paths['vg_image_data']}",
            f"                          {paths['vg_objects']}",
            f"                          {paths['vg_images']}/<image_id>.png",
            f"  COCO source, masks for a few classes:  {paths['coco_json']}",
            f"                          {paths['coco_images']}/<id:012d>.png",
            f"  val, masks for every class:  {paths['val_json']}",
            f"                          {paths['val_images']}/<id:012d>.png",
            "convert the VG source to COCO format, then train on both sources:",
            f"  {shlex.join(convert)}",
            f"  {shlex.join(train)}",
        ]
    )
