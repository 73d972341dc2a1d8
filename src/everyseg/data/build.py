"""Datasets from a config: the one place data paths and the mask split are read."""

from __future__ import annotations

from typing import NamedTuple

from everyseg.config import ConfigError, DataConfig
from everyseg.data.coco import CocoInstances
from everyseg.data.index import CocoIndex
from everyseg.data.keypoints import KeypointLayout
from everyseg.data.report import training_problem
from everyseg.data.sources import MergedIndex, read_val_images
from everyseg.data.splits import voc_spelling_note
from everyseg.data.validate import DataError
from everyseg.data.vocabulary import read_class_aliases

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
    cfg: DataConfig,
    *,
    split: str,
    seed: int = 0,
    mask_classes=None,
    keypoints: bool = False,
    keypoint_layout: KeypointLayout | None = None,
) -> CocoInstances:
    """The train or val set. `mask_classes` overrides cfg (evaluation uses the run's own; the
    detector stage passes "none"). With `keypoints` (a model with a keypoint head) targets
    carry keypoints: the train set data.keypoint_classes', the val set every class's, read
    into `keypoint_layout` (a trained model's keypoint list) when given (data.keypoints).

    The train set must have something to train: raises DataError when no instance is usable,
    or when the mask classes are not empty yet none of their instances has a usable mask.
    """
    train = split == "train"
    if train and cfg.train_sources is not None:
        if keypoints:
            raise ConfigError(
                "model.keypoint_head reads keypoints from data.train_json only: data."
                "train_sources does not carry them yet (set model.keypoint_head=null)"
            )
        merged = build_merged_index(cfg, mask_classes=mask_classes, decode_images=False)
        return CocoInstances.from_index(merged, train=True, hflip_prob=cfg.hflip_prob, seed=seed)
    source = split_source(cfg, split)
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
        **_keypoint_options(cfg, train=train, keypoints=keypoints, layout=keypoint_layout),
    )
    problem = training_problem(dataset.index) if train else None
    if problem:
        raise DataError(problem)
    return dataset


def build_merged_index(
    cfg: DataConfig, *, decode_images: bool, mask_classes=None, sources=None
) -> MergedIndex:
    """data.train_sources as one index (everyseg.data.sources), or `sources` (their indexes,
    already built). Raises DataError when nothing can train, or when a source's mask classes
    have no usable mask, naming the source."""
    if sources is None:
        sources = build_source_indexes(cfg, decode_images=decode_images, mask_classes=mask_classes)
    for i, index in enumerate(sources):
        problem = training_problem(index)
        if problem and "no usable instance" not in problem:
            # the hint names data.mask_classes; with several sources the key is the source's
            raise DataError(
                f"data.train_sources[{i}]: "
                + problem.replace("data.mask_classes", f"data.train_sources[{i}].mask_classes")
            )
    assert cfg.train_sources is not None
    merged = MergedIndex(
        sources=sources,
        weights=[source.weight for source in cfg.train_sources],
        aliases=read_class_aliases(cfg.class_aliases),
        val=read_val_images(cfg.val_json, cfg.val_images)
        if cfg.val_json and cfg.val_images
        else None,
        policy=cfg.on_bad_sample,
    )
    for i, (source, index) in enumerate(zip(cfg.train_sources, sources)):
        note = voc_spelling_note(mask_classes or source.mask_classes, index.class_names)
        if note:
            merged.vocabulary.notes.append(f"data.train_sources[{i}]: {note}")
    if not len(merged.instances):
        raise DataError(
            f"data.train_sources: no usable instance in any of the {len(sources)} sources "
            "(once val images are left out); nothing to train on"
        )
    return merged


def build_source_indexes(
    cfg: DataConfig, *, decode_images: bool, mask_classes=None, on_bad_sample=None
) -> list[CocoIndex]:
    """Each of data.train_sources read on its own, with its own mask classes (or
    `mask_classes` for all, e.g. "none" for stage-wise training's detector stage)."""
    assert cfg.train_sources is not None
    return [
        CocoIndex(
            json_path=str(source.json),  # DataConfig makes sure both are set
            images_dir=str(source.images),
            mask_classes=source.mask_classes if mask_classes is None else mask_classes,
            on_bad_sample=on_bad_sample or cfg.on_bad_sample,
            decode_images=decode_images,
            **_index_options(cfg, "train"),
        )
        for source in cfg.train_sources
    ]


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


def _keypoint_options(cfg: DataConfig, *, train: bool, keypoints: bool, layout) -> dict:
    if layout is not None:
        return {"keypoint_layout": layout}
    if keypoints:
        return {"keypoint_classes": cfg.keypoint_classes if train else "all"}
    return {}


def _index_options(cfg: DataConfig, split: str) -> dict:
    # the model resizes training images to data.min_size, others to data.test_min_size
    min_sizes = cfg.min_size if split == "train" else [cfg.test_min_size]
    return {
        "allow_outside_images": cfg.allow_outside_images,
        "min_sizes": min_sizes,
        "max_size": cfg.max_size,
    }
