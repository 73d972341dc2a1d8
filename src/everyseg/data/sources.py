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

import torch
from torchvision.ops import box_iou

from everyseg.data.columns import Instance
from everyseg.data.index import CocoIndex, ImageMeta
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
    instances: list[Instance]
    weight: float


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
        merged = self._merge(weights, val)
        self.image_ids = list(range(1, len(merged) + 1))
        self.images = {i: image.meta for i, image in zip(self.image_ids, merged)}
        self.instances = {i: image.instances for i, image in zip(self.image_ids, merged)}
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
            for image_id in source.image_ids:
                meta = source.images[image_id]
                if val and self._is_val(i, image_id, meta, val, coco):
                    self.counts[i].val_excluded.append(image_id)
                    continue
                self.counts[i].images += 1
                coco_id = source.coco_ids.get(image_id, image_id if i == coco else None)
                key = ("coco", coco_id) if coco_id is not None else (i, image_id)
                labels = self.vocabulary.source_labels[i]
                instances = [
                    dataclasses.replace(inst, label=labels[inst.label])
                    for inst in source.instances.get(image_id, [])
                ]
                image = _Image(meta, i, image_id, instances, weights[i])
                if key not in merged:
                    merged[key] = image
                elif (apart := self._join(merged[key], image)) is not None:
                    self.counts[i].kept_apart.append(apart)
                    merged[(i, image_id)] = image
        return list(merged.values())

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

    def _join(self, kept: _Image, new: _Image) -> str | None:
        """Add `new`'s instances to the image `kept`; why not, if its size rules it out."""
        counts = self.counts[new.source]
        (w, h), (nw, nh) = (kept.meta.width, kept.meta.height), (new.meta.width, new.meta.height)
        if (w, h) != (nw, nh):
            if abs((nw / nh) / (w / h) - 1) > ASPECT_TOLERANCE:
                return (
                    f"image {new.image_id} ({nw}x{nh}) kept apart from "
                    f"{self.where_source(kept)} ({w}x{h}): another aspect ratio"
                )
            counts.rescaled += len(new.instances)
            counts.masks_dropped += sum(inst.segm is not None for inst in new.instances)
            new.instances = [_scaled(inst, w / nw, h / nh) for inst in new.instances]
        counts.shared += 1
        counts.duplicates += _add_instances(kept.instances, new.instances)
        kept.weight = max(kept.weight, new.weight)
        return None

    def where_source(self, image: _Image) -> str:
        return f"{self.sources[image.source].json_path.name} image {image.image_id}"


def _scaled(inst: Instance, sx: float, sy: float) -> Instance:
    x0, y0, x1, y1 = inst.box
    return dataclasses.replace(inst, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy), segm=None)


def _add_instances(kept: list[Instance], new: list[Instance]) -> int:
    """Append `new` to `kept` but for duplicates (see the module docstring); how many."""
    if not kept or not new:
        kept += new
        return 0
    earlier = len(kept)
    iou = box_iou(torch.tensor([i.box for i in new]), torch.tensor([i.box for i in kept]))
    duplicates = 0
    for n, inst in enumerate(new):
        same = [k for k in range(earlier) if kept[k].label == inst.label]
        best = max(same, key=lambda k: float(iou[n, k]), default=None)
        if best is None or float(iou[n, best]) < DUPLICATE_IOU:
            kept.append(inst)
            continue
        duplicates += 1
        if kept[best].segm is None and inst.segm is not None:
            kept[best] = inst
    return duplicates
