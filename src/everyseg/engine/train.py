"""The training loop: one plain function per step, checkpoints that resume exactly."""

from __future__ import annotations

import json
import math
import time
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
)
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
    model, images, targets, *, optimizer, scaler, amp: bool, clip_grad_norm: float | None, step: int
) -> dict[str, float]:
    """Forward, backward and update on one batch; returns each loss term as a float."""
    device_type = images[0].device.type
    with torch.autocast(device_type=device_type, enabled=amp):
        losses = model(images, targets)
    total = sum(losses.values())
    values = {name: float(v.detach()) for name, v in losses.items()}
    for name, value in values.items():
        if not math.isfinite(value):
            raise FloatingPointError(
                f"step {step}: {name} is {value}; training stopped, the last checkpoint is intact"
            )
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


def train(cfg: Config, *, out_dir, resume: bool = False, progress: bool = True) -> RunDir:
    run = RunDir(Path(out_dir))
    _prepare_run_dir(run, cfg, resume=resume)
    tc = cfg.train
    device = resolve_device(tc.device)
    amp = tc.amp and device.type == "cuda"
    seed_everything(tc.seed)
    dataset = build_dataset(cfg.data, split="train", seed=tc.seed)
    print(dataset.summary())
    model = build_model(cfg, num_classes=len(dataset.class_names) + 1).to(device)
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    step = 0
    if resume and run.last.is_file():
        step = _restore(load_checkpoint(run.last), model, optimizer, scheduler, scaler)
        print(f"resumed from {run.last} at step {step}")
    meta = run_metadata(cfg, dataset)

    def checkpoint(path: Path) -> None:
        save_checkpoint(
            path,
            {
                **meta,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "rng": capture_rng(),
            },
        )

    loader = _loader(dataset, cfg, start_step=step)
    model.train()
    bar = tqdm(total=tc.steps, initial=step, disable=not progress, desc="train", dynamic_ncols=True)
    with run.log.open("a") as log, bar:
        tic = time.perf_counter()
        for images, targets in loader:
            if step >= tc.steps:
                break
            images, targets = to_device(images, targets, device)
            values = train_one_step(
                model,
                images,
                targets,
                optimizer=optimizer,
                scaler=scaler,
                amp=amp,
                clip_grad_norm=tc.clip_grad_norm,
                step=step,
            )
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.3f}", mask=f"{values['loss_mask']:.3f}")
            if step % tc.log_every == 0 or step == tc.steps:
                record = {"step": step, "lr": optimizer.param_groups[0]["lr"], **values}
                record["seconds_per_step"] = (time.perf_counter() - tic) / tc.log_every
                log.write(json.dumps(record) + "\n")
                log.flush()
                tic = time.perf_counter()
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                checkpoint(run.last)
            if tc.keep_every and step % tc.keep_every == 0:
                checkpoint(run.snapshot(step))
            if tc.eval_every and step % tc.eval_every == 0 and cfg.data.val_json:
                _evaluate_and_keep_best(run, model, cfg, meta, checkpoint, step, device)
    return run


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


def _restore(state, model, optimizer, scheduler, scaler) -> int:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    return int(state["step"])


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


def _evaluate_and_keep_best(run, model, cfg, meta, checkpoint, step, device) -> None:
    from everyseg.engine.evaluate_run import evaluate_loaded

    rng = capture_rng()  # evaluation must not change what the next training step sees
    metrics = evaluate_loaded(model, cfg, meta, device=device, progress=False)
    restore_rng(rng)
    model.train()
    ap = metrics["segm"]["all"]["AP"] or 0.0
    best_file = run.checkpoints / "best.json"
    best = json.loads(best_file.read_text())["AP"] if best_file.is_file() else -1.0
    with run.log.open("a") as log:
        log.write(json.dumps({"step": step, "eval": {"segm_AP": ap}}) + "\n")
    if ap > best:
        checkpoint(run.best)
        text = json.dumps({"AP": ap, "step": step}).encode()
        atomic_write_bytes(best_file, lambda f: f.write(text))
