"""Which classes keep their masks: the `data.mask_classes` setting.

Partial supervision is data: every class has boxes, and only the classes resolved here keep
their masks at load time (see `CocoInstances`). The spec forms are documented on
`resolve_mask_classes`.
"""

from __future__ import annotations

import difflib
import os
import random
from collections.abc import Sequence
from pathlib import Path

from everyseg.config import ConfigError
from everyseg.data.vocabulary import VOC_TO_COCO, coco_spelling

# The 20 PASCAL VOC classes, spelled as their COCO category names, for the VOC / non-VOC
# benchmark of Mask^X R-CNN and Deep-MAC.
VOC_CLASSES: tuple[str, ...] = (
    "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorcycle", "person", "potted plant", "sheep", "couch",
    "train", "tv",
)  # fmt: skip


def resolve_mask_classes(
    spec: str | os.PathLike | Sequence[str] | None, class_names: Sequence[str]
) -> list[str]:
    """Resolve a mask-class spec to class names, returned in `class_names` order.

    `spec` is one of:
      - `None` or `"all"`: every class has masks (fully supervised);
      - `"none"`: no masks at all (box-only training);
      - `"voc"` / `"nonvoc"`: the VOC classes present in `class_names`, or their complement,
        in COCO's spelling or VOC's (`voc_spelling_note` says which names matched);
      - `"random:K:SEED"`: K classes drawn with `random.Random(SEED)` (same on every run);
      - a path to a text file with one name per line (blank lines and `#` comments ignored);
      - a comma-separated string of names, or a list/tuple of names.
    Raises ConfigError (a ValueError) naming `data.mask_classes` for unknown names or
    malformed specs, FileNotFoundError for a `.txt` path that does not exist.
    """
    names = list(class_names)
    if spec is None:
        return names
    if isinstance(spec, os.PathLike):
        return _select(_read_names_file(Path(spec)), names)
    if not isinstance(spec, str):
        return _select(list(spec), names)

    keyword = spec.strip().lower()
    if keyword == "all":
        return names
    if keyword == "none":
        return []
    if keyword in ("voc", "nonvoc"):
        return _voc_split(keyword, names)
    if keyword.startswith("random:"):
        return _random_split(spec.strip(), names)
    if os.path.isfile(spec):
        return _select(_read_names_file(Path(spec)), names)
    if spec.strip().endswith(".txt"):
        # Without this, a mistyped file name would be read as a single class name.
        raise FileNotFoundError(f"data.mask_classes file not found: {spec}")
    wanted = [part.strip() for part in spec.split(",") if part.strip()]
    if not wanted:
        raise ConfigError("data.mask_classes is empty; use 'none' for box-only training")
    return _select(wanted, names)


def _select(wanted: Sequence[str], names: list[str]) -> list[str]:
    """Check every wanted name exists and return them in class order (duplicates merged)."""
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise ConfigError(_unknown_message(unknown, names))
    keep = set(wanted)
    return [n for n in names if n in keep]


def _unknown_message(unknown: list[str], names: list[str]) -> str:
    hints = []
    for bad in unknown:
        close = difflib.get_close_matches(bad, names, n=1)
        hints.append(f"{bad!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} classes)" if len(names) > 12 else "")
    return f"data.mask_classes: unknown class name(s) {', '.join(hints)}; valid names: {shown}"


def _read_names_file(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]


def _voc_split(keyword: str, names: list[str]) -> list[str]:
    voc = set(VOC_CLASSES)
    if not any(coco_spelling(n) in voc for n in names):
        raise ConfigError(
            f"data.mask_classes={keyword!r}: none of the 20 VOC classes (in COCO's spelling, "
            f"e.g. 'person', 'airplane', or VOC's, e.g. 'aeroplane') is among the dataset's "
            f"{len(names)} classes"
        )
    return [n for n in names if (coco_spelling(n) in voc) == (keyword == "voc")]


def voc_spelling_note(spec, class_names: Sequence[str]) -> str | None:
    """For a `voc` / `nonvoc` spec: which class names matched a VOC class in VOC's spelling
    (None when every name is spelled COCO's way, or the spec is another)."""
    if not isinstance(spec, str) or spec.strip().lower() not in ("voc", "nonvoc"):
        return None
    matched = [f"{n!r} as {VOC_TO_COCO[n]!r}" for n in class_names if n in VOC_TO_COCO]
    if not matched:
        return None
    return f"data.mask_classes={spec.strip()}: VOC spellings matched: {', '.join(matched)}"


def _random_split(spec: str, names: list[str]) -> list[str]:
    parts = spec.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        k, seed = int(parts[1]), int(parts[2])
    except ValueError:
        raise ConfigError(
            f"data.mask_classes={spec!r}: expected 'random:K:SEED' with integers K and SEED, "
            "e.g. 'random:20:0'"
        ) from None
    if not 1 <= k <= len(names):
        raise ConfigError(f"data.mask_classes={spec!r}: K must be in 1..{len(names)}, got {k}")
    # random.Random with an int seed does not depend on PYTHONHASHSEED, and sampling from the
    # list in class order makes the draw depend only on (class list, K, SEED).
    chosen = set(random.Random(seed).sample(names, k))
    return [n for n in names if n in chosen]
