"""Seeded generator of COCO-format instance segmentation data made of textured shapes.

The class of an object is carried by its outline only: fills and backgrounds are drawn from
the same texture kinds with random colours, independently of the class, so a model cannot
shortcut through colour. Objects occlude each other; each annotation is the visible region.

Masks are rasterised with pycocotools' own polygon rasteriser, so a polygon annotation
decodes (``COCO.annToMask``) to exactly the pixels that were painted. Unoccluded
simply-connected shapes are written as polygons, occluded shapes and rings as RLE, so
downstream loaders meet both encodings. Shapes with corners (triangle, square, pentagon,
star) also have COCO keypoints (data/synthetic_keypoints.py).

Usage::

    from everyseg.data.synthetic import generate
    paths = generate("data/shapes", num_train=2000, num_val=200, size=128, seed=0)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image
from tqdm import tqdm

from everyseg.data import synthetic_keypoints

CLASS_NAMES: tuple[str, ...] = (
    "circle", "ellipse", "triangle", "square", "pentagon", "star", "cross",
    "ring", "crescent", "heart", "arrow", "L-shape", "T-shape", "semicircle",
)  # fmt: skip
# Non-contiguous on purpose, so downstream id -> label mapping is exercised.
CATEGORY_IDS: tuple[int, ...] = tuple(2 * i + 1 for i in range(len(CLASS_NAMES)))

MIN_SIZE = 64  # below this the smallest objects fall under MIN_VISIBLE_PX
MIN_VISIBLE_FRACTION = 0.35
MIN_VISIBLE_PX = 20
MIN_CONTRAST = 60.0  # RGB distance between an object's mean fill and what lies beneath it
_SPLIT_STREAM = {"train": 0, "val": 1}
_NUM_OBJECTS_P = np.array([0.08, 0.2, 0.26, 0.24, 0.14, 0.08])  # 1..6 objects per image


# --- shape outlines (unit scale, y pointing down; list of [outer, *holes]) -------------------


def _ellipse(
    rx: float,
    ry: float,
    n: int = 36,
    start: float = 0.0,
    stop: float = 2 * math.pi,
    cx: float = 0.0,
    endpoint: bool = False,
) -> np.ndarray:
    t = np.linspace(start, stop, n, endpoint=endpoint)
    return np.stack([cx + rx * np.cos(t), ry * np.sin(t)], axis=1)


def _regular(n: int, inner: float | None = None) -> np.ndarray:
    """Regular n-gon with a vertex on top; with ``inner`` a star alternating two radii."""
    k = 2 * n if inner else n
    t = -math.pi / 2 + np.arange(k) * 2 * math.pi / k
    r = np.where(np.arange(k) % 2 == 1, inner, 1.0) if inner else np.ones(k)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _crescent() -> np.ndarray:
    # Unit circle minus a circle of radius r centred at (d, 0): outer arc, then inner arc back.
    d, r = 0.45, 0.8
    x = (1 + d * d - r * r) / (2 * d)
    y = math.sqrt(1 - x * x)
    a, b = math.atan2(y, x), math.atan2(y, x - d)
    outer = _ellipse(1, 1, 28, a, 2 * math.pi - a)
    inner = _ellipse(r, r, 20, 2 * math.pi - b, b, cx=d)
    return np.concatenate([outer, inner])


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -y], axis=1)


def _poly(*xy: float) -> np.ndarray:
    return np.asarray(xy, dtype=np.float64).reshape(-1, 2)


_OUTLINES: dict[str, list[np.ndarray]] = {
    "circle": [_ellipse(1, 1)],
    "ellipse": [_ellipse(1, 0.5)],
    "triangle": [_regular(3)],
    "square": [_poly(0, 0, 1, 0, 1, 1, 0, 1)],
    "pentagon": [_regular(5)],
    "star": [_regular(5, inner=0.45)],
    "cross": [_poly(1, 0, 2, 0, 2, 1, 3, 1, 3, 2, 2, 2, 2, 3, 1, 3, 1, 2, 0, 2, 0, 1, 1, 1)],
    "ring": [_ellipse(1, 1), _ellipse(0.5, 0.5)],
    "crescent": [_crescent()],
    "heart": [_heart()],
    "arrow": [_poly(0, 0.35, 0.55, 0.35, 0.55, 0, 1, 0.5, 0.55, 1, 0.55, 0.65, 0, 0.65)],
    "L-shape": [_poly(0, 0, 0.4, 0, 0.4, 0.6, 0.8, 0.6, 0.8, 1, 0, 1)],
    "T-shape": [_poly(0, 0, 1, 0, 1, 0.35, 0.675, 0.35, 0.675, 1, 0.325, 1, 0.325, 0.35, 0, 0.35)],
    "semicircle": [_ellipse(1, 1, 25, math.pi, 2 * math.pi, endpoint=True)],
}
assert tuple(_OUTLINES) == CLASS_NAMES


def _normalised(polys: list[np.ndarray]) -> list[np.ndarray]:
    """Centre on the outer bbox and scale its longer side to 1, so `scale` means extent."""
    lo, hi = polys[0].min(0), polys[0].max(0)
    return [(p - (lo + hi) / 2) / (hi - lo).max() for p in polys]


_UNIT = {name: _normalised(polys) for name, polys in _OUTLINES.items()}


# --- geometry ----------------------------------------------------------------------------


def _place(rng: np.random.Generator, label: int, size: int) -> list[np.ndarray]:
    """Random scale, aspect, rotation (quarter turns + small jitter) and position, fully inside."""
    scale = size * rng.uniform(0.12, 0.45)
    aspect = math.sqrt(rng.uniform(0.85, 1.18))  # mild, so circle and ellipse stay apart
    theta = rng.integers(4) * math.pi / 2 + rng.uniform(-0.3, 0.3)
    c, s = math.cos(theta), math.sin(theta)
    m = np.array([[c, s], [-s, c]]) * np.array([[scale * aspect], [scale / aspect]])
    polys = [p @ m for p in _UNIT[CLASS_NAMES[label]]]
    lo, hi = polys[0].min(0), polys[0].max(0)
    shift = rng.uniform(-lo, size - hi)  # pycocotools pixel i covers [i, i+1): stay in [0, size]
    # Round first and rasterise the rounded vertices, so the JSON polygon is the painted shape.
    return [np.round(p + shift, 2) for p in polys]


def _raster(poly: np.ndarray, size: int) -> np.ndarray:
    rle = mask_util.frPyObjects([poly.ravel().tolist()], size, size)
    return mask_util.decode(rle)[:, :, 0].astype(bool)


def _full_mask(polys: list[np.ndarray], size: int) -> np.ndarray:
    mask = _raster(polys[0], size)
    for hole in polys[1:]:
        mask &= ~_raster(hole, size)
    return mask


def _keep_visible(objects: list[dict], size: int) -> list[dict]:
    """Visible masks, top to bottom; drop mostly hidden objects and do not paint them, so no
    unannotated fragment is left in the image (dropping only ever uncovers lower objects)."""
    cover = np.zeros((size, size), dtype=bool)
    kept = []
    for obj in reversed(objects):
        visible = obj["full"] & ~cover
        area = int(visible.sum())
        if area >= MIN_VISIBLE_PX and area >= MIN_VISIBLE_FRACTION * obj["full"].sum():
            kept.append({**obj, "visible": visible, "area": area})
            cover |= obj["full"]
    return kept[::-1]


# --- textures (shared by objects and backgrounds, never conditioned on class) ---------------


def _ramp(
    rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray], angle: float | None = None
) -> np.ndarray:
    """Coordinate along a (random) direction, in pixels."""
    a = rng.uniform(0, math.pi) if angle is None else angle
    return grid[0] * math.cos(a) + grid[1] * math.sin(a)


def _stripes(rng, grid):
    return (_ramp(rng, grid) / rng.uniform(4, 16) + rng.random()) % 1 < rng.uniform(0.3, 0.7)


def _checker(rng, grid):
    k, a = rng.uniform(3, 12), rng.uniform(0, math.pi / 2)
    u, v = _ramp(rng, grid, a), _ramp(rng, grid, a + math.pi / 2)
    return (np.floor(u / k) + np.floor(v / k)) % 2


def _noise(rng, grid):
    size = grid[0].shape[0]
    cells = rng.random((int(rng.integers(3, 12)),) * 2).astype(np.float32)
    smooth = np.asarray(Image.fromarray(cells).resize((size, size), Image.BILINEAR))
    return np.clip(smooth + rng.normal(0, 0.15, (size, size)), 0, 1)


def _gradient(rng, grid):
    u = _ramp(rng, grid)
    return (u - u.min()) / (u.max() - u.min())


def _solid(rng, grid):
    return np.zeros_like(grid[0])


_TEXTURES = (_solid, _stripes, _checker, _noise, _gradient)


def _texture(rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """HxWx3 float32 image: a random texture kind blending two random colours."""
    t = _TEXTURES[rng.integers(len(_TEXTURES))](rng, grid).astype(np.float32)[..., None]
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    return c0 + t * (c1 - c0)


def _contrasting_texture(rng, grid, canvas: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Resample until the fill's mean differs from what it covers, so every shape is visible.
    The test looks only at colours, so it cannot tie colour to class."""
    beneath = canvas[mask].mean(0)
    for _ in range(8):
        tex = _texture(rng, grid)
        if np.linalg.norm(tex[mask].mean(0) - beneath) >= MIN_CONTRAST:
            break
    return tex


