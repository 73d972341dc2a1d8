"""Keypoints in COCO format: one shared keypoint list per model, checked per annotation.

A model predicts a fixed K keypoints for every RoI (Mask R-CNN's pose head: K one-hot m x m
masks). Classes may name different keypoints, so the model's list (`KeypointLayout.names`) is
the union of the keypoint classes' `keypoints` names, in category-id order, first use kept: a
name shared by several classes (e.g. "nose") is one channel; a class's annotations have v=0
for the names it does not list, so those channels never train on it. A val set is read into
the trained model's list by name (names it lacks are left out of the score).

Coordinates are continuous image coordinates, as torchvision's keypoint code reads them
(detectron2 adds 0.5 to COCO's values: half a pixel). `v` is COCO's 0 (not labelled),
1 (labelled, hidden), 2 (visible); every labelled keypoint trains and is scored.

Horizontal flips swap left and right: two names that differ only in one word "left" <->
"right" (words split at "_", "-" or spaces, any case: left_eye / right_eye, top_left /
top_right) trade places (`flip_index`); every other name keeps its channel.
"""

from __future__ import annotations

import math
import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from everyseg.config import ConfigError
from everyseg.data.validate import DataError, as_int, is_number

NO_KEYPOINTS = -1  # keypoint row of an instance without keypoints
_SIDES = {"left": "right", "right": "left"}


@dataclass(frozen=True)
class KeypointLayout:
    """The model's K keypoints: names, skeleton (0-based index pairs, every class's) and the
    classes that have keypoints, in class order, with each one's own keypoints (indices into
    `names`) and skeleton."""

    names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...]
    classes: tuple[str, ...]
    class_keypoints: tuple[tuple[int, ...], ...] = ()
    class_skeletons: tuple[tuple[tuple[int, int], ...], ...] = ()

    def of_class(self, name: str) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
        """A class's keypoint indices and skeleton; none for a class without keypoints."""
        if name not in self.classes:
            return (), ()
        at = self.classes.index(name)
        return self.class_keypoints[at], self.class_skeletons[at]

    def flip_index(self) -> list[int]:
        """(K,) the channel each keypoint moves to when the image is mirrored left-right."""
        at = {name: k for k, name in enumerate(self.names)}
        return [at.get(mirrored_name(name), k) for k, name in enumerate(self.names)]

    def to_plain(self) -> dict:
        return {
            "names": list(self.names),
            "skeleton": [list(pair) for pair in self.skeleton],
            "classes": list(self.classes),
            "class_keypoints": [list(k) for k in self.class_keypoints],
            "class_skeletons": [[list(p) for p in s] for s in self.class_skeletons],
        }

    @classmethod
    def from_plain(cls, plain: dict) -> KeypointLayout:
        return cls(
            names=tuple(plain["names"]),
            skeleton=tuple((int(a), int(b)) for a, b in plain["skeleton"]),
            classes=tuple(plain["classes"]),
            class_keypoints=tuple(tuple(k) for k in plain["class_keypoints"]),
            class_skeletons=tuple(
                tuple((int(a), int(b)) for a, b in s) for s in plain["class_skeletons"]
            ),
        )


def mirrored_name(name: str) -> str:
    """`name` with its one left/right word swapped (case kept); `name` itself without one."""
    words = re.split(r"([_\-\s]+)", name)
    sides = [i for i, word in enumerate(words) if word.lower() in _SIDES]
    if len(sides) != 1:
        return name
    word = words[sides[0]]
    swapped = _SIDES[word.lower()]
    words[sides[0]] = (
        swapped.upper() if word.isupper() else swapped.title() if word.istitle() else swapped
    )
    return "".join(words)


def category_keypoints(category: dict, source) -> tuple[list[str], list[tuple[int, int]]]:
    """A category's keypoint names and 0-based skeleton pairs; DataError naming its id if
    they are malformed. A category without `keypoints` has none."""
    names, skeleton = category.get("keypoints") or [], category.get("skeleton") or []
    where = f"{source}: category {category.get('id')!r}"
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise DataError(
            f"{where}: 'keypoints' must be a list of non-empty names, got {names!r:.80}"
        )
    if len(set(names)) != len(names):
        raise DataError(f"{where}: duplicate keypoint names in {names}")
    pairs = []
    for pair in skeleton if isinstance(skeleton, list) else [skeleton]:
        ends = [as_int(v) for v in pair] if isinstance(pair, list) and len(pair) == 2 else []
        numbers = [e for e in ends if e is not None and 1 <= e <= len(names)]
        if len(numbers) != 2:
            raise DataError(
                f"{where}: skeleton entry {pair!r} is not a pair of keypoint numbers "
                f"1..{len(names)} (COCO numbers them from 1)"
            )
        pairs.append((numbers[0] - 1, numbers[1] - 1))
    return names, pairs


