"""Several training sources as one set (data.train_sources): the rules, documented in the
README's "Several sources" too.

- Vocabulary: classes meet by key (`vocabulary.class_key`: the user's aliases, then VOC's
  spelling -> COCO's). A class is named as the val set names it, so that evaluation matches
  it by name, else as the first source that has it (after aliases). It takes the val set's
  category id, else the first source's, else the next id above every id taken. Labels
  1..K follow category ids.
- Shared images: an image entry's `coco_id` names the image with that id in the COCO source,
  the first source none of whose entries has a `coco_id`; images with the same COCO id are
  one image. The first source (in list order) holding it gives the file and the size.
- Sizes: a later source's copy of another size but the same aspect ratio (within
  ASPECT_TOLERANCE) has its boxes scaled to the merged size and its masks dropped (counted);
  a different aspect ratio is not the same picture: that copy stays a separate image (named).
- Duplicates: an instance of a later source whose box has IoU >= DUPLICATE_IOU with an
  earlier source's instance of the same class in that image is dropped, unless only it has a
  mask: then it replaces that one.
- Val images: a training image is left out when its file is a val image's file, or its
  `coco_id` names a val image: the COCO source's image of that id when it has one (left
  out when its file is a val image's), else a val image whose `coco_id` (else `id`) it is.
- Weights: an image is drawn as often as the highest weight among its sources.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from everyseg.data.index import CocoIndex, ImageMeta
from everyseg.data.merged_table import MergedInstanceTable
from everyseg.data.validate import as_int, read_categories, read_coco_json
from everyseg.data.vocabulary import Vocabulary, merge_vocabulary

DUPLICATE_IOU = 0.5
ASPECT_TOLERANCE = 0.01


@dataclass(frozen=True)
class ValImages:
    """What tells the val set's images apart and names its classes."""

    json_path: Path
    categories: list[tuple[int, str]]
    coco_ids: dict[int, int]  # COCO id (the entry's coco_id, else its id) -> val image id
    files: frozenset[str]  # the images' real paths


def read_val_images(json_path: str | os.PathLike, images_dir: str | os.PathLike) -> ValImages:
    path = Path(json_path)
    data = read_coco_json(path)
    coco_ids, files = {}, set()
    for img in (img for img in data["images"] if isinstance(img, dict)):
        image_id = as_int(img.get("id"))
        coco_id = image_id if img.get("coco_id") is None else as_int(img["coco_id"])
        if coco_id is not None and image_id is not None:
            coco_ids[coco_id] = image_id
        if isinstance(img.get("file_name"), str):
            files.add(os.path.realpath(Path(images_dir) / img["file_name"]))
    categories = read_categories(data["categories"], path)
    return ValImages(path, categories, coco_ids, frozenset(files))


@dataclass
class SourceCounts:
    """What merging did to one source's images and instances (the merged report)."""

    images: int = 0  # usable images this source brought
    val_excluded: list[int] = field(default_factory=list)  # image ids
    shared: int = 0  # images merged into an earlier source's copy
    duplicates: int = 0  # instances dropped as another source's duplicate
    rescaled: int = 0  # instances whose box was scaled to the merged image's size
    masks_dropped: int = 0  # masks of rescaled instances
    kept_apart: list[str] = field(default_factory=list)  # coco_id links refused, and why


@dataclass
class _Image:
    meta: ImageMeta
    source: int
    image_id: int
    number: int  # its place among the merged images, from 0
    weight: float
    spans: list[range] = field(default_factory=list)  # its rows in the merged table


@dataclass(frozen=True)
class _Rows:
    """One source image's instances as merging sees them (from the source's columns)."""

    source: int
    rows: np.ndarray  # (R,) rows of the source's InstanceTable
    labels: np.ndarray  # (R,) merged labels
    boxes: np.ndarray  # (R, 4) xyxy in the merged image's size
    masked: np.ndarray  # (R,) whether each keeps its mask


