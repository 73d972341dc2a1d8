"""A freshly built model's weights for training: pretrained parts, other runs, frozen parts.

build_model (modeling/detector.py) only builds the architecture; `initialize_for_training`
then applies, in this order:
  model.backbone.weights  the trunk's pretrained weights (ImageNet or a local .pth);
  model.init              a full Mask R-CNN: torchvision's COCO weights or a local .pth;
  model.init_from_run     a run directory whose last checkpoint gives everything but the
                          mask branch;
  train.stage             Mask^X R-CNN's training strategies, below.

  end_to_end  every part trains on every loss (the default).
  detector    stage 1: backbone, RPN and box head train on the boxes of all classes. The
              train set is loaded without masks (as data.mask_classes=none), so the mask
              branch sees no RoI and costs nothing; mask AP of such a run means nothing.
  mask        stage 2: starts from a stage-1 run (model.init_from_run=DIR) and trains only
              the mask branch (roi_heads.mask_head). Backbone, RPN and box head are frozen:
              requires_grad False, so the optimizer never holds them, and their BatchNorm
              layers become FrozenBatchNorm2d with the stage-1 statistics, so the features are
              the stage-1 detector's in training and at test time alike.

A trained run's own checkpoint holds all weights: loading it needs only `freeze_for_stage`,
for the frozen layers' structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights
from torchvision.ops import FrozenBatchNorm2d

from everyseg.config import Config, ConfigError
from everyseg.engine.checkpoint import inference_weights, load_checkpoint
from everyseg.engine.run_dir import RunDir
from everyseg.modeling.backbone import load_trunk_weights
from everyseg.modeling.detector import torchvision_to_everyseg_state
from everyseg.modeling.weights import load_state_dict

STAGES = ("end_to_end", "detector", "mask")
MASK_BRANCH = "roi_heads.mask_head."


def check_stage(config: Config) -> None:
    """A training run's initialisation settings, checked before anything is loaded."""
    if config.train.stage not in STAGES:
        raise ConfigError(f"train.stage {config.train.stage!r}: choose one of {', '.join(STAGES)}")
    if config.train.stage == "mask" and config.model.init_from_run is None:
        raise ConfigError(
            "train.stage=mask trains only the mask branch of a trained detector: set "
            "model.init_from_run to a stage-1 (train.stage=detector) run directory"
        )
    m = config.model
    if m.kind == "fcn" and (config.train.stage != "end_to_end" or m.init or m.init_from_run):
        raise ConfigError(
            "model.kind=fcn trains end to end from scratch or an ImageNet backbone: it needs "
            "train.stage=end_to_end, model.init=null and model.init_from_run=null"
        )
    if m.detector == "fcos" and (config.train.stage != "end_to_end" or m.init or m.init_from_run):
        raise ConfigError(
            "model.detector=fcos trains end to end from scratch or an ImageNet backbone: it "
            "needs train.stage=end_to_end, model.init=null and model.init_from_run=null"
        )


def initialize_for_training(
    model: nn.Module, config: Config, *, class_names: Sequence[str] | None = None
) -> None:
    """Load the pretrained weights `config` names into a freshly built `model` and freeze
    what `train.stage` freezes (see the module docstring). `class_names` (K names) are
    checked against model.init_from_run's."""
    check_stage(config)
    m = config.model
    if m.backbone.weights is not None:
        load_trunk_weights(model.backbone, name=m.backbone.name, source=m.backbone.weights)
    if m.init is not None:
        load_torchvision_weights(model, m.init)
    if m.init_from_run is not None:
        load_detector_from_run(model, m.init_from_run, class_names=class_names)
    freeze_for_stage(model, stage=config.train.stage)