# --- images and annotations ----------------------------------------------------------------


def _layout(rng: np.random.Generator, size: int) -> list[dict]:
    """Objects that stay annotated, bottom first; resampled in the rare case none survives."""
    kept: list[dict] = []
    while not kept:
        objects = []
        for _ in range(1 + rng.choice(len(_NUM_OBJECTS_P), p=_NUM_OBJECTS_P)):
            label = int(rng.integers(len(CLASS_NAMES)))
            polys = _place(rng, label, size)
            objects.append({"label": label, "polys": polys, "full": _full_mask(polys, size)})
        kept = _keep_visible(objects, size)
    return kept


def _render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[dict]]:
    kept = _layout(rng, size)
    grid = tuple(np.mgrid[0:size, 0:size].astype(np.float32))
    canvas = _texture(rng, grid)
    for obj in kept:
        canvas[obj["full"]] = _contrasting_texture(rng, grid, canvas, obj["full"])[obj["full"]]
    canvas += rng.normal(0, rng.uniform(0, 6), canvas.shape).astype(np.float32)
    return np.clip(canvas, 0, 255).round().astype(np.uint8), kept


def _segmentation(obj: dict) -> list | dict:
    if len(obj["polys"]) == 1 and obj["area"] == obj["full"].sum():
        return [obj["polys"][0].ravel().tolist()]
    rle = mask_util.encode(np.asfortranarray(obj["visible"].astype(np.uint8)))
    counts = rle["counts"]  # bytes from pycocotools; JSON wants str
    text = counts.decode("ascii") if isinstance(counts, bytes) else counts
    return {"size": [int(s) for s in rle["size"]], "counts": text}


