"""Peak memory (RSS) of everyseg's heavy paths, each before and after bounding its masks.

Each case runs in a fresh child process per variant, which reports its RSS after its setup
(model and inputs loaded: the "base") and its peak (ru_maxrss) after the measured work; the
figure that matters is peak - base, the memory the work itself added.

- predict: a 4000 x 3000 image with 100 detections (a 1-step maskrcnn-tiny run whose box head
  keeps its top 100 at score threshold 0), predicted and encoded as COCO RLE results.
  "before" is the old path, kept here only as the reference: the eval forward pastes every
  detection as a full-image float mask, then filters and thresholds. "after" is
  Predictor(image) + coco_results. Target: after's peak under base + 300 MB.

    python benchmarks/memory.py [--cases predict] [--size 4000x3000]

CASES maps a case name to (setup, {variant: work}); add a case there. The last line prints
every case's figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from everyseg.config import load_config
from everyseg.data.synthetic import generate
from everyseg.engine.coco_results import to_coco_results
from everyseg.engine.train import train
from everyseg.predictor import Predictor, image_to_tensor

TARGET_MB = 300
DETECTIONS = 100


def rss_peak_mb() -> float:
    """This process's peak resident set size so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- predict ----------------------------------------------------------------------------------


def prepare_predict(workdir: Path) -> None:
    """A 1-step maskrcnn-tiny run in `workdir/run` that keeps 100 detections per image."""
    if (workdir / "run/checkpoints/last.pt").is_file():
        return
    paths = generate(workdir / "synth", num_train=2, num_val=1, size=64, seed=0, progress=False)
    sets = [f"data.{key}={value}" for key, value in paths.items()]
    sets += ["train.steps=1", "train.batch_size=1", "data.num_workers=0"]
    sets += ["model.box_head.score_thresh=0.0", f"model.box_head.detections_per_img={DETECTIONS}"]
    train(load_config("maskrcnn-tiny", sets), out_dir=workdir / "run", progress=False)


def setup_predict(workdir: Path, size: tuple[int, int]):
    predictor = Predictor(workdir / "run", device="cpu", score_thresh=0.0)
    height, width = size
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return predictor, image


def predict_before(predictor: Predictor, image: np.ndarray) -> int:
    """The old Predictor.__call__ + coco_results: paste all, filter, threshold, encode."""
    with torch.inference_mode():
        output = predictor.model([image_to_tensor(image)])[0]  # masks (N, 1, H, W) float32
    keep = output["scores"] >= predictor.score_thresh
    probs = output["masks"][keep, 0].numpy()  # (N, H, W) float32
    masks = probs >= predictor.mask_thresh  # the old Instances.masks
    kept = {key: value[keep] for key, value in output.items() if key != "masks"}
    results = to_coco_results(
        {**kept, "masks": torch.from_numpy(probs)[:, None]},
        image_id=1,
        label_to_cat_id=predictor.label_to_cat_id,
        mask_threshold=predictor.mask_thresh,
    )
    assert len(masks) == len(results)
    return len(results)


def predict_after(predictor: Predictor, image: np.ndarray) -> int:
    instances = predictor(image)
    return len(predictor.coco_results(instances, image_id=1))


# name -> (prepare(workdir) in the parent, setup(workdir, size) -> args, {variant: work(*args)})
CASES: dict[str, tuple[Callable, Callable, dict[str, Callable]]] = {
    "predict": (prepare_predict, setup_predict, {"before": predict_before, "after": predict_after}),
}


def child(case: str, variant: str, workdir: Path, size: tuple[int, int]) -> dict:
    torch.set_num_threads(1)
    _, setup, variants = CASES[case]
    args = setup(workdir, size)
    base = rss_peak_mb()
    count = variants[variant](*args)
    return {"base_mb": base, "peak_mb": rss_peak_mb(), "detections": count}


def measure(case: str, variant: str, workdir: Path, size: str) -> dict:
    argv = [sys.executable, __file__, "--child", f"{case}:{variant}", "--workdir", str(workdir)]
    done = subprocess.run([*argv, "--size", size], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{case} {variant} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--size", default="4000x3000", help="image W x H")
    parser.add_argument("--workdir", type=Path, help="keep the prepared runs here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    width, height = (int(side) for side in args.size.split("x"))
    if args.child:
        case, variant = args.child.split(":")
        print(json.dumps(child(case, variant, args.workdir, (height, width))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        summary = []
        for case in args.cases:
            prepare, _, variants = CASES[case]
            with contextlib.redirect_stdout(io.StringIO()):  # training's data report
                prepare(workdir)
            added = {}
            for variant in variants:
                figures = measure(case, variant, workdir, args.size)
                added[variant] = figures["peak_mb"] - figures["base_mb"]
                print(
                    f"{case} {variant}: base (model + inputs) {figures['base_mb']:.0f} MB, "
                    f"peak {figures['peak_mb']:.0f} MB, added {added[variant]:.0f} MB "
                    f"({figures['detections']} detections)"
                )
            parts = ", ".join(f"{variant} +{mb:.0f} MB" for variant, mb in added.items())
            summary.append(f"{case}: base {figures['base_mb']:.0f} MB, {parts}")
        print(f"memory {args.size}, added to base, target < {TARGET_MB} MB: " + "; ".join(summary))


if __name__ == "__main__":
    main()