def resolve_keypoint_classes(spec, keypointed: Sequence[str], class_names: Sequence[str]):
    """data.keypoint_classes -> class names in class order: "all" (every class whose category
    lists keypoints), "none", a comma-separated string or a list of names."""
    if isinstance(spec, str) and spec.strip().lower() in ("all", "none"):
        return list(keypointed) if spec.strip().lower() == "all" else []
    wanted = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    bad = [w for w in wanted if w not in keypointed]
    if bad:
        unknown = [w for w in bad if w not in class_names]
        why = "unknown class name(s)" if unknown else "class(es) whose category lists no keypoints"
        raise ConfigError(
            f"data.keypoint_classes: {why} {bad}; classes with keypoints: {list(keypointed)}"
        )
    return [n for n in class_names if n in set(wanted)]


def build_layout(categories: list, *, class_names, spec, source) -> KeypointLayout:
    """The shared keypoint list over the keypoint classes `spec` selects (see module doc)."""
    by_name = {c.get("name"): c for c in categories if isinstance(c, dict)}
    listed = {name: category_keypoints(by_name[name], source) for name in class_names}
    keypointed = [name for name in class_names if listed[name][0]]
    classes = resolve_keypoint_classes(spec, keypointed, class_names)
    names: list[str] = []
    skeleton: list[tuple[int, int]] = []
    own_keypoints, own_skeletons = [], []
    for cls in classes:
        local, pairs = listed[cls]
        names += [n for n in local if n not in names]
        own = [(names.index(local[a]), names.index(local[b])) for a, b in pairs]
        skeleton += [p for p in own if p not in skeleton and p[::-1] not in skeleton]
        own_keypoints.append(tuple(names.index(n) for n in local))
        own_skeletons.append(tuple(own))
    return KeypointLayout(
        tuple(names), tuple(skeleton), tuple(classes), tuple(own_keypoints), tuple(own_skeletons)
    )


def class_keypoint_names(
    categories: list, layout: KeypointLayout | None, *, class_names: Sequence[str], source
) -> dict[int, list[str]]:
    """Label (1..C) -> its category's keypoint names, for the layout's classes in this file."""
    if layout is None:
        return {}
    named = {c.get("name"): c for c in categories if isinstance(c, dict)}
    return {
        class_names.index(name) + 1: category_keypoints(named[name], source)[0]
        for name in layout.classes
        if name in class_names
    }


def keypoint_ground_truth(gt: dict, table: KeypointTable, layout: KeypointLayout, *, cat_ids):
    """A COCO ground-truth dict with the keypoint classes' (`cat_ids`) annotations given
    `keypoints` in the layout (from `table`) and `num_keypoints` (0: none, which COCOeval
    ignores), and their categories the layout's names and skeleton. Changes `gt`."""
    for ann in gt["annotations"]:
        if ann["category_id"] in cat_ids:
            values = table.of_annotation(ann["id"])
            labelled = 0 if values is None else int((values[:, 2] > 0).sum())
            zeros = [0.0] * 3 * len(layout.names)
            ann["keypoints"] = zeros if values is None else values.ravel().tolist()
            ann["num_keypoints"] = labelled
    for cat in gt["categories"]:
        if cat["id"] in cat_ids:
            cat["keypoints"] = list(layout.names)
            cat["skeleton"] = [[a + 1, b + 1] for a, b in layout.skeleton]
    return gt


