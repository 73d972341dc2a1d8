"""Loading a trained run for inference: the model, its config and its run record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from everyseg.config import Config, ConfigError, from_dict
from everyseg.engine.checkpoint import inference_weights, load_checkpoint
from everyseg.engine.initialize import freeze_for_stage
from everyseg.engine.run_dir import RunDir, RunRecord
from everyseg.modeling.detector import Detector, build_model
from everyseg.modeling.fcn import FCN
from everyseg.modeling.fold_bn import fold_frozen_batchnorm
from everyseg.modeling.mask_heads import MaskHead
from everyseg.modeling.poolers import MultiScaleRoIAlignGather
from everyseg.modeling.winograd import convert_convs


def resolve_device(name: str) -> torch.device:
    """ "auto" | "cpu" | "cuda" | "cuda:N" | "mps" (syntax checked at config load) -> a device
    this machine has; ConfigError naming the device otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count or count == 0:
            raise ConfigError(
                f"device {name!r}: this machine has {count} CUDA device(s); "
                "use cpu, auto or an index below that"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r}: MPS is not available here; use cpu or auto")
    return device


@dataclass
class LoadedRun:
    """A run's model (in eval mode), the config it was built from and its run record."""

    model: Detector | FCN  # FCN: a semantic segmentation run (model.kind=fcn)
    config: Config
    record: RunRecord
    step: int  # training steps the weights have had
    path: Path  # the checkpoint file they came from


def load_run(run_dir, *, checkpoint: str = "last", device: str = "auto") -> LoadedRun:
    """Load `run_dir`'s checkpoint `checkpoint` onto `device`.

    `checkpoint` is "last", "best", "model" (the weights-only export), "step_XXXXXXX", or a
    path to a .pt file (then `run_dir` is not read).
    """
    path = RunDir(Path(run_dir)).checkpoint(checkpoint)
    state = load_checkpoint(path)
    record = RunRecord.from_plain(state, source=path)
    cfg = from_dict(record.config)
    classes, d = record.class_names, cfg.data
    # the architecture alone: every weight, pretrained or trained, is in the checkpoint
    model = build_model(
        cfg.model,
        num_classes=len(classes) + 1,
        class_names=classes,
        keypoint_names=record.keypoints.get("names"),
        min_size=d.min_size,
        max_size=d.max_size,
        test_min_size=d.test_min_size,
    )
    freeze_for_stage(model, stage=cfg.train.stage)
    try:
        model.load_state_dict(inference_weights(state))
    except RuntimeError as err:  # a checkpoint edited, or written by another model
        raise ValueError(
            f"{path}: its weights do not fit the model its config builds: {err}"
        ) from None
    model = ready_for_inference(model.to(resolve_device(device)))
    return LoadedRun(model=model, config=cfg, record=record, step=int(state["step"]), path=path)


def ready_for_inference(model: Detector | FCN) -> Detector | FCN:
    """`model` in eval mode, made faster for predicting with the same outputs within float
    rounding: its frozen batch norms folded into their convolutions (modeling/fold_bn.py),
    and, on a CPU, its RoIAlign poolers gathering (modeling/roi_align.py), its backbone's
    and mask head's convolution weights in channels-last layout, which oneDNN runs faster
    and the gather reads without a copy, and its wide 3 x 3 convolutions computed by
    Winograd's algorithm (modeling/winograd.py; benchmarks/infer_speed.py). Its state dict
    no longer fits a checkpoint: a model readied so is for predicting only."""
    fold_frozen_batchnorm(model)
    for module in model.modules():
        if isinstance(module, MultiScaleRoIAlignGather):
            module.gather_in_inference = True
    if next(model.parameters()).device.type == "cpu":
        # the box and RPN heads stay as they are: on small images (128 px) channels-last
        # heads there were several times slower, while the backbone's gain holds at every
        # size; so does the mask head's (its RoIs are M x M whatever the image's size)
        model.backbone.to(memory_format=torch.channels_last)
        for module in model.modules():
            if isinstance(module, MaskHead):
                module.to(memory_format=torch.channels_last)
        convert_convs(model)
    return model.eval()
