"""The training loop: one plain function per step, checkpoints that resume exactly.

Under torchrun every rank runs this loop on its slice of each global batch inside
DistributedDataParallel; rank 0 alone writes the run directory (engine.distributed).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from everyseg.config import Config, ConfigError
from everyseg.data.build import build_dataset
from everyseg.data.coco import CocoInstances, collate
from everyseg.engine import distributed
from everyseg.engine.checkpoint import TrainingState
from everyseg.engine.ema import WeightAverage
from everyseg.engine.initialize import check_stage, initialize_for_training
from everyseg.engine.load import resolve_device
from everyseg.engine.optim import build_optimizer, build_scheduler
from everyseg.engine.precision import autocast, check_training_precision
from everyseg.engine.rng import seed_everything
from everyseg.engine.run_dir import RunDir, RunRecord, trim_log
from everyseg.engine.sampler import StepBatchSampler
from everyseg.engine.tracking import Tracker, logged_seconds, peak_memory, wants_tensorboard
from everyseg.engine.train_outputs import claim_run_dir, save_and_evaluate_when_due
from everyseg.engine.trunk_pretrain import pretrain_trunk
from everyseg.modeling.channels_last import channels_last_layers
from everyseg.modeling.detector import build_model


def to_device(images, targets, device):
    images = [img.to(device, non_blocking=True) for img in images]
    # compact masks stay on the CPU, where their training targets are rasterised
    targets = [
        {
            k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in t.items()
        }
        for t in targets
    ]
    return images, targets


def train_one_step(
    model,
    images,
    targets,
    *,
    optimizer,
    scaler,
    precision: str = "off",
    accumulate: int = 1,
    clip_grad_norm: float | None,
    step: int,
    on_nonfinite: str = "stop",
) -> dict:
    """Forward, backward and update on one batch; returns each loss term as a float.

    The batch goes through in `accumulate` micro-batches of len(images) / accumulate images,
    each copied to the model's device in turn and its losses scaled by 1 / accumulate, so the
    one update sees the mean of the micro-batches' gradients (the full batch's, for losses
    that average per image); the terms returned are the micro-batches' means. `precision` is
    train.amp (off | fp16 | bf16), the autocast of the forward passes.

    A NaN/Inf loss term in any micro-batch raises FloatingPointError naming the step (counted
    from 1, as in log.jsonl) and the term, before any update; with on_nonfinite="skip" the
    update is skipped instead and the result has "skipped" saying why. An update can still
    make the weights non-finite with finite losses: see TrainingState.check_weights.
    """
    device = next(model.parameters()).device
    # a skipped step must not keep what its forward passes did to BatchNorm statistics either
    buffers = [b.detach().clone() for b in model.buffers()] if on_nonfinite == "skip" else []
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = {}
    for chunk_images, chunk_targets in _micro_batches(images, targets, accumulate):
        chunk_images, chunk_targets = to_device(chunk_images, chunk_targets, device)
        with autocast(device, precision):
            losses = model(chunk_images, chunk_targets)
        # the global batch's losses: one NaN on any rank stops (or skips) every rank together
        values = distributed.mean_over_ranks(
            {name: float(v.detach()) for name, v in losses.items()}
        )
        bad = [f"{name} is {value}" for name, value in values.items() if not math.isfinite(value)]
        if bad and on_nonfinite != "skip":
            raise FloatingPointError(
                f"step {step + 1}: {', '.join(bad)}; training stopped "
                "(train.on_nonfinite_loss=skip would skip such steps instead)"
            )
        if bad:
            optimizer.zero_grad(set_to_none=True)  # earlier micro-batches' gradients
            with torch.no_grad():
                for buffer, saved in zip(model.buffers(), buffers):
                    buffer.copy_(saved)
            return {**values, "loss": sum(values.values()), "skipped": ", ".join(bad)}
        scaler.scale(sum(losses.values()) / accumulate).backward()
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + value / accumulate
    if clip_grad_norm is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], clip_grad_norm
        )
    scaler.step(optimizer)
    scaler.update()
    totals["loss"] = sum(totals.values())
    return totals


def _micro_batches(images, targets, accumulate: int):
    """`accumulate` consecutive (images, targets) slices of equal length."""
    size = len(images) // accumulate
    for start in range(0, size * accumulate, size):
        yield images[start : start + size], targets[start : start + size]


def train(cfg: Config, *, out_dir, resume: bool = False, progress: bool = True) -> RunDir:
    """Train `cfg` into the run directory `out_dir`; resume=True continues from its last
    checkpoint as if never interrupted. Inside a process group (distributed.process_group,
    under torchrun) each rank trains on its share of train.batch_size, the global batch."""
    device = distributed.training_device(resolve_device(cfg.train.device))
    _check_train_config(cfg, device)
    run = RunDir(Path(out_dir))
    with ExitStack() as held:
        distributed.on_main(lambda: claim_run_dir(run, cfg, resume=resume, held=held))
        dataset, state = distributed.on_every_rank(lambda: _set_up(cfg, run, device, resume))
        # also a new run's: a run killed before its first checkpoint leaves its log behind
        distributed.on_main(lambda: trim_log(run.log, step=state.step))
        _train_loop(run, state, cfg, dataset, device, progress=progress)
    return run


def _set_up(cfg: Config, run: RunDir, device, resume: bool):
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    seed_everything(cfg.train.seed)
    # stage-wise training's stage 1 trains the detector alone: no instance keeps its mask
    no_masks = "none" if cfg.train.stage == "detector" else None
    dataset = build_dataset(
        cfg.data,
        split="train",
        seed=cfg.train.seed,
        mask_classes=no_masks,
        keypoints=cfg.model.keypoint_head is not None,
    )
    if distributed.is_main():
        print(dataset.summary())
    state = _build_state(cfg, dataset, device, fresh=not resume)
    rank = distributed.rank()
    if rank > 0:
        # the same initial weights on every rank, then each rank its own random draws (RPN
        # and RoI sampling); rank 0 keeps the stream a one-process run has
        seed_everything(int(np.random.SeedSequence([cfg.train.seed, rank]).generate_state(1)[0]))
    if resume:
        state.restore(run.last, rank=rank, world_size=distributed.world_size())
        if distributed.is_main():
            print(f"resumed from {run.last} at step {state.step}")
    return dataset, state


def _check_train_config(cfg: Config, device: torch.device) -> None:
    check_stage(cfg)
    tc, world = cfg.train, distributed.world_size()
    check_training_precision(tc.amp, device)
    wants_tensorboard(tc.tensorboard)  # train.tensorboard=on without the package fails now
    if tc.batch_size % world:
        raise ConfigError(
            f"train.batch_size {tc.batch_size} is the global batch, split evenly over "
            f"the {world} processes: make it a multiple of {world}"
        )
    if (tc.batch_size // world) % tc.accumulate:
        raise ConfigError(
            f"train.accumulate={tc.accumulate} must divide train.batch_size={tc.batch_size}"
            + (f" / {world} processes" if world > 1 else "")
            + ": batch_size is the images per update, split into accumulate equal micro-batches"
        )
    if world > 1 and cfg.model.backbone.norm == "bn" and device.type != "cuda":
        raise ConfigError(
            "model.backbone.norm=bn with several processes needs SyncBatchNorm, which runs on "
            "CUDA only; on the CPU use gn or frozen_bn"
        )


def _build_state(
    cfg: Config, dataset: CocoInstances, device: torch.device, *, fresh: bool
) -> TrainingState:
    classes = dataset.class_names
    d = cfg.data
    keypoints = dataset.index.keypoint_layout if cfg.model.keypoint_head else None
    model = build_model(
        cfg.model,
        num_classes=len(classes) + 1,
        class_names=classes,
        keypoint_names=keypoints.names if keypoints else None,
        min_size=d.min_size,
        max_size=d.max_size,
        test_min_size=d.test_min_size,
    )
    initialize_for_training(model, cfg, class_names=classes)
    if distributed.world_size() > 1 and cfg.model.backbone.norm == "bn":
        # statistics over the global batch, as one process would compute them
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if fresh:  # a resumed run's checkpoint holds the pretrained trunk
        _pretrain_trunk(model, cfg, dataset, device)
    training_layout(model, device)
    optimizer = build_optimizer(model, cfg.train)
    decay = cfg.train.ema_decay
    return TrainingState(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.train),
        # fp16's narrow range needs loss scaling; bf16 has float32's exponent range
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16"),
        record=RunRecord(
            config=cfg.to_dict(),
            class_names=list(dataset.class_names),
            label_to_cat_id=dict(dataset.label_to_cat_id),
            mask_classes=list(dataset.mask_class_names),
            train_instances=dataset.instances_per_class(),
            keypoints=keypoints.to_plain() if keypoints else {},
        ),
        # after the trunk's pretraining: the average starts from the detector's first weights
        ema=WeightAverage(model, decay=decay) if decay else None,
    )


def training_layout(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model`'s weights in the memory layout its training steps run fastest in: on a CPU
    channels-last, which oneDNN's convolutions, the max-pool and the RoIAlign gather
    (modeling/roi_align.py) read without copies: 0.89x a step of the trained baseline-tiny
    at one thread (docs/results.md, twelfth round). The trunk's pretraining on 32-px crops
    runs in the default layout (channels-last: 1.09x), so this comes after it. Its 1 x 1
    convolutions and GroupNorms then become layers faster on such maps, with the same
    parameters (modeling/channels_last.py). On CUDA the layout stays: it pays there only
    under AMP on tensor cores, not measured here."""
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
        channels_last_layers(model)
    return model


