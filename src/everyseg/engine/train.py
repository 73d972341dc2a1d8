"""The training loop: one plain function per step, checkpoints that resume exactly."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from everyseg.config import Config, from_dict
from everyseg.data.build import build_dataset
from everyseg.data.coco import CocoInstances, collate
from everyseg.engine.checkpoint import TrainingState
from everyseg.engine.evaluate_run import evaluate_loaded
from everyseg.engine.files import atomic_write_bytes
from everyseg.engine.initialize import check_stage, initialize_for_training
from everyseg.engine.load import resolve_device
from everyseg.engine.optim import build_optimizer, build_scheduler
from everyseg.engine.rng import capture_rng, restore_rng, seed_everything
from everyseg.engine.run_dir import RunDir, RunRecord, trim_log
from everyseg.engine.sampler import StepBatchSampler
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
    amp: bool,
    clip_grad_norm: float | None,
    step: int,
    on_nonfinite: str = "stop",
) -> dict:
    """Forward, backward and update on one batch; returns each loss term as a float.

    A NaN/Inf loss term raises FloatingPointError naming the step (counted from 1, as in
    log.jsonl) and the term, before any update; with on_nonfinite="skip" the update is skipped
    instead and the result has "skipped" saying why. An update can still make the weights
    non-finite with finite losses: see TrainingState.check_weights.
    """
    device_type = images[0].device.type
    # a skipped step must not keep what its forward pass did to BatchNorm statistics either
    buffers = [b.detach().clone() for b in model.buffers()] if on_nonfinite == "skip" else []
    with torch.autocast(device_type=device_type, enabled=amp):
        losses = model(images, targets)
    total = sum(losses.values())
    values = {name: float(v.detach()) for name, v in losses.items()}
    bad = [f"{name} is {value}" for name, value in values.items() if not math.isfinite(value)]
    if bad and on_nonfinite != "skip":
        raise FloatingPointError(
            f"step {step + 1}: {', '.join(bad)}; training stopped "
            "(train.on_nonfinite_loss=skip would skip such steps instead)"
        )
    if bad:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
        return {**values, "loss": sum(values.values()), "skipped": ", ".join(bad)}
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if clip_grad_norm is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], clip_grad_norm
        )
    scaler.step(optimizer)
    scaler.update()
    values["loss"] = sum(values.values())
    return values


def train(cfg: Config, *, out_dir, resume: bool = False, progress: bool = True) -> RunDir:
    """Train `cfg` into the run directory `out_dir`; resume=True continues from its last
    checkpoint as if never interrupted."""
    _check_train_config(cfg)
    run = RunDir(Path(out_dir))
    if resume and not run.last.is_file():
        raise FileNotFoundError(
            f"no checkpoint in {run.root} to resume ({run.last} does not exist); drop --resume "
            "to start a new run"
        )
    with run.lock():
        _prepare_run_dir(run, cfg, resume=resume)
        device = resolve_device(cfg.train.device)
        seed_everything(cfg.train.seed)
        # stage-wise training's stage 1 trains the detector alone: no instance keeps its mask
        no_masks = "none" if cfg.train.stage == "detector" else None
        dataset = build_dataset(cfg.data, split="train", seed=cfg.train.seed, mask_classes=no_masks)
        print(dataset.summary())
        state = _build_state(cfg, dataset, device)
        if resume:
            state.restore(run.last)
            print(f"resumed from {run.last} at step {state.step}")
        # also a new run's: a run killed before its first checkpoint leaves its log behind
        trim_log(run.log, step=state.step)
        _train_loop(run, state, cfg, dataset, device, progress=progress)
    return run


def _check_train_config(cfg: Config) -> None:
    check_stage(cfg)


def _build_state(cfg: Config, dataset: CocoInstances, device: torch.device) -> TrainingState:
    classes = dataset.class_names
    d = cfg.data
    model = build_model(
        cfg.model,
        num_classes=len(classes) + 1,
        class_names=classes,
        min_size=d.min_size,
        max_size=d.max_size,
        test_min_size=d.test_min_size,
    )
    initialize_for_training(model, cfg, class_names=classes)
    model.to(device)
    optimizer = build_optimizer(model, cfg.train)
    amp = cfg.train.amp and device.type == "cuda"
    return TrainingState(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.train),
        scaler=torch.amp.GradScaler(device.type, enabled=amp),
        record=RunRecord(
            config=cfg.to_dict(),
            class_names=list(dataset.class_names),
            label_to_cat_id=dict(dataset.label_to_cat_id),
            mask_classes=list(dataset.mask_class_names),
        ),
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
    loader = _loader(dataset, cfg, start_step=state.step)
    state.model.train()
    bar = tqdm(
        total=tc.steps, initial=state.step, disable=not progress, desc="train", dynamic_ncols=True
    )
    with run.log.open("a") as log, bar:
        tic = time.perf_counter()
        for images, targets in loader:
            if state.step >= tc.steps:
                break
            images, targets = to_device(images, targets, device)
            values = train_one_step(
                state.model,
                images,
                targets,
                optimizer=state.optimizer,
                scaler=state.scaler,
                amp=state.scaler.is_enabled(),
                clip_grad_norm=tc.clip_grad_norm,
                step=state.step,
                on_nonfinite=tc.on_nonfinite_loss,
            )
            state.scheduler.step()
            state.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.3f}", mask=f"{values['loss_mask']:.3f}")
            if "skipped" in values:
                tqdm.write(f"step {state.step}: {values['skipped']}; update skipped")
            if state.step % tc.log_every == 0 or state.step == tc.steps or "skipped" in values:
                record = {"step": state.step, "lr": state.optimizer.param_groups[0]["lr"]}
                record.update(values, seconds_per_step=(time.perf_counter() - tic) / tc.log_every)
                log.write(json.dumps(record) + "\n")
                log.flush()
                tic = time.perf_counter()
                # checked when logging too, so that with skipped steps, every step after an
                # update that diverged, a long run does not go on until its next checkpoint
                state.check_weights()
            _save_and_evaluate_when_due(run, state, cfg, device)


def _save_and_evaluate_when_due(run: RunDir, state: TrainingState, cfg: Config, device) -> None:
    step, tc = state.step, cfg.train
    if step % tc.checkpoint_every == 0 or step == tc.steps:
        state.save(run.last)
        state.export_model(run.model)
    if tc.keep_every and step % tc.keep_every == 0:
        state.save(run.snapshot(step))
    if tc.eval_every and step % tc.eval_every == 0 and cfg.data.val_json:
        _evaluate_and_keep_best(run, state, cfg, device)


def _prepare_run_dir(run: RunDir, cfg: Config, *, resume: bool) -> None:
    if run.last.is_file() and not resume:
        raise FileExistsError(
            f"{run.root} already holds a run ({run.last}); pass --resume to continue it or "
            "choose another --out"
        )
    if resume and run.config.is_file():
        previous = from_dict(yaml.safe_load(run.config.read_text()))
        changed = _changed_keys(previous.to_dict(), cfg.to_dict())
        if changed:
            print(f"resuming with a changed config: {', '.join(changed)}")
    text = cfg.to_yaml().encode()
    atomic_write_bytes(run.config, lambda f: f.write(text))


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def _loader(dataset: CocoInstances, cfg: Config, *, start_step: int) -> DataLoader:
    sampler = StepBatchSampler(
        num_items=len(dataset),
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        start_step=start_step,
    )
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        # a private generator: worker seeding must not consume the global RNG a resume restores
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )


def _evaluate_and_keep_best(run: RunDir, state: TrainingState, cfg: Config, device) -> None:
    rng = capture_rng()  # evaluation must not change what the next training step sees
    metrics = evaluate_loaded(state.model, cfg, state.record, device=device, progress=False)
    restore_rng(rng)
    state.model.train()
    ap = metrics["segm"]["all"]["AP"] or 0.0
    best_file = run.checkpoints / "best.json"
    best = json.loads(best_file.read_text())["AP"] if best_file.is_file() else -1.0
    with run.log.open("a") as log:
        log.write(json.dumps({"step": state.step, "eval": {"segm_AP": ap}}) + "\n")
    if ap > best:
        state.save(run.best)
        text = json.dumps({"AP": ap, "step": state.step}).encode()
        atomic_write_bytes(best_file, lambda f: f.write(text))