class MergedIndex:
    """The sources' usable images and instances as one index: what `CocoInstances` reads.

    `sources[i]` is source i's CocoIndex (its own classes and mask classes), `weights[i]` its
    sampling weight; `aliases` maps alias -> canonical class name; `val` the val set's images
    and classes, when there is one.
    """

    def __init__(
        self,
        *,
        sources: list[CocoIndex],
        weights: list[float],
        aliases: dict[str, str],
        val: ValImages | None,
        policy: str,
    ):
        self.sources = sources
        self.policy = policy
        self.decoded_images = all(s.decoded_images for s in sources)
        self.vocabulary: Vocabulary = merge_vocabulary(
            [s.class_names for s in sources],
            [s.label_to_cat_id for s in sources],
            aliases=aliases,
            val_categories=val.categories if val else [],
            source_names=[s.json_path.name for s in sources],
        )
        self.class_names = self.vocabulary.class_names
        self.label_to_cat_id = self.vocabulary.label_to_cat_id
        self.cat_id_to_label = {c: label for label, c in self.label_to_cat_id.items()}
        masked = {
            self.vocabulary.source_labels[i][s.class_names.index(name) + 1]
            for i, s in enumerate(sources)
            for name in s.mask_class_names
        }
        self.mask_class_names = [self.class_names[label - 1] for label in sorted(masked)]
        self.counts = [SourceCounts() for _ in sources]
        self.instances = MergedInstanceTable([s.instances for s in sources])
        merged = self._merge(weights, val)
        self.image_ids = list(range(1, len(merged) + 1))
        self.images = {i: image.meta for i, image in zip(self.image_ids, merged)}
        self.weights = [image.weight for image in merged]
        self._origins = {i: (m.source, m.image_id) for i, m in zip(self.image_ids, merged)}

    def where(self, image_id: int) -> str:
        """The file and id a merged image has in the source that gave its file."""
        source, own_id = self._origins[image_id]
        return f"{self.sources[source].json_path}: image {own_id}"

    def _coco_source(self) -> int | None:
        return next((i for i, s in enumerate(self.sources) if not s.coco_ids), None)

    def _merge(self, weights: list[float], val: ValImages | None) -> list[_Image]:
        coco = self._coco_source()
        merged: dict[tuple, _Image] = {}
        for i, source in enumerate(self.sources):
            label_map = _label_lookup(self.vocabulary.source_labels[i])
            for image_id in source.image_ids:
                meta = source.images[image_id]
                if val and self._is_val(i, image_id, meta, val, coco):
                    self.counts[i].val_excluded.append(image_id)
                    continue
                self.counts[i].images += 1
                coco_id = source.coco_ids.get(image_id, image_id if i == coco else None)
                key = ("coco", coco_id) if coco_id is not None else (i, image_id)
                rows = np.asarray(source.instances.rows(image_id), dtype=np.int64)
                table = source.instances
                new = _Rows(
                    i, rows, label_map[table.labels[rows]], table.boxes[rows], table.has_mask[rows]
                )
                image = _Image(meta, i, image_id, len(merged), weights[i])
                if key not in merged:
                    merged[key] = image
                    self._append(image, new)
                elif (apart := self._join(merged[key], image, new)) is not None:
                    self.counts[i].kept_apart.append(apart)
                    image.number = len(merged)
                    merged[(i, image_id)] = image
                    self._append(image, new)
        self.instances.freeze()
        return list(merged.values())

    def _append(self, image: _Image, new: _Rows) -> None:
        if len(new.rows):
            span = self.instances.append(
                image=image.number,
                source=new.source,
                rows=new.rows,
                labels=new.labels,
                boxes=new.boxes,
                masked=new.masked,
            )
            image.spans.append(span)

    def _is_val(self, i: int, image_id: int, meta: ImageMeta, val: ValImages, coco) -> bool:
        if os.path.realpath(meta.path) in val.files:
            return True
        linked = self.sources[i].coco_ids.get(image_id)
        if linked is None:
            return False
        # the COCO source's own image, when it has one, says what a coco_id names: a val set
        # numbered apart from the training set (as `everyseg synth` writes) then leaves it alone
        coco_image = self.sources[coco].images.get(linked) if coco is not None else None
        if coco_image is not None:
            return os.path.realpath(coco_image.path) in val.files
        return linked in val.coco_ids

    def _join(self, kept: _Image, new: _Image, rows: _Rows) -> str | None:
        """Add `new`'s instances to the image `kept`; why not, if its size rules it out."""
        counts = self.counts[new.source]
        (w, h), (nw, nh) = (kept.meta.width, kept.meta.height), (new.meta.width, new.meta.height)
        if (w, h) != (nw, nh):
            if abs((nw / nh) / (w / h) - 1) > ASPECT_TOLERANCE:
                return (
                    f"image {new.image_id} ({nw}x{nh}) kept apart from "
                    f"{self.where_source(kept)} ({w}x{h}): another aspect ratio"
                )
            counts.rescaled += len(rows.rows)
            counts.masks_dropped += int(rows.masked.sum())
            scale = np.array([w / nw, h / nh, w / nw, h / nh])
            rows = dataclasses.replace(
                rows, boxes=rows.boxes * scale, masked=np.zeros_like(rows.masked)
            )
        counts.shared += 1
        counts.duplicates += self._add_rows(kept, rows)
        kept.weight = max(kept.weight, new.weight)
        return None

    def _add_rows(self, kept: _Image, new: _Rows) -> int:
        """Append `new` to `kept` but for duplicates (see the module docstring); how many."""
        at = [i for span in kept.spans for i in span]
        labels, boxes, masked = self.instances.rows_of(kept.spans)
        if not at or not len(new.rows):
            self._append(kept, new)
            return 0
        iou = box_iou(torch.from_numpy(new.boxes), torch.from_numpy(boxes))  # (R_new, R_kept)
        iou[torch.from_numpy(new.labels[:, None] != labels[None, :])] = -1.0
        best_iou, best = iou.max(dim=1)
        duplicate = (best_iou >= DUPLICATE_IOU).numpy()
        for n in np.flatnonzero(duplicate):
            k = int(best[n])
            if not masked[k] and new.masked[n]:  # only the new one has a mask: it replaces
                self.instances.replace(
                    at[k],
                    source=new.source,
                    row=int(new.rows[n]),
                    label=int(new.labels[n]),
                    box=new.boxes[n],
                    masked=True,
                )
                masked[k] = True
        keep = ~duplicate
        self._append(
            kept,
            dataclasses.replace(
                new,
                rows=new.rows[keep],
                labels=new.labels[keep],
                boxes=new.boxes[keep],
                masked=new.masked[keep],
            ),
        )
        return int(duplicate.sum())

    def where_source(self, image: _Image) -> str:
        return f"{self.sources[image.source].json_path.name} image {image.image_id}"


def _label_lookup(labels: dict[int, int]) -> np.ndarray:
    """A source's label -> merged label as an array indexed by the source's label."""
    lookup = np.zeros(max(labels, default=0) + 1, dtype=np.int64)
    for own, merged in labels.items():
        lookup[own] = merged
    return lookup
