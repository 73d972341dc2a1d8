"""Seeded "hard" synthetic benchmark: an object's mask depends on its class.

On the easy shapes (`synthetic`) every object is a solid region that contrasts with what lies
beneath, so a class-agnostic mask head segments unseen classes as well as seen ones. Here each
object is an outline with a cut-out through which whatever lies beneath shows, and whether
the cut-out belongs to the object's mask is a property of its class - as a car's windows
belong to a car's COCO mask and a doughnut's hole does not belong to a doughnut's:

- a **window** class includes its cut-out in the mask (the mask is the whole outline);
- a **hole** class does not (the mask is the outline minus the cut-out).

Windows and holes are painted the same way (see-through), so no pixel tells them apart: only
the class does. Classes are the 16 pairs of an outer outline (circle, square, hexagon,
triangle) and a cut-out (round, square, slot, and a "bite" that crosses the outline and makes
a C-like concavity). Window iff (outline index + cut index) is even, so every outline and
every cut has two window and two hole classes; the seen classes (`SEEN_CLASSES`, written to
``OUT/seen_classes.txt`` for ``data.mask_classes``) hold one window and one hole class of each
outline and of each cut, so neither the outline nor the cut of an unseen class says its rule.

As on the easy data, fills and backgrounds come from the same texture kinds with random
colours whatever the class; backgrounds are cluttered with unannotated textured regions
(half-planes and blobs); objects overlap. An annotation is the object's visible part: its
mask region minus the solid parts of the objects above it (a window, being see-through,
hides nothing, so a lower object seen through it is visible there too and the two masks
overlap). Boxes are the tight boxes of the visible masks, as on the easy data. Every mask is
written as RLE.

Usage::

    from everyseg.data.synthetic_hard import generate_hard
    paths = generate_hard("data/hard", num_train=1000, num_val=200, size=128, seed=0)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util

from everyseg.data.synthetic import (
    MIN_SIZE,
    MIN_VISIBLE_FRACTION,
    MIN_VISIBLE_PX,
    _contrasting_texture,
    _ellipse,
    _normalised,
    _poly,
    _raster,
    _regular,
    _texture,
    write_dataset,
)

OUTLINES: tuple[str, ...] = ("circle", "square", "hexagon", "triangle")
CUTS: tuple[str, ...] = ("round", "square", "slot", "bite")
CLASS_NAMES: tuple[str, ...] = tuple(f"{o}-{c}" for o in OUTLINES for c in CUTS)
CATEGORY_IDS: tuple[int, ...] = tuple(range(1, len(CLASS_NAMES) + 1))
WINDOW_CLASSES: frozenset[str] = frozenset(
    f"{o}-{c}" for i, o in enumerate(OUTLINES) for j, c in enumerate(CUTS) if (i + j) % 2 == 0
)
SEEN_CLASSES: tuple[str, ...] = tuple(  # (i, i) and (i, i + 1): one window, one hole each
    f"{o}-{c}"
    for i, o in enumerate(OUTLINES)
    for j, c in enumerate(CUTS)
    if j in (i, (i + 1) % len(CUTS))
)
SCALE_RANGE = (0.25, 0.55)  # object extent as a fraction of the image side
_NUM_OBJECTS_P = np.array([0.15, 0.3, 0.3, 0.15, 0.1])  # 1..5 objects per image


# --- unit shapes: [outline, cut], centred on the outline's box, extent 1 ----------------------


def _inner_disc(outline: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre (vertex mean) and radius of a disc inside the convex outline: cuts are sized to
    it, so they fit every outline."""
    centre = outline.mean(0)
    edges = np.roll(outline, -1, axis=0) - outline
    normal = np.stack([edges[:, 1], -edges[:, 0]], axis=1) / np.linalg.norm(edges, axis=1)[:, None]
    return centre, float(np.abs(((outline - centre) * normal).sum(1)).min())


def _cut(name: str, centre: np.ndarray, r: float) -> np.ndarray:
    if name == "round":
        return centre + _ellipse(0.62 * r, 0.62 * r)
    if name == "square":
        h = 0.55 * r
        return centre + _poly(-h, -h, h, -h, h, h, -h, h)
    if name == "slot":
        a, b = 0.85 * r, 0.28 * r
        return centre + _poly(-a, -b, a, -b, a, b, -a, b)
    return centre + _ellipse(0.75 * r, 0.75 * r, cx=0.0) + np.array([0.0, -1.05 * r])  # bite


def _unit_shapes() -> dict[str, list[np.ndarray]]:
    outlines = {
        "circle": _ellipse(1, 1),
        "square": _poly(0, 0, 1, 0, 1, 1, 0, 1),
        "hexagon": _regular(6),
        "triangle": _regular(3),
    }
    shapes = {}
    for o in OUTLINES:
        outline = _normalised([outlines[o]])[0]
        centre, r = _inner_disc(outline)
        for c in CUTS:
            shapes[f"{o}-{c}"] = [outline, _cut(c, centre, r)]
    return shapes


_UNIT = _unit_shapes()


# --- layout ---------------------------------------------------------------------------------


def _place(rng: np.random.Generator, label: int, size: int) -> list[np.ndarray]:
    """Random scale, mild aspect, any rotation and position; the outline fully inside."""
    scale = size * rng.uniform(*SCALE_RANGE)
    aspect = math.sqrt(rng.uniform(0.85, 1.18))
    theta = rng.uniform(0, 2 * math.pi)
    c, s = math.cos(theta), math.sin(theta)
    m = np.array([[c, s], [-s, c]]) * np.array([[scale * aspect], [scale / aspect]])
    polys = [p @ m for p in _UNIT[CLASS_NAMES[label]]]
    lo, hi = polys[0].min(0), polys[0].max(0)
    shift = rng.uniform(-lo, size - hi)
    return [np.round(p + shift, 2) for p in polys]