def _pretrain_trunk(model, cfg: Config, dataset: CocoInstances, device: torch.device) -> None:
    settings, m = cfg.train.trunk_pretrain, cfg.model
    if settings is None:
        return
    if m.init or m.init_from_run:
        if distributed.is_main():
            print("train.trunk_pretrain skipped: the trunk comes from model.init(_from_run)")
        return
    # every rank runs the same seeded pretraining: equal weights, as DDP wants them
    done = pretrain_trunk(
        model.backbone,
        dataset,
        settings,
        seed=cfg.train.seed,
        device=device,
        progress=distributed.is_main(),
    )
    if distributed.is_main():
        print(
            f"trunk pretrained on {int(done['crops'])} box crops: accuracy "
            f"{done['accuracy']:.2f}, loss {done['loss']:.3f} (its last tenth)"
        )


def _train_loop(run: RunDir, state: TrainingState, cfg: Config, dataset, device, *, progress):
    try:
        _take_steps(run, state, cfg, dataset, device, progress=progress)
    except FloatingPointError as err:
        if run.last.is_file():
            raise FloatingPointError(f"{err}; the last checkpoint, {run.last}, is intact") from err
        raise FloatingPointError(f"{err}; no checkpoint was written") from err


def _take_steps(run: RunDir, state: TrainingState, cfg: Config, dataset, device, *, progress):
    tc = cfg.train
    loader = _loader(dataset, cfg, start_step=state.step, device=device)
    net = _parallel(state.model, device)
    net.train()
    bar = tqdm(
        total=tc.steps,
        initial=state.step,
        disable=not (progress and distributed.is_main()),
        desc="train",
        dynamic_ncols=True,
    )
    main = distributed.is_main()
    with ExitStack() as files, bar:
        log = files.enter_context(run.log.open("a")) if main else None
        tracker = (
            Tracker.open(run.tensorboard, cfg, start_step=state.step) if main else Tracker(None)
        )
        files.callback(tracker.close)
        tic = time.perf_counter()
        # log.jsonl's `time`: seconds of training, a resumed run's clock going on from its log
        start = tic - (logged_seconds(run.log) if main else 0.0)
        for images, targets in loader:
            if state.step >= tc.steps:
                break
            values = train_one_step(
                net,
                images,
                targets,
                optimizer=state.optimizer,
                scaler=state.scaler,
                precision=tc.amp,
                accumulate=tc.accumulate,
                clip_grad_norm=tc.clip_grad_norm,
                step=state.step,
                on_nonfinite=tc.on_nonfinite_loss,
            )
            if state.ema and "skipped" not in values:
                state.ema.update(state.model)
            state.scheduler.step()
            state.step += 1
            bar.update(1)
            shown = {"loss": "loss", "mask": "loss_mask"}  # an FCN's losses have no mask term
            bar.set_postfix({k: f"{values[v]:.3f}" for k, v in shown.items() if v in values})
            if "skipped" in values and distributed.is_main():
                tqdm.write(f"step {state.step}: {values['skipped']}; update skipped")
            if state.step % tc.log_every == 0 or state.step == tc.steps or "skipped" in values:
                record = {"step": state.step, "lr": state.optimizer.param_groups[0]["lr"]}
                now = time.perf_counter()
                record.update(values, seconds_per_step=(now - tic) / tc.log_every)
                record.update(time=round(now - start, 3), **peak_memory(device))
                line = json.dumps(record)
                distributed.on_main(lambda: _append_line(log, line))  # noqa: B023 (called now)
                tracker.scalars(record)
                tic = time.perf_counter()
                # checked when logging too, so that with skipped steps, every step after an
                # update that diverged, a long run does not go on until its next checkpoint
                state.check_weights()
            save_and_evaluate_when_due(run, state, cfg, device, tracker)


def _parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model DistributedDataParallel averages gradients of, with several processes.

    Every parameter that trains gets a gradient each step (the mask loss of a batch without
    masks is a zero that keeps the graph; stage-wise training's frozen parameters do not
    require gradients), so DDP needs no search for unused ones.
    """
    if distributed.world_size() == 1:
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def _append_line(log, line: str) -> None:
    log.write(line + "\n")
    log.flush()


def _loader(
    dataset: CocoInstances, cfg: Config, *, start_step: int, device: torch.device
) -> DataLoader:
    sampler = StepBatchSampler(
        num_items=len(dataset),
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        start_step=start_step,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
        weights=dataset.sample_weights,
    )
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        # page-locked batches: their copies to the GPU (non_blocking) overlap the step
        pin_memory=device.type == "cuda",
        # a private generator: worker seeding must not consume the global RNG a resume restores
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
