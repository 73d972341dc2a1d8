"""Typed configuration: dataclasses, YAML presets with `_base_` inheritance, `--set` overrides.

Unknown keys, wrongly typed values, choices not in their list and numbers that are not finite
or out of range are errors that name the key, all found at load (a field's type declares what
it accepts, see config_types.py), because a typo in a config silently falling back to a
default, or failing hours into training, costs a whole run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from everyseg.config_types import (
    ConfigError,
    Fraction,
    Length,
    NonNegativeFloat,
    NonNegativeInt,
    Pattern,
    PositiveFloat,
    PositiveInt,
    Range,
    check_relations,
    check_value,
)

# one per FPN output (P2..P6): the RPN's anchor generator needs exactly that many
FpnLevelSizes = Annotated[list[PositiveInt], Length(min=5, max=5)]
# the syntax only: whether such a device exists is known when a run resolves it
Device = Annotated[str, Pattern(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:N or mps")]


@dataclass
class SourceConfig:
    """One entry of data.train_sources (see everyseg.data.sources)."""

    json: str | None = None
    images: str | None = None
    # the spec data.mask_classes takes, resolved against this source's own class names
    mask_classes: str | list[str] = "all"
    # how often each of this source's images is drawn, relative to an image of weight 1
    weight: PositiveFloat = 1.0


@dataclass
class DataConfig:
    train_json: str | None = None
    train_images: str | None = None
    val_json: str | None = None
    val_images: str | None = None
    # "all", "none", "voc", "nonvoc", "random:K:SEED", a text file, or a list of class names
    mask_classes: str | list[str] = "all"
    hflip_prob: Fraction = 0.5
    # a training image's short side is drawn from this list (multi-scale when it has several)
    min_size: Annotated[list[PositiveInt], Length(min=1)] = field(default_factory=lambda: [800])
    max_size: PositiveInt = 1333
    test_min_size: PositiveInt = 800
    num_workers: NonNegativeInt = 2
    # a bad image or annotation: "error" stops at the first, "skip" drops it and names it in the
    # start-up summary, "warn" also warns for each (docs/bad_input.md)
    on_bad_sample: Literal["error", "skip", "warn"] = "skip"
    # an image's file_name may lead outside data.*_images (absolute, `..`, symlinks out) only
    # when this is true: nothing is read outside the data set's folders unless asked
    allow_outside_images: bool = False
    # several training sources merged into one set (everyseg.data.sources); exclusive with
    # train_json / train_images / mask_classes, the one-source shorthand
    train_sources: list[SourceConfig] | None = None
    # a YAML or JSON mapping alias -> canonical class name, applied when sources are merged
    class_aliases: str | None = None
    # with model.keypoint_head: the classes whose annotations' keypoints train it ("all": every
    # class whose category lists keypoints, "none", or class names); see data/keypoints.py
    keypoint_classes: str | list[str] = "all"

    def __post_init__(self) -> None:
        if self.train_sources is None:
            return
        mixed = [
            key
            for key, value in (
                ("train_json", self.train_json),
                ("train_images", self.train_images),
                ("mask_classes", None if self.mask_classes == "all" else self.mask_classes),
            )
            if value is not None
        ]
        if mixed:
            raise ConfigError(
                f"data.train_sources and data.{mixed[0]} are exclusive: give each source its "
                f"json, images and mask_classes, and set data.{mixed[0]} to "
                f"{'all' if mixed[0] == 'mask_classes' else 'null'} (a _base_ preset may set it)"
            )
        if not self.train_sources:
            raise ConfigError("data.train_sources is empty: list at least one {json, images}")
        for i, source in enumerate(self.train_sources):
            for key in ("json", "images"):
                if getattr(source, key) is None:
                    raise ConfigError(f"data.train_sources[{i}].{key} must be set")


@dataclass
class BackboneConfig:
    name: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    # "imagenet" (torchvision's weights API, needs network or a warm cache), a local .pth, or null
    weights: str | None = "imagenet"
    trainable_layers: Annotated[int, Range(ge=0, le=5)] = 3
    # frozen_bn for pretrained backbones; bn or gn when training from scratch
    norm: Literal["frozen_bn", "bn", "gn"] = "frozen_bn"
    fpn_channels: PositiveInt = 256
    # false: Mask R-CNN's C4 (ResNet stages 1-4 feed a one-level RPN, RoIs pooled from C4 run
    # through stage 5 as the box and mask heads' trunk; modeling/c4.py); fpn_channels unused
    fpn: bool = True
    # false: no ResNet stage 5; the FPN's C5 input is C4 subsampled by 2, so P2..P6 stay. For
    # small images whose objects never need stride-32 features (the tiny presets: 0.70-0.79x
    # a training step, 0.49x the trunk pretraining's time; docs/results.md, eleventh round)
    stage5: bool = True


@dataclass
class RPNConfig:
    anchor_sizes: FpnLevelSizes = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: Annotated[list[PositiveFloat], Length(min=1)] = field(
        default_factory=lambda: [0.5, 1.0, 2.0]
    )
    pre_nms_top_n_train: PositiveInt = 2000
    post_nms_top_n_train: PositiveInt = 2000
    pre_nms_top_n_test: PositiveInt = 1000
    post_nms_top_n_test: PositiveInt = 1000
    nms_thresh: Fraction = 0.7
    fg_iou_thresh: Fraction = 0.7
    bg_iou_thresh: Annotated[Fraction, Range(le="fg_iou_thresh")] = 0.3
    batch_size_per_image: PositiveInt = 256
    positive_fraction: Fraction = 0.5


@dataclass
class BoxHeadConfig:
    representation_size: PositiveInt = 1024
    pooler_resolution: PositiveInt = 7
    batch_size_per_image: PositiveInt = 512
    positive_fraction: Fraction = 0.25
    fg_iou_thresh: Fraction = 0.5
    bg_iou_thresh: Annotated[Fraction, Range(le="fg_iou_thresh")] = 0.5
    score_thresh: Fraction = 0.05
    nms_thresh: Fraction = 0.5
    detections_per_img: PositiveInt = 100


@dataclass
class MaskHeadConfig:
    # fcn (Mask R-CNN) | resnet | hourglass (Deep-MARC's deep heads, mask_heads/deep.py)
    name: Literal["fcn", "resnet", "hourglass"] = "fcn"
    channels: PositiveInt = 256
    num_convs: NonNegativeInt = 4  # fcn only
    # resnet: 4, 8, 12, 16, 20; hourglass: 10, 20, 52, 100 (see mask_heads/deep.py)
    depth: PositiveInt = 52
    pooler_resolution: PositiveInt = 14
    # M, the side of the predicted mask: null is twice the pooler resolution (fcn's deconv
    # upsamples); resnet and hourglass resize their input to any M (Deep-MAC: 28, 32, 56)
    resolution: PositiveInt | None = None
    class_agnostic: bool = False
    # the final layer: "conv" (Mask R-CNN's per-class 1x1 conv) or "transfer" (Mask^X: that
    # conv's weights predicted from the box head's weights, see model.transfer)
    predictor: Literal["conv", "transfer"] = "conv"
    # Mask^X's fused FCN+MLP head: a class-agnostic MLP on the flattened mask features adds
    # one M x M logit map to every class's; mlp_hidden is used when mlp_layers > 1
    mlp_fusion: bool = False
    mlp_layers: PositiveInt = 1
    mlp_hidden: PositiveInt = 1024
    # where the head's training crops come from: proposals (Mask R-CNN: positive proposals
    # matched to an instance with a mask) | gt (Deep-MARC: those instances' ground-truth boxes)
    # | both; roi_jitter moves gt boxes' sides by up to that fraction of their size
    train_rois: Literal["proposals", "gt", "both"] = "proposals"
    roi_jitter: Fraction = 0.0
    # sigmoid (Mask R-CNN: per-pixel binary loss on the ground-truth class's mask) | softmax
    # (the paper's ablation: a per-pixel softmax across all classes' masks, channel 0 the
    # background, so classes compete; needs the per-class conv predictor)
    loss: Literal["sigmoid", "softmax"] = "sigmoid"

    @property
    def mask_resolution(self) -> int:
        return self.resolution or 2 * self.pooler_resolution


@dataclass
class TransferConfig:
    """Mask^X's weight transfer function T (model.mask_head.predictor=transfer)."""

    # what T reads per class: cls | box | cls+box (the box predictor's weights for the class),
    # randn (a fixed random vector) | embedding (a vector from embedding_file)
    input: Literal["cls", "box", "cls+box", "randn", "embedding"] = "cls+box"
    num_layers: Annotated[int, Range(ge=1, le=3)] = 2  # 1 (linear), 2 or 3 FC layers
    hidden_dim: PositiveInt | None = None  # null: model.mask_head.channels, as in the authors' code
    activation: Literal["leaky_relu", "relu"] = "leaky_relu"  # leaky_relu (slope 0.1) | relu
    # the mask loss trains T but never the box weights T reads
    stop_gradient: bool = True
    randn_dim: PositiveInt = 300
    # a local text file of "name v1 v2 ..." lines (GloVe's format), for input=embedding
    embedding_file: str | None = None


