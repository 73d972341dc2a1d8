"""Mask^X R-CNN's training strategies: end-to-end, or stage-wise (`train.stage`).

  end_to_end  every part trains on every loss (the default).
  detector    stage 1: backbone, RPN and box head train on the boxes of all classes. The
              train set is loaded without masks (as data.mask_classes=none), so the mask
              branch sees no RoI and costs nothing; mask AP of such a run means nothing.
  mask        stage 2: starts from a stage-1 run (model.init_from_run=DIR) and trains only
              the mask branch (roi_heads.mask_head). Backbone, RPN and box head are frozen:
              requires_grad False, so the optimizer never holds them, and their BatchNorm
              layers become FrozenBatchNorm2d with the stage-1 statistics, so the features are
              the stage-1 detector's in training and at test time alike.

`model.init_from_run` can also start an end-to-end run from a trained detector.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from everyseg.config import Config, ConfigError
from everyseg.engine.checkpoint import load_checkpoint
from everyseg.engine.run_dir import RunDir

STAGES = ("end_to_end", "detector", "mask")
MASK_BRANCH = "roi_heads.mask_head."


def check_stage(config: Config) -> None:
    """A training run's stage settings, checked before anything is loaded."""
    if config.train.stage not in STAGES:
        raise ConfigError(f"train.stage {config.train.stage!r}: choose one of {', '.join(STAGES)}")
    if config.train.stage == "mask" and config.model.init_from_run is None:
        raise ConfigError(
            "train.stage=mask trains only the mask branch of a trained detector: set "
            "model.init_from_run to a stage-1 (train.stage=detector) run directory"
        )


def apply_stage(
    model: nn.Module,
    *,
    stage: str,
    init_from_run: str | None,
    class_names: Sequence[str] | None = None,
) -> None:
    """Load the detector from `init_from_run` if given; freeze all but the mask branch in
    stage 2. Stage 1 needs nothing here: it is a matter of data (see train()).

    A stage-2 model is rebuilt frozen without `init_from_run` to load its own checkpoint.
    """
    if stage not in STAGES:
        raise ConfigError(f"train.stage {stage!r}: choose one of {', '.join(STAGES)}")
    if init_from_run is not None:
        load_detector_from_run(model, init_from_run, class_names=class_names)
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
    theirs = _detector_part(state["model"])
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
    _freeze_batchnorm(model, keep=model.roi_heads.mask_head)


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


def _frozen_copy(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    """An affine BatchNorm with running statistics (as every everyseg backbone has), frozen."""
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps).to(bn.running_mean.device)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(getattr(bn, name))
    return frozen