def freeze_for_stage(model: nn.Module, *, stage: str) -> None:
    """Stage 2 (train.stage=mask) freezes all but the mask branch; other stages train all.

    A stage-2 run's checkpoint is loaded into a model frozen this way: its BatchNorm layers
    outside the mask branch are FrozenBatchNorm2d, whose state has no step counter.
    """
    if stage not in STAGES:
        raise ConfigError(f"train.stage {stage!r}: choose one of {', '.join(STAGES)}")
    if stage == "mask":
        freeze_all_but_mask_branch(model)


def load_detector_from_run(
    model: nn.Module, run_dir: str | Path, *, class_names: Sequence[str] | None = None
) -> None:
    """Copy every weight but the mask branch's from `run_dir`'s last checkpoint."""
    state = load_checkpoint(RunDir(Path(run_dir)).last)
    where = f"model.init_from_run {run_dir}"
    if class_names is not None and list(state["class_names"]) != list(class_names):
        raise ValueError(f"{where}: trained on classes {state['class_names']}, not these")
    theirs = _detector_part(inference_weights(state))
    ours = _detector_part(model.state_dict())
    differ = sorted(set(theirs) ^ set(ours))
    differ += [k for k in theirs.keys() & ours.keys() if theirs[k].shape != ours[k].shape]
    if differ:
        raise ValueError(
            f"{where}: its backbone, RPN or box head differ from this config's "
            f"({', '.join(differ[:5])}); keep the stage-1 settings of every part but the mask head"
        )
    model.load_state_dict(theirs, strict=False)


def _detector_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # a BatchNorm's step counter is absent once frozen and never matters for the weights
    return {
        k: v
        for k, v in state.items()
        if not k.startswith(MASK_BRANCH) and not k.endswith("num_batches_tracked")
    }


def freeze_all_but_mask_branch(model: nn.Module) -> None:
    for name, parameter in model.named_parameters():
        if not name.startswith(MASK_BRANCH):
            parameter.requires_grad_(False)
    _freeze_batchnorm(model, keep=model.get_submodule("roi_heads.mask_head"))


def _freeze_batchnorm(module: nn.Module, *, keep: nn.Module) -> None:
    """Replace BatchNorm layers outside `keep` by FrozenBatchNorm2d with the same statistics:
    in train mode a BatchNorm would normalise with batch statistics and update its own."""
    for name, child in module.named_children():
        if child is keep:
            continue
        if isinstance(child, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            setattr(module, name, _frozen_copy(child))
        else:
            _freeze_batchnorm(child, keep=keep)


def _frozen_copy(bn: nn.BatchNorm2d | nn.SyncBatchNorm) -> FrozenBatchNorm2d:
    """An affine BatchNorm with running statistics (as every everyseg backbone has), frozen."""
    assert bn.running_mean is not None
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps).to(bn.running_mean.device)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(getattr(bn, name))
    return frozen


def load_torchvision_weights(model: nn.Module, source: str) -> None:
    """Initialise from torchvision's COCO Mask R-CNN ("torchvision-coco") or a local .pth.

    Tensors whose shape differs (the class-count-dependent predictors when fine-tuning on
    another label set) are skipped and named, so fine-tuning keeps everything else.
    """
    tv_state = load_state_dict(
        source,
        builtin_name="torchvision-coco",
        builtin=MaskRCNN_ResNet50_FPN_Weights.COCO_V1,
        config_key="model.init",
    )
    state = torchvision_to_everyseg_state(tv_state)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for key in mismatched:
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a transfer or fused predictor has no plain per-class conv to take torchvision's
    replaced = [k for k in unexpected if k.startswith("roi_heads.mask_head.predictor.")]
    unexpected = [k for k in unexpected if k not in replaced]
    if unexpected:
        raise ValueError(f"model.init {source}: keys everyseg does not have: {unexpected[:5]}")
    if mismatched:
        print(f"model.init: re-initialised (shape differs): {', '.join(mismatched)}")
    if missing:
        print(f"model.init: not in {source}, kept freshly initialised: {', '.join(missing)}")
    if replaced:
        print(f"model.init: unused, this model's mask predictor differs: {', '.join(replaced)}")
