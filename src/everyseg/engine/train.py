"""The training loop: one plain function per step, checkpoints that resume exactly."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from everyseg.config import Config, from_dict
from everyseg.data.build import build_dataset
from everyseg.data.coco import CocoInstances, collate
from everyseg.engine.checkpoint import (
    RunDir,
    atomic_write_bytes,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    seed_everything,
    trim_log,
)
from everyseg.engine.initialize import check_stage, initialize_for_training
from everyseg.engine.optim import build_optimizer, build_scheduler
from everyseg.engine.sampler import StepBatchSampler
from everyseg.modeling.detector import build_model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(images, targets, device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
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
    instead and the result has "skipped" saying why.
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
            f"step {step + 1}: {', '.join(bad)}; training stopped, the last checkpoint is "
            "intact (train.on_nonfinite_loss=skip would skip such steps instead)"
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


def run_metadata(cfg: Config, dataset: CocoInstances) -> dict:
    """What a checkpoint needs besides tensors to rebuild, evaluate and label predictions."""
    return {
        "config": cfg.to_dict(),
        "class_names": list(dataset.class_names),
        "label_to_cat_id": dict(dataset.label_to_cat_id),
        "mask_classes": list(dataset.mask_class_names),
    }


@dataclass
class TrainingState:
    """What a checkpoint holds besides the run's metadata: the model, the optimiser, the
    schedule, the AMP scaler and the number of steps taken."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    meta: dict
    step: int = 0

    def save(self, path: Path) -> None:
        save_checkpoint(
            path,
            {
                **self.meta,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "step": self.step,
                "rng": capture_rng(),
            },
        )

    def restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        self.step = int(state["step"])


def train(cfg: Config, *, out_dir, resume: bool = False, progress: bool = True) -> RunDir:
    """Train `cfg` into the run directory `out_dir`; resume=True continues from its last
    checkpoint as if never interrupted."""
    _check_train_config(cfg)
    run = RunDir(Path(out_dir))
    _prepare_run_dir(run, cfg, resume=resume)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    # stage-wise training's stage 1 trains the detector alone: no instance keeps its mask
    no_masks = "none" if cfg.train.stage == "detector" else None
    dataset = build_dataset(cfg.data, split="train", seed=cfg.train.seed, mask_classes=no_masks)
    print(dataset.summary())
    state = _build_state(cfg, dataset, device)
    if resume and run.last.is_file():
        state.restore(run.last)
        print(f"resumed from {run.last} at step {state.step}")
    if resume:
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
        meta=run_metadata(cfg, dataset),
    )


def _train_loop(run: RunDir, state: TrainingState, cfg: Config, dataset, device, *, progress):
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
            _save_and_evaluate_when_due(run, state, cfg, device)


def _save_and_evaluate_when_due(run: RunDir, state: TrainingState, cfg: Config, device) -> None:
    step, tc = state.step, cfg.train
    if step % tc.checkpoint_every == 0 or step == tc.steps:
        state.save(run.last)
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
        import yaml

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
    from everyseg.engine.evaluate_run import evaluate_loaded

    rng = capture_rng()  # evaluation must not change what the next training step sees
    metrics = evaluate_loaded(state.model, cfg, state.meta, device=device, progress=False)
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
