"""Datasets from a config: the one place data paths and the mask split are read."""

from __future__ import annotations

from typing import NamedTuple

from everyseg.config import ConfigError, DataConfig
from everyseg.data.coco import CocoInstances
from everyseg.data.index import CocoIndex
from everyseg.data.report import training_problem
from everyseg.data.validate import DataError

SPLITS = ("train", "val")


class SplitSource(NamedTuple):
    json: str
    images: str
    mask_classes: object  # a data.mask_classes spec (see resolve_mask_classes)


def split_source(cfg: DataConfig, split: str) -> SplitSource:
    """A split's JSON, image folder and mask classes: the train set keeps data.mask_classes'
    masks, the val set every class's (evaluation scores them all)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    json_path = getattr(cfg, f"{split}_json")
    images = getattr(cfg, f"{split}_images")
    if json_path is None or images is None:
        raise ConfigError(
            f"data.{split}_json and data.{split}_images must be set (use --set "
            f"data.{split}_json=PATH); for synthetic data run `everyseg synth DIR` first"
        )
    return SplitSource(json_path, images, cfg.mask_classes if split == "train" else "all")


def build_dataset(
    cfg: DataConfig, *, split: str, seed: int = 0, mask_classes=None
) -> CocoInstances:
    """The train or val set. `mask_classes` overrides cfg (evaluation uses the run's own; the
    detector stage passes "none").

    The train set must have something to train: raises DataError when no instance is usable,
    or when the mask classes are not empty yet none of their instances has a usable mask.
    """
    source = split_source(cfg, split)
    train = split == "train"
    dataset = CocoInstances(
        json_path=source.json,
        images_dir=source.images,
        mask_classes=source.mask_classes if mask_classes is None else mask_classes,
        train=train,
        hflip_prob=cfg.hflip_prob if train else 0.0,
        seed=seed,
        on_bad_sample=cfg.on_bad_sample,
        # evaluation cannot let another image stand in for one that fails to decode mid-way
        decode_images=not train,
        **_index_options(cfg, split),
    )
    problem = training_problem(dataset.index) if train else None
    if problem:
        raise DataError(problem)
    return dataset


def build_index(cfg: DataConfig, *, split: str, decode_images: bool) -> CocoIndex:
    """A split's index as `check-data` reads it: every bad sample collected (policy skip)."""
    source = split_source(cfg, split)
    return CocoIndex(
        json_path=source.json,
        images_dir=source.images,
        mask_classes=source.mask_classes,
        decode_images=decode_images,
        **_index_options(cfg, split),
    )


def _index_options(cfg: DataConfig, split: str) -> dict:
    # the model resizes training images to data.min_size, others to data.test_min_size
    min_sizes = cfg.min_size if split == "train" else [cfg.test_min_size]
    return {
        "allow_outside_images": cfg.allow_outside_images,
        "min_sizes": min_sizes,
        "max_size": cfg.max_size,
    }
