"""A JSON file's kept annotations as columns: a few numpy arrays instead of Python objects.

A COCO file's annotations as Python objects (dicts, lists of floats, one object per number)
take ~8x the file's size, and each DataLoader worker copies the pages of every object it
touches: reading one raises its refcount, and the garbage collector writes to every tracked
object it visits. Numpy arrays hold their numbers in buffers that nothing writes to, so
forked workers share them. Rows are appended while the file is read, then frozen:
`SegmColumns` holds the segmentations (`compact_masks.Segm`), `InstanceTable` the training
instances, grouped by image, `GroundTruthTable` what evaluation scores.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from everyseg.data.compact_masks import Segm, to_coco

NO_SEGM = -1  # segmentation index of a box-only row


@dataclass(frozen=True, slots=True)
class Instance:
    ann_id: int
    label: int
    box: tuple[float, float, float, float]  # xyxy, clipped to the image
    segm: Segm | None  # compact polygons or RLE (data.compact_masks); None: box-only
    keypoints: np.ndarray | None = None  # (K, 3) x, y, v (data.keypoints); None: none


def frozen_array(values, dtype) -> np.ndarray:
    """`values` as a read-only numpy array; an array.array's buffer is taken over, not copied
    (no second copy at the peak; it is never resized again)."""
    if isinstance(values, array):
        out = np.frombuffer(values, dtype=dtype) if len(values) else np.zeros(0, dtype)
    else:
        out = np.asarray(values, dtype=dtype)
    out.flags.writeable = False
    return out


def grouped_by_image(new: dict[str, array], dtypes: Mapping[str, type]) -> dict[str, np.ndarray]:
    """Rows built in `new` (an "image_ids" builder, "boxes" 4 numbers a row) as read-only
    columns grouped by image id, row order kept within an image; with (I,) "ids" sorted, each
    one's "first" row in the input, "starts" and "counts" of its rows in the columns."""
    image_ids = frozen_array(new.pop("image_ids"), np.int64)
    order = np.argsort(image_ids, kind="stable")
    c = {k: frozen_array(v, dtypes[k]) for k, v in new.items()}
    c["boxes"] = c["boxes"].reshape(-1, 4)
    c = {k: frozen_array(v[order], v.dtype) for k, v in c.items()}
    ids, first, counts = np.unique(image_ids, return_index=True, return_counts=True)
    c |= {"ids": ids, "first": first, "counts": counts}
    c["starts"] = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return c


def array_builders(**typecodes: str) -> dict[str, array]:
    return {name: array(code) for name, code in typecodes.items()}


class SegmColumns:
    """Segmentations in flat arrays: every polygon's coordinates in one float64 array, every
    RLE's counts in one bytes object. `append` gives each its index; `get` gives it back."""

    def __init__(self) -> None:
        # coords: x0, y0, x1, y1, ... of every polygon, one after another; polygon_ends: where
        # polygon j ends in coords; segmentation i is polygons [starts[i], ends[i]), or the
        # bytes [starts[i], ends[i]) of rle if is_rle[i]
        self._new = array_builders(coords="d", polygon_ends="q", starts="q", ends="q", is_rle="b")
        self._new_rle = bytearray()
        self._columns: dict[str, np.ndarray] = {}
        self._rle = b""

    def append(self, segm: Segm) -> int:
        new = self._new
        if isinstance(segm, bytes):
            new["starts"].append(len(self._new_rle))
            self._new_rle += segm
            new["ends"].append(len(self._new_rle))
        else:
            new["starts"].append(len(new["polygon_ends"]))
            for polygon in segm:
                new["coords"].extend(polygon)
                new["polygon_ends"].append(len(new["coords"]))
            new["ends"].append(len(new["polygon_ends"]))
        new["is_rle"].append(isinstance(segm, bytes))
        return len(new["ends"]) - 1

    def freeze(self) -> None:
        """No more appends: the rows become read-only numpy arrays (and bytes)."""
        dtypes = {"coords": np.float64, "is_rle": np.bool_}
        self._columns = {k: frozen_array(v, dtypes.get(k, np.int64)) for k, v in self._new.items()}
        ends = self._columns["polygon_ends"]
        self._columns["polygon_starts"] = frozen_array(np.concatenate([[0], ends[:-1]]), np.int64)
        self._rle, self._new_rle, self._new = bytes(self._new_rle), bytearray(), {}

    def get(self, index: int) -> Segm:
        """Polygons as read-only views of the coordinates, or an RLE's counts as bytes."""
        c = self._columns
        start, end = int(c["starts"][index]), int(c["ends"][index])
        if c["is_rle"][index]:
            return self._rle[start:end]
        bounds = zip(c["polygon_starts"][start:end], c["polygon_ends"][start:end])
        return tuple(c["coords"][int(a) : int(b)] for a, b in bounds)