def _annotation(obj: dict, ann_id: int, image_id: int) -> dict:
    ys, xs = np.nonzero(obj["visible"])
    x0, y0 = float(xs.min()), float(ys.min())
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": CATEGORY_IDS[obj["label"]],
        "segmentation": _segmentation(obj),
        "bbox": [x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0],
        "area": obj["area"],
        "iscrowd": 0,
    } | synthetic_keypoints.annotation_fields(
        CLASS_NAMES[obj["label"]], obj["polys"][0], obj["visible"]
    )


def image_rng(seed: int, split: str, image_id: int) -> np.random.Generator:
    """The generator an image is drawn from: its own child seed, so it is reproducible in
    isolation and independent of how many images the split has."""
    return np.random.default_rng([seed, _SPLIT_STREAM[split], image_id])


def _write_split(
    out: Path,
    split: str,
    *,
    num: int,
    seed: int,
    render: Callable[[np.random.Generator], tuple[np.ndarray, list[dict]]],
    annotate: Callable[[dict, int, int], dict],
    info: dict,
    categories: list[dict],
    progress: bool,
) -> tuple[Path, Path]:
    """Render `num` images of a split into OUT/SPLIT/*.png and OUT/annotations/SPLIT.json.

    `render(rng)` draws one image and its objects, `annotate(obj, ann_id, image_id)` makes an
    object's COCO annotation. Each image has its own child seed, so it is reproducible in
    isolation and independent of `num`.
    """
    image_dir, json_path = out / split, out / "annotations" / f"{split}.json"
    image_dir.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    images: list[dict] = []
    annotations: list[dict] = []
    desc = f"{info['generator'].rsplit('.', 1)[-1].replace('_', ' ')} {split}"
    for image_id in tqdm(range(1, num + 1), desc=desc, disable=not progress):
        pixels, objects = render(image_rng(seed, split, image_id))
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(image_dir / file_name, format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": pixels.shape[1],
                       "height": pixels.shape[0]})  # fmt: skip
        for obj in objects:
            annotations.append(annotate(obj, len(annotations) + 1, image_id))
    dataset = {
        "info": info | {"args": info["args"] | {"split": split, "num_images": num}},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    json_path.write_text(json.dumps(dataset, sort_keys=True, separators=(",", ":")))
    return json_path, image_dir


def write_dataset(
    out_dir: str | Path,
    *,
    num_train: int,
    num_val: int,
    seed: int,
    render: Callable[[np.random.Generator], tuple[np.ndarray, list[dict]]],
    annotate: Callable[[dict, int, int], dict],
    info: dict,
    categories: list[dict],
    progress: bool,
) -> dict[str, str]:
    """A generator's train and val splits (see `_write_split`); absolute paths under the keys
    ``train_json``, ``train_images``, ``val_json``, ``val_images``."""
    out = Path(out_dir).resolve()
    paths = {}
    for split, num in (("train", num_train), ("val", num_val)):
        json_path, image_dir = _write_split(
            out,
            split,
            num=num,
            seed=seed,
            render=render,
            annotate=annotate,
            info=info,
            categories=categories,
            progress=progress,
        )
        paths[f"{split}_json"], paths[f"{split}_images"] = str(json_path), str(image_dir)
    return paths


def generate(
    out_dir: str | Path,
    *,
    num_train: int = 2000,
    num_val: int = 200,
    size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, str]:
    """Write ``OUT/annotations/{train,val}.json`` and ``OUT/{train,val}/*.png``.

    The same arguments give byte-identical files. Returns absolute paths under the keys
    ``train_json``, ``train_images``, ``val_json``, ``val_images``.
    """
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    return write_dataset(
        out_dir,
        num_train=num_train,
        num_val=num_val,
        seed=seed,
        render=lambda rng: _render(rng, size),
        annotate=_annotation,
        info={
            "description": "everyseg synthetic shapes: the class is the outline; fill "
            "colour and texture are independent of the class",
            "generator": "everyseg.data.synthetic",
            "args": {"size": size, "seed": seed},
        },
        categories=[
            {"id": cid, "name": name, "supercategory": "shape"}
            | synthetic_keypoints.category_fields(name)
            for cid, name in zip(CATEGORY_IDS, CLASS_NAMES, strict=True)
        ],
        progress=progress,
    )
