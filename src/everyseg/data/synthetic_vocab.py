"""A large vocabulary of shape classes made as procedural families.

A family is a base outline (``"star 5"``, ``"polygon 7"``, ``"heart"``, ...); its members vary
it by aspect (``wide``, ``long``, ``thin``), holes (``holed``, ``double holed``) and notches
cut from the rim (``notched``, ``double notched``), so classes share structure the way real
categories do ("spiky star 5 long holed" is near "spiky star 5" and "star 5 long holed"). All
3,336 classes exist for any vocabulary size; ``--vocab N`` takes a fixed pseudo-random subset
of N, so every prefix mixes families and modifiers, and the subset depends on N only.

Class names are already in Visual Genome's normal form (lower case, single spaces, no
leading or trailing space), so ``convert vg`` keeps them unchanged and they match the COCO
source's category names.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from everyseg.data.synthetic import _OUTLINES, _normalised, _poly, _regular

# stretch along x before rotation; 1 keeps the base's own proportions
ASPECTS: dict[str, float] = {"": 1.0, "wide": 1.35, "long": 1.8, "thin": 2.6}
HOLES: tuple[str, ...] = ("", "holed", "double holed")
NOTCHES: tuple[str, ...] = ("", "notched", "double notched")
STAR_INNER: dict[str, float] = {"star": 0.5, "spiky star": 0.3, "blunt star": 0.7}
POINTS = range(3, 25)
_VOCAB_ORDER_SEED = 20240601  # fixed: the class subset of a given N never depends on --seed


@dataclass(frozen=True)
class ShapeClass:
    """One class: a family's base outline and the modifiers applied to it."""

    family: str
    aspect: str = ""
    holes: str = ""
    notches: str = ""

    @property
    def name(self) -> str:
        return " ".join(
            part for part in (self.family, self.aspect, self.holes, self.notches) if part
        )


def _fixed_bases() -> dict[str, list[np.ndarray]]:
    names = {"L-shape": "l shape", "T-shape": "t shape"}
    skip = {"ellipse", "ring", "square", "pentagon", "star", "triangle"}  # members or polygons
    return {names.get(k, k): v for k, v in _OUTLINES.items() if k not in skip}


@cache
def _bases() -> dict[str, np.ndarray]:
    """Family name -> outer outline (unit-ish scale, centred near the origin)."""
    bases = {name: polys[0] for name, polys in _fixed_bases().items()}
    for n in POINTS:
        bases[f"polygon {n}"] = _regular(n)
    for kind, inner in STAR_INNER.items():
        for n in POINTS:
            bases[f"{kind} {n}"] = _regular(n, inner=inner)
    return bases


def _holeable(family: str) -> bool:
    """Families whose centre lies well inside the outline, so a central hole is a hole."""
    return family.split()[-1].isdigit() or family in ("circle", "cross", "heart")


@cache
def all_classes() -> tuple[ShapeClass, ...]:
    """Every class, families in a fixed order, modifiers varying fastest."""
    classes = []
    for family in _bases():
        for aspect in ASPECTS:
            for holes in HOLES if _holeable(family) else ("",):
                for notches in NOTCHES:
                    classes.append(ShapeClass(family, aspect, holes, notches))
    return tuple(classes)


def vocabulary(size: int) -> tuple[ShapeClass, ...]:
    """``size`` classes: a fixed pseudo-random subset of `all_classes`, in its order."""
    every = all_classes()
    if not 1 <= size <= len(every):
        raise ValueError(f"--vocab must be in [1, {len(every)}], got {size}")
    order = np.random.default_rng(_VOCAB_ORDER_SEED).permutation(len(every))
    return tuple(every[i] for i in sorted(order[:size].tolist()))


def _inscribed_radius(outline: np.ndarray, centre: np.ndarray) -> float:
    """Distance from ``centre`` to the nearest edge of the closed polygon ``outline``."""
    a, b = outline, np.roll(outline, -1, axis=0)
    ab, ac = b - a, centre - a
    t = np.clip((ac * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-12), 0, 1)
    return float(np.linalg.norm(a + t[:, None] * ab - centre, axis=1).min())


def _holes(outline: np.ndarray, kind: str) -> list[np.ndarray]:
    centre = outline.mean(0)
    r = _inscribed_radius(outline, centre)
    circle = _regular(24)
    if kind == "holed":
        return [centre + 0.55 * r * circle]
    offset = np.array([0.48 * r, 0.0])
    return [centre - offset + 0.38 * r * circle, centre + offset + 0.38 * r * circle]


def _notches(outline: np.ndarray, kind: str) -> list[np.ndarray]:
    """Rectangles cut from the rim at the top vertex (and the bottom one if double)."""
    lo, hi = outline.min(0), outline.max(0)
    extent = float((hi - lo).max())
    half_w, depth = 0.13 * extent, 0.2 * extent
    cuts = []
    rims = [(lo[1], 1.0), (hi[1], -1.0)][: 1 if kind == "notched" else 2]
    for y, sign in rims:  # sign points inwards; x is the middle of the rim's vertices
        x = float(outline[np.abs(outline[:, 1] - y) <= 1e-6 * extent, 0].mean())
        y_in = y + sign * depth
        y_out = y - sign * 0.1 * extent
        cuts.append(_poly(x - half_w, y_out, x + half_w, y_out, x + half_w, y_in, x - half_w, y_in))
    return cuts


@cache
def unit_outline(shape: ShapeClass) -> list[np.ndarray]:
    """``[outer, *cutouts]`` with the outer bbox centred and its longer side 1. Cutouts
    (holes, notches) are subtracted when rasterised; notches reach past the rim."""
    outer = _bases()[shape.family]
    cutouts = _holes(outer, shape.holes) if shape.holes else []
    cutouts += _notches(outer, shape.notches) if shape.notches else []
    stretch = np.array([ASPECTS[shape.aspect], 1.0])
    return _normalised([p * stretch for p in [outer, *cutouts]])
