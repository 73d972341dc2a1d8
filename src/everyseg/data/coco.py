"""COCO / LVIS instance JSON -> per-image training targets with per-instance `has_mask`.

Partial supervision is data: each annotation is judged on its own. It keeps its mask only if
it has a usable `segmentation` and its class is in `mask_classes`; otherwise it is a box-only
instance (`has_mask` False, no mask). Nothing is inferred per image. What is usable, and
every skip with its reason and ids, comes from `CocoIndex` (see `everyseg.data.report`).
"""

from __future__ import annotations

import operator
import os
import random
import sys
import warnings
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

from everyseg.data.columns import Instance
from everyseg.data.compact_masks import CompactMasks
from everyseg.data.images import load_image, size_mismatch
from everyseg.data.index import CocoIndex, ImageMeta
from everyseg.data.keypoints import KeypointLayout, hflip_keypoints, keypoint_target
from everyseg.data.report import format_report, report
from everyseg.data.source_report import format_merged_summary
from everyseg.data.sources import MergedIndex
from everyseg.data.splits import voc_spelling_note
from everyseg.data.transforms import hflip
from everyseg.data.validate import (
    CROWD,
    DEGENERATE,
    NO_SEGMENTATION,
    NO_VALID_POLYGON,
    BadSampleWarning,
    DataError,
)

__all__ = [
    "CROWD",
    "DEGENERATE",
    "NO_SEGMENTATION",
    "NO_VALID_POLYGON",
    "CocoInstances",
    "DataError",
    "collate",
]


