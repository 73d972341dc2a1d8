"""`everyseg demo`: the whole job on built-in data, in minutes on a CPU."""

from __future__ import annotations

import time
from pathlib import Path

from everyseg.config import load_config
from everyseg.config_paths import with_absolute_paths
from everyseg.data.synthetic import generate
from everyseg.engine.evaluate_run import evaluate_run
from everyseg.engine.run_dir import RunDir
from everyseg.engine.train import train
from everyseg.predict_files import predict_files
from everyseg.predictor import Predictor

DEMO_PRESET = "baseline-tiny"
NUM_OVERLAYS = 8


def run_demo(out: Path, *, steps: int, num_train: int, num_val: int) -> dict:
    """Synthesize shapes, train the class-agnostic baseline with masks for half the classes,
    evaluate seen/unseen mask AP and draw overlays. Re-running continues a killed demo."""
    out = Path(out)
    start = time.perf_counter()
    paths = generate(out / "data", num_train=num_train, num_val=num_val, size=128, seed=0)
    overrides = [f"data.{key}={value}" for key, value in paths.items()]
    # under half the preset's schedule: the whole demo takes under 10 minutes on the slower of
    # the 2-core machines measured (README), for box AP ~30 (~51 at the preset's 2,300 steps)
    overrides.append(f"train.steps={steps}")
    cfg = with_absolute_paths(load_config(DEMO_PRESET, overrides))
    run = RunDir(out / "run")
    train(cfg, out_dir=run.root, resume=run.last.is_file())
    metrics = evaluate_run(run.root)
    _write_overlays(run, Path(paths["val_images"]))
    segm = metrics["segm"]
    print(
        f"\ndemo done in {time.perf_counter() - start:.0f} s: masks for "
        f"{', '.join(metrics['seen_classes'])}\n"
        f"mask AP  seen {_fmt(segm['seen']['AP'])}  unseen {_fmt(segm['unseen']['AP'])}  "
        f"all {_fmt(segm['all']['AP'])}   box AP {_fmt(metrics['bbox']['all']['AP'])}\n"
        f"run directory: {run.root}  (metrics.json, overlays/, log.jsonl, checkpoints/)"
    )
    return metrics


def _write_overlays(run: RunDir, images_dir: Path) -> None:
    # a short CPU run scores lower than a converged model: show its confident-ish detections,
    # one label per object (a person reads an overlay, COCO AP does not)
    predictor = Predictor.from_run(run.root, score_thresh=0.3, cross_class_nms=0.5)
    paths = sorted(images_dir.glob("*.png"))[:NUM_OVERLAYS]
    predict_files(predictor, paths, overlays=run.overlays)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"
