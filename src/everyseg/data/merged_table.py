"""Several sources' instances as one table whose rows point into each source's columns.

VG alone has millions of boxes: as `Instance` objects per merged image they would take GBs,
and each DataLoader worker would copy the pages it touches. A merged row keeps only what
merging decides (its merged image, label and box, and whether its mask is kept) plus where
it comes from; ann ids and segmentations stay in the source's `InstanceTable`. `Instance`s
are built when an image is looked up, as `InstanceTable` does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from everyseg.data.columns import (
    Instance,
    InstanceTable,
    array_builders,
    frozen_array,
    grouped_by_image,
)


class MergedInstanceTable(Mapping[int, list[Instance]]):
    """merged image id (1-based image number) -> its instances; only images with some are keys.

    While merging: `append` adds one source image's rows to a merged image (its number, 0-based),
    `rows_of` reads rows back, `replace` swaps a row for another source's. `freeze` then groups
    the rows by image.
    """

    def __init__(self, sources: Sequence[InstanceTable]) -> None:
        self._sources = sources
        self._new = array_builders(
            image_ids="q", sources="q", rows="q", labels="q", boxes="d", masked="b"
        )
        self._c: dict[str, np.ndarray] = {}

    def append(
        self, *, image: int, source: int, rows: np.ndarray, labels: np.ndarray, boxes, masked
    ) -> range:
        """Rows `rows` of source `source` into merged image `image`: (R,) labels, (R, 4) xyxy
        boxes, (R,) whether each keeps its mask. Returns where they went."""
        start = len(self._new["rows"])
        new = self._new
        new["image_ids"].extend([image] * len(rows))
        new["sources"].extend([source] * len(rows))
        new["rows"].extend(int(r) for r in rows)
        new["labels"].extend(int(label) for label in labels)
        new["boxes"].extend(float(v) for v in np.asarray(boxes, dtype=np.float64).reshape(-1))
        new["masked"].extend(bool(m) for m in masked)
        return range(start, len(self._new["rows"]))

    def rows_of(self, spans: Sequence[range]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N,) labels, (N, 4) boxes, (N,) masked of the rows in `spans`, in order."""
        at = [i for span in spans for i in span]
        labels = np.array([self._new["labels"][i] for i in at], dtype=np.int64)
        boxes = np.array([self._new["boxes"][4 * i : 4 * i + 4] for i in at], dtype=np.float64)
        masked = np.array([self._new["masked"][i] for i in at], dtype=bool)
        return labels, boxes.reshape(-1, 4), masked

    def replace(self, at: int, *, source: int, row: int, label: int, box, masked: bool) -> None:
        """Row `at` becomes row `row` of source `source` (same merged image)."""
        new = self._new
        new["sources"][at], new["rows"][at], new["labels"][at] = source, row, label
        new["boxes"][4 * at : 4 * at + 4] = type(new["boxes"])("d", (float(v) for v in box))
        new["masked"][at] = masked

    def freeze(self) -> None:
        dtypes = {k: np.int64 for k in self._new} | {"boxes": np.float64, "masked": np.bool_}
        c = grouped_by_image(self._new, dtypes)
        c["ids"] = frozen_array(c["ids"] + 1, np.int64)  # image numbers from 1: merged ids
        self._c, self._new = c, {}

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 every instance's merged label."""
        return self._c["labels"]

    @property
    def has_mask(self) -> np.ndarray:
        """(N,) bool whether each instance has a segmentation."""
        return self._c["masked"]

    def __getitem__(self, image_id: int) -> list[Instance]:
        ids = self._c["ids"]
        at = int(np.searchsorted(ids, image_id))
        if at == len(ids) or ids[at] != image_id:
            raise KeyError(image_id)
        start = int(self._c["starts"][at])
        return [self._instance(row) for row in range(start, start + int(self._c["counts"][at]))]

    def _instance(self, row: int) -> Instance:
        c = self._c
        own = self._sources[int(c["sources"][row])].row(int(c["rows"][row]))
        x0, y0, x1, y1 = (float(v) for v in c["boxes"][row])
        segm = own.segm if c["masked"][row] else None
        return Instance(own.ann_id, int(c["labels"][row]), (x0, y0, x1, y1), segm)

    def __iter__(self) -> Iterator[int]:
        return (int(image_id) for image_id in self._c["ids"])

    def __len__(self) -> int:
        return len(self._c["ids"])