def _shape_masks(label: int, polys: list[np.ndarray], size: int) -> dict:
    """(H, W) bool masks: `solid` is painted; `region` is what the class's mask covers."""
    outline = _raster(polys[0], size)
    solid = outline & ~_raster(polys[1], size)
    region = outline if CLASS_NAMES[label] in WINDOW_CLASSES else solid
    return {"label": label, "solid": solid, "region": region}


def _keep_visible(objects: list[dict]) -> list[dict]:
    """Visible masks, top to bottom: a mask region minus the solids above it. Mostly hidden
    objects are dropped and not painted, so no unannotated object fragment is left."""
    cover = np.zeros_like(objects[0]["solid"])
    kept = []
    for obj in reversed(objects):
        seen_solid = int((obj["solid"] & ~cover).sum())
        if seen_solid >= MIN_VISIBLE_PX and seen_solid >= MIN_VISIBLE_FRACTION * obj["solid"].sum():
            visible = obj["region"] & ~cover
            kept.append({**obj, "visible": visible, "area": int(visible.sum())})
            cover |= obj["solid"]
    return kept[::-1]


def _layout(rng: np.random.Generator, size: int) -> list[dict]:
    """Objects that stay annotated, bottom first; resampled in the rare case none survives."""
    kept: list[dict] = []
    while not kept:
        objects = []
        for _ in range(1 + rng.choice(len(_NUM_OBJECTS_P), p=_NUM_OBJECTS_P)):
            label = int(rng.integers(len(CLASS_NAMES)))
            objects.append(_shape_masks(label, _place(rng, label, size), size))
        kept = _keep_visible(objects)
    return kept


# --- painting -------------------------------------------------------------------------------


def _clutter(rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    """Unannotated background regions: 1-2 half-planes and 0-2 blobs (ellipses), so edges run
    through cut-outs and around objects as they would on a real scene."""
    size = grid[0].shape[0]
    regions = []
    for _ in range(rng.integers(1, 3)):
        a = rng.uniform(0, 2 * math.pi)
        py, px = rng.uniform(0.2, 0.8, 2) * size
        regions.append((grid[0] - py) * math.cos(a) + (grid[1] - px) * math.sin(a) > 0)
    for _ in range(rng.integers(0, 3)):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(0.08, 0.3, 2) * size
        regions.append(((grid[0] - cy) / ry) ** 2 + ((grid[1] - cx) / rx) ** 2 < 1)
    return regions


def render_hard(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[dict]]:
    """(H, W, 3) uint8 image and its kept objects, bottom first, each with bool (H, W)
    `solid`, `region` and `visible` masks, `label` and `area`."""
    kept = _layout(rng, size)
    grid = tuple(np.mgrid[0:size, 0:size].astype(np.float32))
    canvas = _texture(rng, grid)
    for region in _clutter(rng, grid):
        canvas[region] = _texture(rng, grid)[region]
    for obj in kept:
        solid = obj["solid"]
        canvas[solid] = _contrasting_texture(rng, grid, canvas, solid)[solid]
    canvas += rng.normal(0, rng.uniform(0, 6), canvas.shape).astype(np.float32)
    return np.clip(canvas, 0, 255).round().astype(np.uint8), kept


# --- files ----------------------------------------------------------------------------------


def _annotation(obj: dict, ann_id: int, image_id: int) -> dict:
    ys, xs = np.nonzero(obj["visible"])
    x0, y0 = float(xs.min()), float(ys.min())
    rle = mask_util.encode(np.asfortranarray(obj["visible"].astype(np.uint8)))
    counts = rle["counts"]  # bytes from pycocotools; JSON wants str
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": CATEGORY_IDS[obj["label"]],
        "segmentation": {
            "size": [int(s) for s in rle["size"]],
            "counts": counts.decode() if isinstance(counts, bytes) else counts,
        },
        "bbox": [x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0],
        "area": obj["area"],
        "iscrowd": 0,
    }


def _categories() -> list[dict]:
    return [
        {
            "id": cid,
            "name": name,
            "supercategory": name.split("-")[0],
            "cutout": "window" if name in WINDOW_CLASSES else "hole",
        }
        for cid, name in zip(CATEGORY_IDS, CLASS_NAMES, strict=True)
    ]


def generate_hard(
    out_dir: str | Path,
    *,
    num_train: int = 1000,
    num_val: int = 200,
    size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, str]:
    """Write ``OUT/annotations/{train,val}.json``, ``OUT/{train,val}/*.png`` and
    ``OUT/seen_classes.txt`` (the fixed seen split, one name a line, for
    ``data.mask_classes``).

    The same arguments give byte-identical files. Returns absolute paths under the keys
    ``train_json``, ``train_images``, ``val_json``, ``val_images``, as `synthetic.generate`.
    """
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    paths = write_dataset(
        out_dir,
        num_train=num_train,
        num_val=num_val,
        seed=seed,
        render=lambda rng: render_hard(rng, size),
        annotate=_annotation,
        info={
            "description": "everyseg hard synthetic shapes: outlines with see-through "
            "cut-outs that belong to the mask for 'window' classes and not for 'hole' classes",
            "generator": "everyseg.data.synthetic_hard",
            "args": {"size": size, "seed": seed},
            "seen_classes": list(SEEN_CLASSES),
        },
        categories=_categories(),
        progress=progress,
    )
    (Path(out_dir).resolve() / "seen_classes.txt").write_text(
        "# seen classes of the hard benchmark: data.mask_classes for the partial runs\n"
        + "".join(f"{name}\n" for name in SEEN_CLASSES)
    )
    return paths
