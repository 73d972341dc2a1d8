"""Typed configuration: dataclasses, YAML presets with `_base_` inheritance, `--set` overrides.

Unknown keys and wrongly typed values are errors that name the key, because a typo in a
config silently falling back to a default costs a whole training run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config file, preset name or override that cannot be used; the message names the key."""


@dataclass
class DataConfig:
    train_json: str | None = None
    train_images: str | None = None
    val_json: str | None = None
    val_images: str | None = None
    # "all", "none", "voc", "nonvoc", "random:K:SEED", a text file, or a list of class names
    mask_classes: str | list[str] = "all"
    hflip_prob: float = 0.5
    # a training image's short side is drawn from this list (multi-scale when it has several)
    min_size: list[int] = field(default_factory=lambda: [800])
    max_size: int = 1333
    test_min_size: int = 800
    num_workers: int = 2
    # a bad image or annotation: "error" stops at the first, "skip" drops it and names it in the
    # start-up summary, "warn" also warns for each (docs/bad_input.md)
    on_bad_sample: str = "skip"
    # an image's file_name may lead outside data.*_images (absolute, `..`, symlinks out) only
    # when this is true: nothing is read outside the data set's folders unless asked
    allow_outside_images: bool = False


@dataclass
class BackboneConfig:
    name: str = "resnet50"
    # "imagenet" (torchvision's weights API, needs network or a warm cache), a local .pth, or null
    weights: str | None = "imagenet"
    trainable_layers: int = 3
    # frozen_bn for pretrained backbones; bn or gn when training from scratch
    norm: str = "frozen_bn"
    fpn_channels: int = 256


@dataclass
class RPNConfig:
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    pre_nms_top_n_train: int = 2000
    post_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5


@dataclass
class BoxHeadConfig:
    representation_size: int = 1024
    pooler_resolution: int = 7
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100


@dataclass
class MaskHeadConfig:
    # fcn (Mask R-CNN) | resnet | hourglass (Deep-MARC's deep heads, mask_heads/deep.py)
    name: str = "fcn"
    channels: int = 256
    num_convs: int = 4  # fcn only
    # resnet: 4, 8, 12, 16, 20; hourglass: 10, 20, 52, 100 (see mask_heads/deep.py)
    depth: int = 52
    pooler_resolution: int = 14
    # M, the side of the predicted mask: null is twice the pooler resolution (fcn's deconv
    # upsamples); resnet and hourglass resize their input to any M (Deep-MAC: 28, 32, 56)
    resolution: int | None = None
    class_agnostic: bool = False
    # the final layer: "conv" (Mask R-CNN's per-class 1x1 conv) or "transfer" (Mask^X: that
    # conv's weights predicted from the box head's weights, see model.transfer)
    predictor: str = "conv"
    # Mask^X's fused FCN+MLP head: a class-agnostic MLP on the flattened mask features adds
    # one M x M logit map to every class's; mlp_hidden is used when mlp_layers > 1
    mlp_fusion: bool = False
    mlp_layers: int = 1
    mlp_hidden: int = 1024

    @property
    def mask_resolution(self) -> int:
        return self.resolution or 2 * self.pooler_resolution


@dataclass
class TransferConfig:
    """Mask^X's weight transfer function T (model.mask_head.predictor=transfer)."""

    # what T reads per class: cls | box | cls+box (the box predictor's weights for the class),
    # randn (a fixed random vector) | embedding (a vector from embedding_file)
    input: str = "cls+box"
    num_layers: int = 2  # 1 (linear), 2 or 3 FC layers
    hidden_dim: int | None = None  # null: model.mask_head.channels, as in the authors' code
    activation: str = "leaky_relu"  # leaky_relu (slope 0.1) | relu
    # the mask loss trains T but never the box weights T reads
    stop_gradient: bool = True
    randn_dim: int = 300
    # a local text file of "name v1 v2 ..." lines (GloVe's format), for input=embedding
    embedding_file: str | None = None


@dataclass
class ModelConfig:
    # rcnn (Mask R-CNN) | fcos (Deep-MAC's anchor-free detector: one anchor per FPN level of
    # rpn.anchor_sizes; box_head's score_thresh, nms_thresh, detections_per_img; train.mask_rois
    # must be gt)
    detector: str = "rcnn"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    box_head: BoxHeadConfig = field(default_factory=BoxHeadConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    # start from a full Mask R-CNN: "torchvision-coco" (torchvision's COCO weights, needs network
    # or a warm cache) or a local .pth holding a torchvision MaskRCNN state dict
    init: str | None = None
    transfer: TransferConfig = field(default_factory=TransferConfig)
    # a run directory whose last checkpoint initialises everything but the mask branch
    # (stage-wise training's stage 2 starts from its stage-1 run)
    init_from_run: str | None = None


@dataclass
class TrainConfig:
    steps: int = 90000
    batch_size: int = 16
    optimizer: str = "sgd"  # sgd (with momentum) | adamw
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"  # step | cosine
    milestones: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    warmup_steps: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float | None = None
    amp: bool = True  # only takes effect on CUDA
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    checkpoint_every: int = 5000
    keep_every: int = 0  # also keep checkpoints/step_XXXXXXX.pt every N steps (0: never)
    log_every: int = 20
    eval_every: int = 0  # evaluate on val every N steps and keep checkpoints/best.pt (0: never)
    # a NaN/Inf loss: "stop" training (the last checkpoint is intact) or "skip" the update
    on_nonfinite_loss: str = "stop"
    # end_to_end | detector (stage 1: boxes of all classes, no masks) | mask (stage 2: only the
    # mask branch trains, from model.init_from_run); see everyseg.modeling.stages
    stage: str = "end_to_end"
    # where the mask head's training crops come from: proposals (Mask R-CNN: positive proposals
    # matched to an instance with a mask) | gt (Deep-MARC: those instances' ground-truth boxes)
    # | both; mask_roi_jitter moves gt boxes' sides by up to that fraction of their size
    mask_rois: str = "proposals"
    mask_roi_jitter: float = 0.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def preset_names() -> list[str]:
    files = resources.files("everyseg") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in files.iterdir() if p.name.endswith(".yaml"))


def load_config(source: str | Path, overrides: list[str] = ()) -> Config:
    """Load a preset name or YAML path, apply `a.b=value` overrides, and validate everything."""
    raw = _read_with_bases(source)
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, "")


def _read_with_bases(source: str | Path) -> dict[str, Any]:
    text, where = _read_source(source)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a config must be a mapping, got {type(raw).__name__}")
    base = raw.pop("_base_", None)
    if base is None:
        return raw
    return _deep_merge(_read_with_bases(base), raw)


def _read_source(source: str | Path) -> tuple[str, str]:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.read_text(), str(path)
    name = path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else str(source)
    preset = resources.files("everyseg") / "configs" / f"{name}.yaml"
    if preset.is_file():
        return preset.read_text(), f"preset {name!r}"
    raise ConfigError(
        f"{source!r} is neither a YAML file nor a preset; presets: {', '.join(preset_names())}"
    )


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.subkey=value")
    value = yaml.safe_load(text) if text else None
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"section {prefix!r}" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} in {where}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    values = {}
    for name, value in raw.items():
        key, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key + ".")
        else:
            values[name] = _check_type(value, hint, key)
    return cls(**values)


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(hint)}")
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):
        return value
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
