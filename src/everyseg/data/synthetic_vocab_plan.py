"""Which classes go into which image of the large-vocabulary stand-in (`synthetic_vg`).

Every class gets at least `MIN_VG_BOXES` VG boxes and `VAL_PER_CLASS` val instances; VG
frequency follows Zipf's law over a seeded class ranking, and the mask classes are taken among
the frequent ones, as COCO's 80 are among VG's most frequent names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_VG_BOXES = 4  # per class, before the long tail adds more
VAL_PER_CLASS = 2
VG_PER_MIN_BOX = 2.0  # default VG size: this many times the boxes the minimum needs
CELL_PX = 42  # grid cell side: 3 x 3 objects at most at 128 px
PLAN_STREAM = 0  # the image streams of synthetic_vg are 1, 2, 3


@dataclass(frozen=True)
class Plan:
    """What every image holds: class indices into the vocabulary, per image, in cell order."""

    vg: list[list[int]]
    coco_only: list[list[int]]
    val: list[list[int]]
    mask_classes: list[int]
    shared: dict[int, int]  # VG image id -> COCO image id


def default_counts(vocab: int, size: int) -> dict[str, int]:
    """Image counts that give every class `MIN_VG_BOXES` boxes (twice over with the tail)."""
    mean = _mean_slots(grid_side(size))
    num_mask = default_mask_classes(vocab)
    return {
        "num_vg": math.ceil(VG_PER_MIN_BOX * vocab * MIN_VG_BOXES / mean),
        "num_coco": max(20, math.ceil(60 * num_mask / mean)),
        "num_val": math.ceil(VAL_PER_CLASS * vocab / mean),
    }


def default_mask_classes(vocab: int) -> int:
    return min(vocab, max(2, round(vocab / 40)))


def grid_side(size: int) -> int:
    return max(2, size // CELL_PX)


def _slot_range(grid: int) -> tuple[int, int]:
    return math.ceil(grid * grid / 2), grid * grid


def _mean_slots(grid: int) -> float:
    return sum(_slot_range(grid)) / 2


def _slots(rng: np.random.Generator, num: int, grid: int) -> list[int]:
    low, high = _slot_range(grid)
    return rng.integers(low, high + 1, num).tolist()


def _zipf_counts(total: int, vocab: int) -> np.ndarray:
    """(vocab,) boxes per frequency rank: `MIN_VG_BOXES` each plus a Zipf share of the rest."""
    weights = 1.0 / np.arange(1, vocab + 1)
    extra = total - vocab * MIN_VG_BOXES
    counts = MIN_VG_BOXES + np.floor(extra * weights / weights.sum()).astype(np.int64)
    counts[: total - int(counts.sum())] += 1  # the rounding remainder goes to the head
    return counts


def _split(labels: list[int], sizes: list[int]) -> list[list[int]]:
    ends = np.cumsum(sizes).tolist()
    return [labels[end - n : end] for n, end in zip(sizes, ends, strict=True)]


def make_plan(
    *, vocab: int, num_vg: int, num_coco: int, num_val: int, num_mask: int, grid: int, seed: int
) -> Plan:
    rng = np.random.default_rng([seed, PLAN_STREAM])
    ranking = rng.permutation(vocab)  # frequency rank -> class
    frequent = ranking[: 2 * num_mask : 2] if 2 * num_mask <= vocab else ranking[:num_mask]
    mask_classes = sorted(frequent.tolist())
    num_shared = min(num_coco // 2, num_vg)
    shared_vg = sorted((rng.choice(num_vg, num_shared, replace=False) + 1).tolist())
    shared_coco = (rng.permutation(num_coco)[:num_shared] + 1).tolist()
    shared = dict(zip(shared_vg, shared_coco, strict=True))

    sizes = _slots(rng, num_vg, grid)
    reserved = [max(1, n // 3) if i + 1 in shared else 0 for i, n in enumerate(sizes)]
    queue_sizes = [n - r for n, r in zip(sizes, reserved, strict=True)]
    total = sum(queue_sizes)
    if total < vocab * MIN_VG_BOXES:
        need = math.ceil(vocab * MIN_VG_BOXES / _mean_slots(grid))
        raise ValueError(
            f"{num_vg} VG images hold about {total} boxes; {vocab} classes need "
            f"{vocab * MIN_VG_BOXES} ({MIN_VG_BOXES} each): use --train {need} or more"
        )
    queue = np.repeat(ranking, _zipf_counts(total, vocab))
    queue = rng.permutation(queue).tolist()
    vg = [
        rng.choice(mask_classes, r).tolist() + labels
        for r, labels in zip(reserved, _split(queue, queue_sizes), strict=True)
    ]
    coco_only = [
        rng.choice(mask_classes, n).tolist() for n in _slots(rng, num_coco - num_shared, grid)
    ]
    val_sizes = _slots(rng, num_val, grid)
    rounds = math.ceil(sum(val_sizes) / vocab)
    cycle = np.concatenate([rng.permutation(vocab) for _ in range(rounds)]).tolist()
    val = _split(cycle[: sum(val_sizes)], val_sizes)
    return Plan(vg=vg, coco_only=coco_only, val=val, mask_classes=mask_classes, shared=shared)