class InstanceTable(Mapping[int, list[Instance]]):
    """image id -> its kept instances, in file order; only images that have some are keys.

    Rows are added with `add`, then `freeze` groups them by image. An `Instance` is built
    when its image is looked up, so a worker's lookups write to no shared object. With
    `keypoints` (a data.keypoints.KeypointTable), instances carry their keypoint rows.
    """

    def __init__(self, segms: SegmColumns, keypoints=None) -> None:
        self._segms = segms
        self._keypoints = keypoints
        self._new = array_builders(
            image_ids="q", ann_ids="q", labels="q", boxes="d", segms="q", keypoints="q"
        )
        self._c: dict[str, np.ndarray] = {}

    def add(
        self, *, image_id: int, ann_id: int, label: int, box, segm: int, keypoints: int = -1
    ) -> None:
        """One instance; `box` xyxy, `segm` its index in the SegmColumns (NO_SEGM: none),
        `keypoints` its row in the KeypointTable (-1: none)."""
        new = self._new
        new["image_ids"].append(image_id)
        new["ann_ids"].append(ann_id)
        new["labels"].append(label)
        new["boxes"].extend(box)
        new["segms"].append(segm)
        new["keypoints"].append(keypoints)

    def freeze(self) -> None:
        dtypes = {k: np.float64 if k == "boxes" else np.int64 for k in self._new}
        c = grouped_by_image(self._new, dtypes)
        c["appearance"] = c["ids"][np.argsort(c.pop("first"), kind="stable")]  # iteration order
        self._c, self._new = c, {}

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 every instance's label."""
        return self._c["labels"]

    @property
    def has_mask(self) -> np.ndarray:
        """(N,) bool whether each instance has a segmentation."""
        return self._c["segms"] != NO_SEGM

    @property
    def boxes(self) -> np.ndarray:
        """(N, 4) float64 every instance's xyxy box."""
        return self._c["boxes"]

    def rows(self, image_id: int) -> range:
        """The rows of an image's instances (empty when it has none)."""
        ids = self._c["ids"]
        at = int(np.searchsorted(ids, image_id))
        if at == len(ids) or ids[at] != image_id:
            return range(0)
        start = int(self._c["starts"][at])
        return range(start, start + int(self._c["counts"][at]))

    def __getitem__(self, image_id: int) -> list[Instance]:
        rows = self.rows(image_id)
        if not rows:
            raise KeyError(image_id)
        return [self.row(row) for row in rows]

    def row(self, row: int) -> Instance:
        """The instance in row `row`."""
        x0, y0, x1, y1 = (float(v) for v in self._c["boxes"][row])
        segm, keypoints = int(self._c["segms"][row]), int(self._c["keypoints"][row])
        return Instance(
            int(self._c["ann_ids"][row]),
            int(self._c["labels"][row]),
            (x0, y0, x1, y1),
            None if segm == NO_SEGM else self._segms.get(segm),
            None if keypoints < 0 or self._keypoints is None else self._keypoints.get(keypoints),
        )

    def __iter__(self) -> Iterator[int]:
        return (int(image_id) for image_id in self._c["appearance"])

    def __len__(self) -> int:
        return len(self._c["ids"])


class GroundTruthTable:
    """Every kept annotation (crowd ones too) as evaluation reads it: COCO's own box and area
    (not the clipped box, so AP stays comparable with COCO's tools), in file order."""

    def __init__(self, segms: SegmColumns) -> None:
        self._segms = segms
        # ints: id, image_id, category_id, iscrowd, segmentation index; floats: x, y, w, h, area
        self._new = array_builders(ints="q", floats="d")
        self._ints = np.zeros((0, 5), dtype=np.int64)
        self._floats = np.zeros((0, 5), dtype=np.float64)

    def add(self, *, ann_id, image_id, category_id, bbox, area, crowd, segm: int) -> None:
        self._new["ints"].extend((ann_id, image_id, category_id, crowd, segm))
        self._new["floats"].extend((*bbox, area))

    def freeze(self) -> None:
        self._ints = frozen_array(self._new["ints"], np.int64).reshape(-1, 5)
        self._floats = frozen_array(self._new["floats"], np.float64).reshape(-1, 5)
        self._new = {}

    def annotations(self, sizes: Mapping[int, tuple[int, int]]) -> list[dict]:
        """COCO annotation dicts; `sizes` maps image id -> (height, width) for the masks."""
        annotations = []
        for ints, floats in zip(self._ints.tolist(), self._floats.tolist()):
            ann_id, image_id, category_id, crowd, segm = ints
            x, y, w, h, area = floats
            entry = {
                "id": ann_id,
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [x, y, w, h],
                "area": area,
                "iscrowd": crowd,
            }
            if segm != NO_SEGM:
                height, width = sizes[image_id]
                entry["segmentation"] = to_coco(self._segms.get(segm), height=height, width=width)
            annotations.append(entry)
        return annotations