@dataclass
class FCOSConfig:
    """Deep-MAC's anchor-free detector (model.detector=fcos): torchvision's FCOS."""

    # one anchor per FPN level (P2..P6); FCOS assigns a box to the level whose anchor size
    # fits it
    anchor_sizes: FpnLevelSizes = field(default_factory=lambda: [32, 64, 128, 256, 512])
    # torchvision's FCOS defaults
    score_thresh: Fraction = 0.2
    nms_thresh: Fraction = 0.6
    detections_per_img: PositiveInt = 100


@dataclass
class FCNConfig:
    """The FCN for semantic segmentation (model.kind=fcn, modeling/fcn.py)."""

    # the finest stride whose scores are fused: 32 (FCN-32s), 16 (FCN-16s) or 8 (FCN-8s)
    stride: Literal[32, 16, 8] = 8


@dataclass
class KeypointHeadConfig:
    """Mask R-CNN's keypoint head (modeling/keypoint_head.py): torchvision's
    KeypointRCNNHeads (num_convs 3x3 convs) and KeypointRCNNPredictor (K heatmaps of side
    4 x pooler_resolution, a softmax over their positions)."""

    num_convs: PositiveInt = 8
    channels: PositiveInt = 512
    pooler_resolution: PositiveInt = 14


@dataclass
class ModelConfig:
    # rcnn: an instance segmenter (model.detector) | fcn: FCN semantic segmentation (model.fcn;
    # the backbone without FPN, a per-pixel softmax over background + the classes)
    kind: Literal["rcnn", "fcn"] = "rcnn"
    # rcnn (Mask R-CNN: rpn, box_head) | fcos (Deep-MAC's anchor-free detector: model.fcos;
    # its mask head trains on ground-truth crops, model.mask_head.train_rois=gt)
    detector: Literal["rcnn", "fcos"] = "rcnn"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    box_head: BoxHeadConfig = field(default_factory=BoxHeadConfig)
    fcos: FCOSConfig = field(default_factory=FCOSConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    # how RoI poolers read features: align (RoIAlign, bilinear) | pool (RoIPool, quantised:
    # Mask R-CNN's ablation); the same FPN level for a box either way
    roi_pool: Literal["align", "pool"] = "align"
    # start from a full Mask R-CNN: "torchvision-coco" (torchvision's COCO weights, needs network
    # or a warm cache) or a local .pth holding a torchvision MaskRCNN state dict
    init: str | None = None
    transfer: TransferConfig = field(default_factory=TransferConfig)
    # a run directory whose last checkpoint initialises everything but the mask branch
    # (stage-wise training's stage 2 starts from its stage-1 run)
    init_from_run: str | None = None
    fcn: FCNConfig = field(default_factory=FCNConfig)
    # null: no keypoints (the model as before); a mapping: Mask R-CNN's keypoint head
    keypoint_head: KeypointHeadConfig | None = None


@dataclass
class TrunkPretrainConfig:
    """engine/trunk_pretrain.py: the trunk as a classifier of the train set's box crops."""

    steps: PositiveInt = 500
    batch_size: PositiveInt = 64
    crop_size: PositiveInt = 32  # each box's crop is resized to crop_size x crop_size
    lr: PositiveFloat = 0.002  # AdamW, the one-cycle schedule's peak
    max_crops: PositiveInt = 20000  # crops held in memory (3 x crop_size^2 floats each)


@dataclass
class TrainConfig:
    steps: PositiveInt = 90000
    batch_size: PositiveInt = 16
    # sgd: momentum and weight decay on every parameter (Mask R-CNN's recipe); adamw: no weight
    # decay on norm layers' parameters and biases (set lr to an AdamW rate, e.g. 1e-4)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: NonNegativeFloat = 0.02  # 0 is allowed: a baseline whose weights never move
    momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9  # sgd; adamw's beta1
    weight_decay: NonNegativeFloat = 1e-4
    schedule: Literal["step", "cosine"] = "step"
    milestones: list[NonNegativeInt] = field(default_factory=lambda: [60000, 80000])
    gamma: Annotated[float, Range(gt=0, le=1)] = 0.1
    warmup_steps: NonNegativeInt = 1000
    warmup_factor: Fraction = 0.001
    clip_grad_norm: PositiveFloat | None = None
    # null, or keep an exponential moving average of the weights with this decay per step
    # (0.998: about the last 500 steps) and evaluate, predict and export with it (engine/ema.py)
    ema_decay: Annotated[float, Range(gt=0, lt=1)] | None = None
    # mixed precision: off | fp16 (CUDA only, with a GradScaler) | bf16 (CUDA and CPU); see
    # everyseg.engine.precision. Evaluation and prediction run in it too, where the device can
    amp: Literal["off", "fp16", "bf16"] = "off"
    # split each step's batch_size images into this many micro-batches, each forward/backward
    # on batch_size / accumulate images, gradients summed before the one update: the same
    # step, schedule and data order in less memory (batch_size must divide evenly)
    accumulate: PositiveInt = 1
    # cuDNN autotuning: only pays when every batch has the same shape (one data.min_size and
    # images of one aspect ratio); detection batches usually change shape with every image
    cudnn_benchmark: bool = False
    seed: Annotated[int, Range(ge=0, le=2**32 - 1)] = 0  # numpy's seed range
    device: Device = "auto"
    checkpoint_every: PositiveInt = 5000
    keep_every: NonNegativeInt = 0  # also keep checkpoints/step_XXXXXXX.pt every N steps (0: never)
    log_every: PositiveInt = 20
    # TensorBoard event files in the run directory (losses, lr, eval AP, overlays): auto = when
    # the tensorboard package is installed (pip install everyseg[tensorboard]), on = required
    tensorboard: Literal["auto", "on", "off"] = "auto"
    eval_every: NonNegativeInt = (
        0  # evaluate on val every N steps and keep checkpoints/best.pt (0: never)
    )
    # a NaN/Inf loss: "stop" training (the last checkpoint is intact) or "skip" the update
    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    # end_to_end | detector (stage 1: boxes of all classes, no masks) | mask (stage 2: only the
    # mask branch trains, from model.init_from_run); see everyseg.engine.initialize
    stage: Literal["end_to_end", "detector", "mask"] = "end_to_end"
    # null, or pretrain a new run's trunk on the train set's box crops before the detector
    # (from scratch on a CPU budget; engine/trunk_pretrain.py). Skipped when the trunk comes
    # from model.init or model.init_from_run
    trunk_pretrain: TrunkPretrainConfig | None = None


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


def load_config(source: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a preset name or YAML path, apply `a.b=value` overrides, and validate everything."""
    raw = _read_with_bases(source)
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, "")


def _read_with_bases(source: str | Path, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    text, where = _read_source(source)
    if where in seen:
        raise ConfigError(f"{where}: _base_ chain loops: {' -> '.join((*seen, where))}")
    raw = _parse_yaml(text, where)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a config must be a mapping, got {type(raw).__name__}")
    base = raw.pop("_base_", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{where}: _base_ must be a preset name or a YAML path, got {base!r}")
    return _deep_merge(_read_with_bases(base, (*seen, where)), raw)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{where}: YAML nested too deeply") from None


def _read_source(source: str | Path) -> tuple[str, str]:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason})") from None
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
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override {item!r} must look like key.subkey=value")
    value = _parse_yaml(text, f"override {item!r}") if text else None
    *parents, leaf = parts
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(raw) - names))
    if unknown:
        where = f"section {prefix!r}" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} in {where}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    values = {}
    for name, value in raw.items():
        key, hint = prefix + name, hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key + ".")
        elif (section := _optional_section(hint)) is not None:
            values[name] = None if value is None else _build(section, value, key + ".")
        elif (item := _section_list_item(hint)) is not None and value is not None:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key}: expected a list, got {value!r}")
            values[name] = [_build(item, v, f"{key}[{i}].") for i, v in enumerate(value)]
        else:
            values[name] = check_value(value, hint, key)
    section = cls(**values)
    check_relations(section, hints, prefix)
    return section


def _optional_section(hint: Any) -> type | None:
    """The section type of a `Section | None` field, else None."""
    if typing.get_origin(hint) is not types.UnionType:
        return None
    options = typing.get_args(hint)
    sections = [o for o in options if isinstance(o, type) and dataclasses.is_dataclass(o)]
    return sections[0] if len(sections) == 1 and type(None) in options else None


def _section_list_item(hint: Any) -> type | None:
    """The section type of a `list[Section]` or `list[Section] | None` field, else None."""
    options = typing.get_args(hint) if typing.get_origin(hint) is types.UnionType else (hint,)
    for option in options:
        if typing.get_origin(option) is list:
            (item,) = typing.get_args(option)
            if isinstance(item, type) and dataclasses.is_dataclass(item):
                return item
    return None
