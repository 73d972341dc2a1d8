"""Shared fixtures: a small synthetic dataset and a tiny config that trains in seconds."""

from __future__ import annotations

import pytest
import torch

from everyseg.config import Config, load_config
from everyseg.data.synthetic import generate
from everyseg.modeling.detector import build_model

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
]


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synth_paths(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("synth")
    return generate(out, num_train=8, num_val=4, size=64, seed=3, progress=False)


def tiny_config(paths: dict[str, str], *extra: str, preset: str = "maskrcnn-tiny") -> Config:
    data = [f"data.{key}={value}" for key, value in paths.items()]
    return load_config(preset, [*data, *TINY_OVERRIDES, *extra])


@pytest.fixture
def tiny_cfg(synth_paths) -> Config:
    return tiny_config(synth_paths, "train.steps=4")


def model_of(cfg: Config, **kwargs) -> torch.nn.Module:
    """build_model for `cfg`'s model section at its data's image sizes: the architecture,
    randomly initialised."""
    d = cfg.data
    sizes = dict(min_size=d.min_size, max_size=d.max_size, test_min_size=d.test_min_size)
    return build_model(cfg.model, **sizes, **kwargs)