class CocoInstances(torch.utils.data.Dataset):
    """Instance-segmentation dataset over a COCO-format (or LVIS) JSON file.

    `dataset[i]` or `dataset[(i, aug_seed)]` returns `(image, target)`:
      image: float32 (3, H, W) RGB in [0, 1].
      target: `boxes` float32 (N, 4) xyxy pixels, `labels` int64 (N,) in 1..K,
        `compact_masks` a CompactMasks (the N masks as polygons / RLE, never decoded here:
        the model rasterises what it trains on; `.to_dense()` gives uint8 (N, H, W), zeros
        where `has_mask` is False), `has_mask` bool (N,), `image_id` int64 scalar,
        `ann_ids` int64 (N,); with keypoints read (`keypoint_classes` or `keypoint_layout`,
        see CocoIndex), also `keypoints` float32 (N, K, 3) x, y, v (zeros where
        `has_keypoints` is False) and `has_keypoints` bool (N,).
    With a tuple key and `train=True`, the image is flipped left-right when
    `random.Random(f"{seed}:{aug_seed}").random() < hflip_prob`: the decision depends only on
    the key, so augmentation is reproducible whatever the DataLoader worker layout.

    `on_bad_sample`, `decode_images`, `allow_outside_images`, `min_sizes`, `max_size`: see
    `CocoIndex`. A file that passed the start-up check but cannot be decoded when loaded (corrupt
    pixel data) raises DataError, except in training under skip / warn: then the next image in
    index order stands in for it, and the file is reported on stderr (skip) or as a
    BadSampleWarning (warn), once per process. The stand-in depends only on the files, so a
    resumed run still sees the same data.
    """

    def __init__(
        self,
        *,
        json_path: str | os.PathLike,
        images_dir: str | os.PathLike,
        mask_classes="all",
        train: bool = False,
        hflip_prob: float = 0.0,
        seed: int = 0,
        on_bad_sample: str = "skip",
        decode_images: bool = False,
        allow_outside_images: bool = False,
        min_sizes: Sequence[int] | None = None,
        max_size: int | None = None,
        keypoint_classes=None,
        keypoint_layout: KeypointLayout | None = None,
    ):
        index = CocoIndex(
            json_path=json_path,
            images_dir=images_dir,
            mask_classes=mask_classes,
            on_bad_sample=on_bad_sample,
            decode_images=decode_images,
            allow_outside_images=allow_outside_images,
            min_sizes=min_sizes,
            max_size=max_size,
            keypoint_classes=keypoint_classes,
            keypoint_layout=keypoint_layout,
        )
        self._attach(index, train=train, hflip_prob=hflip_prob, seed=seed)
        self.json_path = index.json_path
        self._where = lambda image_id: f"{self.json_path}: image {image_id}"
        self._policy = index.findings.policy
        self.sample_weights: list[float] | None = None  # None: every image drawn equally
        self._spelling_note = voc_spelling_note(mask_classes, index.class_names)

    @classmethod
    def from_index(
        cls, index: MergedIndex, *, train: bool, hflip_prob: float, seed: int
    ) -> CocoInstances:
        """A dataset over several sources merged into one index (data.train_sources)."""
        dataset = cls.__new__(cls)
        dataset._attach(index, train=train, hflip_prob=hflip_prob, seed=seed)
        dataset._where = index.where
        dataset._policy = index.policy
        dataset.sample_weights = index.weights
        dataset._spelling_note = None  # the merged summary names every match
        return dataset

    def _attach(self, index, *, train: bool, hflip_prob: float, seed: int) -> None:
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        self.index = index
        self.class_names = index.class_names
        self.cat_id_to_label = index.cat_id_to_label
        self.label_to_cat_id = index.label_to_cat_id
        self.mask_class_names = index.mask_class_names
        self.image_ids = index.image_ids
        self.train = train
        self.hflip_prob = hflip_prob
        self.seed = seed
        self._unloadable: dict[int, str] = {}  # image id -> why it failed, in this process

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict]:
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        position = range(len(self))[operator.index(index)]  # IndexError past the end
        for offset in range(len(self)):
            image_id = self.image_ids[(position + offset) % len(self)]
            if image_id in self._unloadable:
                continue
            try:
                image = self._load_checked(image_id)
            except DataError as err:
                if not self.train or self._policy == "error":
                    raise
                self._report_unloadable(image_id, err)
                continue
            meta = self.index.images[image_id]
            instances = self.index.instances.get(image_id, [])
            target = _build_target(image_id, instances, meta)
            layout = getattr(self.index, "keypoint_layout", None)
            if layout is not None:
                target["keypoints"], target["has_keypoints"] = keypoint_target(
                    [inst.keypoints for inst in instances], len(layout.names)
                )
            if self._should_flip(aug_seed):
                image, target = hflip(image, target)
                if layout is not None:
                    target["keypoints"] = hflip_keypoints(
                        target["keypoints"], width=meta.width, flip_index=layout.flip_index()
                    )
            return image, target
        example = next(iter(self._unloadable.values()))
        raise DataError(f"none of the {len(self)} images could be loaded, e.g. {example}")

    def _load_checked(self, image_id: int) -> Tensor:
        meta = self.index.images[image_id]
        try:
            image = load_image(meta.path)
        except (OSError, DataError) as err:
            raise DataError(f"{self._where(image_id)}: {err}") from err
        size = (image.shape[2], image.shape[1])
        if size != (meta.width, meta.height):
            # Masks are decoded at the JSON size, so a mismatch would misalign them.
            detail = size_mismatch(size=size, width=meta.width, height=meta.height)
            raise DataError(f"{self._where(image_id)}, {meta.path}: {detail}")
        return image

    def _report_unloadable(self, image_id: int, err: DataError) -> None:
        self._unloadable[image_id] = str(err)
        message = f"{err}; skipped, the next image stands in for it"
        if self._policy == "warn":
            warnings.warn(message, BadSampleWarning, stacklevel=3)
        else:
            print(f"everyseg: {message}", file=sys.stderr)

    def _should_flip(self, aug_seed: int | None) -> bool:
        if aug_seed is None or not self.train or self.hflip_prob == 0.0:
            return False
        # A str seed is hashed with SHA-512 by `random`, so it is independent of PYTHONHASHSEED.
        return random.Random(f"{self.seed}:{aug_seed}").random() < self.hflip_prob

    def summary(self) -> str:
        """Images, annotations, boxes/masks per class, and every finding by reason with ids
        (several sources: each source's, then what merging them did)."""
        if isinstance(self.index, MergedIndex):
            return format_merged_summary(self.index)
        summary = format_report(report(self.index))
        return summary + (f"\n{self._spelling_note}" if self._spelling_note else "")

    def instances_per_class(self) -> dict[str, int]:
        """Class name -> usable (non-crowd) instances, with or without a mask."""
        counts = Counter(self.index.instances.labels.tolist())  # a column: no Instance built
        return {name: counts[label] for label, name in enumerate(self.class_names, start=1)}

    def ground_truth(self) -> dict:
        """The usable images and annotations as a COCO dict, for evaluation."""
        return self.index.ground_truth()


def collate(batch: list[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """DataLoader collate_fn: images differ in size, so keep lists (torchvision convention)."""
    return [image for image, _ in batch], [target for _, target in batch]


def _build_target(image_id: int, instances: list[Instance], meta: ImageMeta) -> dict:
    n = len(instances)
    segms = [inst.segm for inst in instances]
    return {
        "boxes": torch.tensor([inst.box for inst in instances], dtype=torch.float32).reshape(n, 4),
        "labels": torch.tensor([inst.label for inst in instances], dtype=torch.int64),
        "compact_masks": CompactMasks(segms, height=meta.height, width=meta.width),
        "has_mask": torch.tensor([s is not None for s in segms], dtype=torch.bool),
        "image_id": torch.tensor(image_id, dtype=torch.int64),
        "ann_ids": torch.tensor([inst.ann_id for inst in instances], dtype=torch.int64),
    }