def read_keypoints(
    ann: dict, *, local: Sequence[str], layout: KeypointLayout, width: int, height: int
) -> tuple[np.ndarray | None, str | None]:
    """One annotation's keypoints in the layout: ((K, 3) float32 [x, y, v], None), (None,
    None) when it has none (no `keypoints`, or none labelled), or (None, why) when they are
    malformed. `local` are its category's keypoint names."""
    raw = ann.get("keypoints")
    if raw is None or ann.get("num_keypoints") == 0:
        return None, None
    if not isinstance(raw, list) or len(raw) != 3 * len(local) or not local:
        return None, (
            f"keypoints must be [x, y, v] * {len(local)} (its category's names), "
            f"got {len(raw) if isinstance(raw, list) else type(raw).__name__} values"
        )
    if not all(is_number(v) and math.isfinite(v) for v in raw):
        return None, "keypoints hold a value that is not a finite number"
    triples = np.asarray(raw, dtype=np.float64).reshape(-1, 3)
    if not np.isin(triples[:, 2], (0, 1, 2)).all():
        return None, f"visibility not 0, 1 or 2: {sorted(set(triples[:, 2].tolist()))}"
    labelled = triples[:, 2] > 0
    count = ann.get("num_keypoints")
    if count is not None and count != int(labelled.sum()):
        return None, f"num_keypoints {count!r} but {int(labelled.sum())} keypoints have v > 0"
    xs, ys = triples[labelled, 0], triples[labelled, 1]
    if ((xs < 0) | (xs > width) | (ys < 0) | (ys > height)).any():
        return None, f"a labelled keypoint lies outside the {width}x{height} image"
    if not labelled.any():
        return None, None
    out = np.zeros((len(layout.names), 3), dtype=np.float32)
    at = {name: k for k, name in enumerate(layout.names)}
    for name, triple in zip(local, triples):
        if name in at and triple[2] > 0:
            out[at[name]] = triple
    return (out, None) if (out[:, 2] > 0).any() else (None, None)


class KeypointTable:
    """Rows of (K, 3) keypoints by annotation id: appended while a file is read, then frozen
    into read-only arrays (DataLoader workers share them, as data.columns explains)."""

    def __init__(self, num_keypoints: int) -> None:
        self.num_keypoints = num_keypoints
        self._new_ids, self._new_values = array("q"), array("d")
        self._ids = np.zeros(0, np.int64)
        self._values = np.zeros((0, num_keypoints, 3), np.float64)
        self._order = np.zeros(0, np.int64)

    def append(self, ann_id: int, keypoints: np.ndarray) -> int:
        self._new_ids.append(ann_id)
        self._new_values.extend(keypoints.ravel().tolist())
        return len(self._new_ids) - 1

    def freeze(self) -> None:
        self._ids = np.asarray(self._new_ids, dtype=np.int64)
        self._values = np.asarray(self._new_values, dtype=np.float64)
        self._values = self._values.reshape(len(self._ids), self.num_keypoints, 3)
        self._order = np.argsort(self._ids, kind="stable")
        for column in (self._ids, self._values, self._order):
            column.flags.writeable = False
        self._new_ids, self._new_values = array("q"), array("d")

    def get(self, row: int) -> np.ndarray:
        """(K, 3) the row's keypoints (read-only)."""
        return self._values[row]

    def of_annotation(self, ann_id: int) -> np.ndarray | None:
        at = int(np.searchsorted(self._ids, ann_id, sorter=self._order))
        if at == len(self._ids) or self._ids[self._order[at]] != ann_id:
            return None
        return self._values[self._order[at]]


def keypoint_target(rows: Sequence[np.ndarray | None], num_keypoints: int) -> tuple[Tensor, Tensor]:
    """Per instance (K, 3) keypoints or None -> (N, K, 3) float32 (zeros for None) and (N,)
    bool has_keypoints."""
    out = torch.zeros(len(rows), num_keypoints, 3)
    for i, row in enumerate(rows):
        if row is not None:
            out[i] = torch.from_numpy(np.array(row))
    return out, torch.tensor([row is not None for row in rows], dtype=torch.bool)


def hflip_keypoints(keypoints: Tensor, *, width: int, flip_index: Sequence[int]) -> Tensor:
    """(N, K, 3) keypoints mirrored in an image `width` px wide: x -> width - x (continuous
    coordinates, as boxes flip), left and right channels swapped; v=0 rows stay all zero."""
    out = keypoints[:, list(flip_index)].clone()
    out[..., 0] = torch.where(out[..., 2] > 0, width - out[..., 0], out[..., 0])
    return out
