"""`everyseg.train(config, out=...)`: what `everyseg train` does, callable from Python."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from everyseg.config import Config, load_config
from everyseg.config_paths import check_data_exists, with_absolute_paths
from everyseg.engine import distributed
from everyseg.engine.run_dir import RunDir

NUM_OVERLAYS = 8
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def train(
    config: Config | str | Path,
    *,
    out: str | Path,
    overrides: Sequence[str] = (),
    resume: bool = False,
    evaluate: bool = True,
    progress: bool = True,
) -> RunDir:
    """Train `config` (a Config, a preset name or a YAML path, with `overrides` such as
    "train.lr=1e-3") into the run directory `out`, then, if it has a val set, evaluate it
    and draw overlays of a few val images (unless `evaluate=False`); print where everything
    is. Data paths are saved absolute in the run's config.yaml. Under torchrun each process
    calls this alike (`torchrun -m everyseg train ...` does)."""
    from everyseg.engine.evaluate_run import evaluate_run
    from everyseg.engine.load import resolve_device
    from everyseg.engine.train import train as train_steps

    if isinstance(config, Config):
        if overrides:
            raise ValueError("overrides go with a preset name or YAML path; set a Config's fields")
        cfg = config
    else:
        cfg = load_config(config, overrides)
    check_data_exists(cfg)
    cfg = with_absolute_paths(cfg)
    with distributed.process_group(resolve_device(cfg.train.device)):
        run = train_steps(cfg, out_dir=out, resume=resume, progress=progress)
        if cfg.data.val_json and evaluate:
            metrics = evaluate_run(run.root)
            if distributed.is_main():
                _track_final_evaluation(run, cfg, metrics)
            if distributed.is_main() and cfg.data.val_images:
                _write_overlays(run, cfg, Path(cfg.data.val_images))
        if distributed.is_main():
            print(outputs_summary(run))
    return run


def _write_overlays(run: RunDir, cfg: Config, images: Path) -> None:
    from everyseg.predict_files import predict_files
    from everyseg.predictor import Predictor
    from everyseg.semantic_predict import predict_semantic_files

    paths = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if cfg.model.kind == "fcn":  # semantic segmentation: each class's pixels tinted
        predict_semantic_files(run.root, paths[:NUM_OVERLAYS], overlays=run.overlays)
        return
    # a short run scores lower than a converged model: show its confident-ish detections
    predictor = Predictor.from_run(run.root, score_thresh=0.3)
    predict_files(predictor, paths[:NUM_OVERLAYS], overlays=run.overlays)


def _track_final_evaluation(run: RunDir, cfg: Config, metrics: dict) -> None:
    """The final evaluation in TensorBoard too, unless train.eval_every put it there."""
    from everyseg.engine.tracking import Tracker
    from everyseg.predictor import Predictor

    steps, every = cfg.train.steps, cfg.train.eval_every
    if every and steps % every == 0:
        return
    tracker = Tracker.open(run.tensorboard, cfg, start_step=0)
    if tracker.writer is not None and cfg.model.kind == "fcn":
        tracker.evaluation(steps, metrics)  # no instance overlays for semantic segmentation
    elif tracker.writer is not None:
        predictor = Predictor.from_run(run.root)
        tracker.evaluation(steps, metrics, model=predictor.model, class_names=predictor.class_names)
    tracker.close()


def outputs_summary(run: RunDir) -> str:
    """Where a finished run's outputs are, and what to run next."""
    names = [
        "config.yaml",
        "log.jsonl",
        "metrics.json",
        "checkpoints/last.pt",
        "overlays/",
        "tensorboard/",  # with the tensorboard package (train.tensorboard)
    ]
    present = [name for name in names if (run.root / name.rstrip("/")).exists()]
    root = run.root.resolve()
    return (
        f"run directory: {root}\n  {', '.join(present)}\n"
        f"next: everyseg evaluate {root}  |  everyseg predict {root} IMAGE... --out DIR"
    )
