"""Datasets from a config: the one place data paths and the mask split are read."""

from __future__ import annotations

from everyseg.config import ConfigError, DataConfig
from everyseg.data.coco import CocoInstances


def build_dataset(
    cfg: DataConfig, *, split: str, seed: int = 0, mask_classes=None
) -> CocoInstances:
    """The train or val set. `mask_classes` overrides cfg (evaluation uses the run's own)."""
    json_path = getattr(cfg, f"{split}_json")
    images = getattr(cfg, f"{split}_images")
    if json_path is None or images is None:
        raise ConfigError(
            f"data.{split}_json and data.{split}_images must be set (use --set "
            f"data.{split}_json=PATH); for synthetic data run `everyseg synth DIR` first"
        )
    train = split == "train"
    return CocoInstances(
        json_path=json_path,
        images_dir=images,
        mask_classes=cfg.mask_classes if mask_classes is None else mask_classes,
        train=train,
        hflip_prob=cfg.hflip_prob if train else 0.0,
        seed=seed,
        on_bad_sample=cfg.on_bad_sample,
        # evaluation cannot let another image stand in for one that fails to decode mid-way
        decode_images=not train,
    )
