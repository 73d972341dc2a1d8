"""Fixtures every test file shares; test files import nothing from each other.

- data: `synth_paths`, the session's tiny synthetic data set;
- configs and models: `make_config` (the tiny config factory), `make_model`, `partial_target`;
- runs: `train_tiny` (train one tiny run), `trained_run` (the session's one smoke-trained
  run, read-only), `fcos_run`, `copy_run` (a private copy for tests that write into a run);
- COCO files: `coco_files`, a tiny valid data set in tmp_path to break one way at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from everyseg.cli import main
from everyseg.config import Config, load_config
from everyseg.data.coco import CocoInstances
from everyseg.data.report import report
from everyseg.data.synthetic import generate
from everyseg.engine.run_dir import RunDir
from everyseg.engine.train import train
from everyseg.modeling.detector import build_model

from coco_json import CATEGORIES, H, W, ann, image_entry

TINY_OVERRIDES = [
    "data.min_size=[64]",
    "data.test_min_size=64",
    "data.max_size=64",
    "data.num_workers=0",
    "model.backbone.fpn_channels=16",
    "model.rpn.anchor_sizes=[8,16,32,64,128]",
    "model.rpn.pre_nms_top_n_train=100",
    "model.rpn.post_nms_top_n_train=50",
    "model.rpn.pre_nms_top_n_test=100",
    "model.rpn.post_nms_top_n_test=30",
    "model.rpn.batch_size_per_image=32",
    "model.box_head.representation_size=32",
    "model.box_head.batch_size_per_image=16",
    "model.box_head.detections_per_img=20",
    "model.box_head.score_thresh=0.0",
    "model.fcos.anchor_sizes=[8,16,32,64,128]",
    "model.fcos.detections_per_img=20",
    "model.fcos.score_thresh=0.0",
    "model.mask_head.channels=8",
    "model.mask_head.num_convs=2",
    "model.mask_head.pooler_resolution=7",
    "train.batch_size=2",
    "train.lr=0.01",
    "train.warmup_steps=2",
    "train.checkpoint_every=100",
    "train.log_every=1",
    "train.trunk_pretrain=null",  # the tiny presets pretrain for minutes
    # the tests' few steps on 1-2 objects an image were tuned with 1/4 positive box RoIs
    "model.box_head.positive_fraction=0.25",
]
FCOS = "model.backbone.fpn_channels=64"  # FCOS's GroupNorm(32, C): at 64 px C must be >= 64


@pytest.fixture(autouse=True)
def _deterministic():
    """One thread and a seeded global stream: every test draws the same numbers whichever
    tests ran before it."""
    torch.set_num_threads(1)
    torch.manual_seed(0)


# --- data -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def synth_paths(tmp_path_factory) -> dict[str, str]:
    """8 train and 4 val images of 64 px: data.train_json, train_images, val_json, val_images."""
    out = tmp_path_factory.mktemp("synth")
    return generate(out, num_train=8, num_val=4, size=64, seed=3, progress=False)


# --- configs and models ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def make_config(synth_paths):
    """make_config(*overrides, preset="maskrcnn-tiny", paths=synth_paths) -> Config: a preset
    sized down to train in seconds on `paths`, then `overrides` (`key=value` strings)."""

    def tiny_config(*extra: str, preset: str = "maskrcnn-tiny", paths=None) -> Config:
        data = [f"data.{key}={value}" for key, value in (paths or synth_paths).items()]
        return load_config(preset, [*data, *TINY_OVERRIDES, *extra])

    return tiny_config


@pytest.fixture
def tiny_cfg(make_config) -> Config:
    return make_config("train.steps=4")


@pytest.fixture(scope="session")
def make_model():
    """make_model(cfg, **kwargs): build_model for `cfg`'s model section at its data's image
    sizes, the architecture randomly initialised."""

    def model_of(cfg: Config, **kwargs) -> torch.nn.Module:
        d = cfg.data
        sizes = dict(min_size=d.min_size, max_size=d.max_size, test_min_size=d.test_min_size)
        return build_model(cfg.model, **sizes, **kwargs)

    return model_of


@pytest.fixture
def partial_target() -> dict[str, torch.Tensor]:
    """A 64x64 image's target with two instances: a masked square (class 1) and a box-only
    bar (class 2)."""
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:30, 8:30] = 1
    return {
        "boxes": torch.tensor([[8.0, 8.0, 30.0, 30.0], [34.0, 20.0, 60.0, 50.0]]),
        "labels": torch.tensor([1, 2]),
        "masks": masks,
        "has_mask": torch.tensor([True, False]),
    }


# --- runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def train_tiny(make_config):
    """train_tiny(out_dir, *overrides, preset=..., paths=...) -> RunDir: train a tiny run of
    make_config(*overrides, ...) into out_dir, without a progress bar."""

    def train_run(out_dir: Path, *extra: str, **config_kwargs) -> RunDir:
        return train(make_config(*extra, **config_kwargs), out_dir=out_dir, progress=False)

    return train_run


TRAINED_RUN_SETS = ["train.steps=2", "data.mask_classes=[circle, star, ring]"]


@pytest.fixture(scope="session")
def trained_run(synth_paths, tmp_path_factory) -> RunDir:
    """The session's smoke-trained run, read-only: `everyseg train maskrcnn-tiny` for 2 steps
    on synth_paths with masks for circle, star and ring only (11 unseen classes), evaluated
    (metrics.json). Trained under umask 002, so its files are group-writable: that tells files
    that follow the umask from files written with a fixed mode. Tests that write into a run
    directory take copy_run(trained_run)."""
    root = tmp_path_factory.mktemp("trained") / "run"
    sets = [f"data.{key}={value}" for key, value in synth_paths.items()]
    argv = ["train", "maskrcnn-tiny", "--out", str(root)]
    for item in [*sets, *TINY_OVERRIDES, *TRAINED_RUN_SETS]:
        argv += ["--set", item]
    previous = os.umask(0o002)
    try:
        assert main(argv) == 0
    finally:
        os.umask(previous)
    return RunDir(root)


@pytest.fixture(scope="session")
def fcos_run(train_tiny, tmp_path_factory) -> RunDir:
    """A 3-step deepmac-tiny run (FCOS detector, crop-to-GT deep mask head), not evaluated;
    read-only like trained_run."""
    root = tmp_path_factory.mktemp("fcos") / "run"
    return train_tiny(root, "train.steps=3", FCOS, preset="deepmac-tiny")


@pytest.fixture
def copy_run(tmp_path):
    """copy_run(run) -> RunDir: a copy of `run` in tmp_path, to write into."""

    def copy(run: RunDir) -> RunDir:
        return RunDir(Path(shutil.copytree(run.root, tmp_path / f"copy-of-{run.root.name}")))

    return copy


# --- COCO files to break one way at a time --------------------------------------------------


class CocoFiles:
    """A tiny valid COCO data set under `root` (ann.json, img/) and the loader's view of it."""

    def __init__(self, root: Path):
        self.root = root
        self.images = root / "img"

    @staticmethod
    def write_image(path: Path, width: int = W, height: int = H, mode: str = "RGB") -> None:
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[..., 0] = np.arange(width, dtype=np.uint8) * 5
        Image.fromarray(pixels).convert(mode).save(path)

    def write_dataset(self, *, images=None, annotations=None, categories=None) -> Path:
        """Two 40x30 images (ids 1, 2), annotations 10 (image 1) and 20 (image 2) unless
        given; writes the image files the entries name (unless already there)."""
        images = [image_entry(1, "a.png"), image_entry(2, "b.png")] if images is None else images
        if annotations is None:
            annotations = [ann(10), ann(20, image_id=2)]
        self.images.mkdir(exist_ok=True)
        for img in images:
            if isinstance(img, dict) and isinstance(img.get("file_name"), str):
                target = self.images / img["file_name"]
                if not target.exists():
                    self.write_image(target)
        data = {
            "images": images,
            "annotations": annotations,
            "categories": CATEGORIES if categories is None else categories,
        }
        path = self.root / "ann.json"
        path.write_text(json.dumps(data))
        return path

    def load(self, json_path: Path | None = None, **kwargs) -> CocoInstances:
        json_path = json_path or self.root / "ann.json"
        return CocoInstances(json_path=json_path, images_dir=self.images, **kwargs)

    @staticmethod
    def found(dataset: CocoInstances, section: str) -> dict[str, list]:
        """reason key -> annotation ids (or image ids) of one report section."""
        groups = report(dataset.index)[section]
        return {
            key: [item.get("ann_id", item.get("image_id")) for item in group["items"]]
            for key, group in groups.items()
        }


@pytest.fixture
def coco_files(tmp_path) -> CocoFiles:
    return CocoFiles(tmp_path)
