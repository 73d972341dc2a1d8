"""What a training run writes into its run directory besides its log: the config on start
(and, on a resume, which keys changed), the last and kept checkpoints when due, and the best
checkpoint by the evaluations it runs. Rank 0 alone writes (engine.distributed)."""

from __future__ import annotations

import json
from contextlib import ExitStack, nullcontext

import yaml

from everyseg.config import Config, from_dict
from everyseg.engine import distributed
from everyseg.engine.checkpoint import TrainingState
from everyseg.engine.evaluate_run import evaluate_loaded
from everyseg.engine.files import atomic_write_bytes
from everyseg.engine.rng import capture_rng, restore_rng
from everyseg.engine.run_dir import RunDir
from everyseg.engine.tracking import Tracker


def claim_run_dir(run: RunDir, cfg: Config, *, resume: bool, held: ExitStack) -> None:
    """Lock the run directory for the rest of training (`held`) and write its config."""
    if resume and not run.last.is_file():
        raise FileNotFoundError(
            f"no checkpoint in {run.root} to resume ({run.last} does not exist); drop --resume "
            "to start a new run"
        )
    held.enter_context(run.lock())
    _prepare_run_dir(run, cfg, resume=resume)


def save_and_evaluate_when_due(
    run: RunDir, state: TrainingState, cfg: Config, device, tracker: Tracker
) -> None:
    step, tc = state.step, cfg.train
    last = step % tc.checkpoint_every == 0 or step == tc.steps
    keep = bool(tc.keep_every) and step % tc.keep_every == 0
    if last or keep:
        state.check_weights()  # on every rank, so that a diverged model stops them all
        rngs = distributed.gather(capture_rng())  # each rank's random streams, for a resume
        distributed.on_main(lambda: _save(run, state, rngs, last=last, keep=keep))
    if tc.eval_every and step % tc.eval_every == 0 and cfg.data.val_json:
        _evaluate_and_keep_best(run, state, cfg, device, tracker)


def _save(run: RunDir, state: TrainingState, rngs: list, *, last: bool, keep: bool) -> None:
    if last:
        state.save(run.last, rngs=rngs)
        state.export_model(run.model)
    if keep:
        state.save(run.snapshot(state.step), rngs=rngs)


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


def _evaluate_and_keep_best(
    run: RunDir, state: TrainingState, cfg: Config, device, tracker: Tracker
) -> None:
    rng = capture_rng()  # evaluation must not change what the next training step sees
    # the weights the finished run will predict with: the average, where it keeps one
    with state.ema.in_place_of(state.model) if state.ema else nullcontext(state.model) as model:
        # every rank evaluates its share of the val set; all get the metrics
        metrics = evaluate_loaded(model, cfg, state.record, device=device, progress=False)
        classes = state.record.class_names
        # overlays are drawn by the instance Predictor: none for an FCN run
        overlay_model = None if "semantic" in metrics else model.eval()
        tracker.evaluation(state.step, metrics, model=overlay_model, class_names=classes)
    restore_rng(rng)
    state.model.train()
    # the best checkpoint: the highest mask AP, or an FCN run's mean IU (logged as such)
    name, score = (
        ("mean_iu", metrics["semantic"]["mean_iu"])
        if "semantic" in metrics
        else ("segm_AP", metrics["segm"]["all"]["AP"])
    )
    ap = score or 0.0
    distributed.on_main(lambda: _keep_if_best(run, state, ap, name=name))


def _keep_if_best(run: RunDir, state: TrainingState, ap: float, *, name: str) -> None:
    best_file = run.checkpoints / "best.json"
    best = json.loads(best_file.read_text())["AP"] if best_file.is_file() else -1.0
    with run.log.open("a") as log:
        log.write(json.dumps({"step": state.step, "eval": {name: ap}}) + "\n")
    if ap > best:
        state.save(run.best)
        text = json.dumps({"AP": ap, "step": state.step}).encode()
        atomic_write_bytes(best_file, lambda f: f.write(text))
