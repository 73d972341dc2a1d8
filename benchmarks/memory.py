"""Peak memory (RSS) of everyseg's heavy paths, each before and after bounding its masks.

Each case runs in a fresh child process per variant, which reports its RSS after its setup
(model and inputs loaded: the "base") and its peak (ru_maxrss) after the measured work; the
figure that matters is peak - base, the memory the work itself added.

- predict (4000 x 3000): an image with 100 detections (a 1-step maskrcnn-tiny run whose box
  head keeps its top 100 at score threshold 0), predicted and encoded as COCO RLE results.
  "before" is the old path, kept here only as the reference: the eval forward pastes every
  detection as a full-image float mask, then filters and thresholds. "after" is
  Predictor(image) + coco_results. Target: after's peak under base + 300 MB.
- train (1333 x 800): loading one sample with 100 polygon instances and one training step of
  maskrcnn-tiny at that size (a small network, so that what the masks cost shows). "before"
  decodes every polygon into an (N, H, W) mask (the old loader); "after" is the loader's
  CompactMasks (polygons rasterised at the RoIs' M x M only).

    python benchmarks/memory.py [--cases predict train] [--size WxH (overrides each case's)]

CASES maps a case name to (prepare, setup, {variant: work}, default size); add a case there.
The last line prints every case's figures.
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
import pycocotools.mask as mask_utils
import torch

from everyseg.config import load_config
from everyseg.data.compact_masks import CompactMasks, compact
from everyseg.data.segmentation import to_rle
from everyseg.data.synthetic import generate
from everyseg.engine.coco_results import to_coco_results
from everyseg.engine.train import train
from everyseg.modeling.detector import build_model
from everyseg.predictor import Predictor, image_to_tensor

TARGET_MB = 300
DETECTIONS = 100
INSTANCES = 100


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
    predictor = Predictor.from_run(workdir / "run", device="cpu", score_thresh=0.0)
    height, width = size
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return predictor, image


def predict_before(predictor: Predictor, image: np.ndarray) -> str:
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
    return f"{len(results)} detections"


def predict_after(predictor: Predictor, image: np.ndarray) -> str:
    instances = predictor(image)
    return f"{len(predictor.coco_results(instances, image_id=1))} detections"


# --- train ------------------------------------------------------------------------------------


def prepare_train(workdir: Path) -> None:
    """Nothing to prepare: the model trains from random weights."""


def setup_train(workdir: Path, size: tuple[int, int], instances: int = INSTANCES):
    """A maskrcnn-tiny model at the image's size, the image, and `instances` star-shaped
    polygons (COCO JSON lists, as the index reads them) with their boxes."""
    height, width = size
    sets = [f"data.min_size=[{min(size)}]", f"data.max_size={max(size)}"]
    cfg = load_config("maskrcnn-tiny", sets)
    torch.manual_seed(0)
    model = build_model(
        cfg.model, num_classes=3, min_size=[min(size)], max_size=max(size), test_min_size=800
    ).train()
    rng = np.random.default_rng(0)
    polygons, boxes = [], []
    for _ in range(instances):
        radius = rng.uniform(20, 150)
        cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
        angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        r = radius * rng.uniform(0.5, 1.0, angles.size)
        xs, ys = cx + r * np.cos(angles), cy + r * np.sin(angles)
        polygons.append([np.stack([xs, ys], 1).ravel().round(2).tolist()])
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.from_numpy(rng.integers(1, 3, instances)),
        "has_mask": torch.ones(instances, dtype=torch.bool),
    }
    return model, torch.rand(3, height, width), target, polygons


def train_step(model, image, target) -> None:
    losses = model([image], [target])
    sum(losses.values()).backward()


def train_before(model, image, target, polygons) -> str:
    """The old loader: every polygon decoded into an (N, H, W) mask."""
    height, width = image.shape[-2:]
    rles = [to_rle(p, height=height, width=width) for p in polygons]
    masks = torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1)  # (N, H, W) uint8
    train_step(model, image, dict(target, masks=masks))
    return f"the sample's masks {masks.numel() / 1e6:.2f} MB"


def train_after(model, image, target, polygons) -> str:
    height, width = image.shape[-2:]
    segms = [compact(p, height=height, width=width) for p in polygons]
    mask_bytes = sum(array.nbytes for polygon in segms for array in polygon)
    train_step(
        model, image, dict(target, compact_masks=CompactMasks(segms, height=height, width=width))
    )
    return f"the sample's masks {mask_bytes / 1e6:.2f} MB"


# name -> (prepare(workdir) in the parent, setup(workdir, size) -> args, {variant: work(*args)},
# default size W x H)
CASES: dict[str, tuple[Callable, Callable, dict[str, Callable], str]] = {
    "predict": (
        prepare_predict,
        setup_predict,
        {"before": predict_before, "after": predict_after},
        "4000x3000",
    ),
    "train": (
        prepare_train,
        setup_train,
        {"before": train_before, "after": train_after},
        "1333x800",
    ),
}


def child(case: str, variant: str, workdir: Path, size: tuple[int, int]) -> dict:
    torch.set_num_threads(1)
    _, setup, variants, _ = CASES[case]
    args = setup(workdir, size)
    base = rss_peak_mb()
    what = variants[variant](*args)
    return {"base_mb": base, "peak_mb": rss_peak_mb(), "what": what}


def measure(case: str, variant: str, workdir: Path, size: str) -> dict:
    argv = [sys.executable, __file__, "--child", f"{case}:{variant}", "--workdir", str(workdir)]
    done = subprocess.run([*argv, "--size", size], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{case} {variant} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--size", help="image W x H (default: each case's own)")
    parser.add_argument("--workdir", type=Path, help="keep the prepared runs here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, variant = args.child.split(":")
        width, height = (int(side) for side in args.size.split("x"))
        print(json.dumps(child(case, variant, args.workdir, (height, width))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        summary = []
        for case in args.cases:
            prepare, _, variants, default_size = CASES[case]
            size = args.size or default_size
            with contextlib.redirect_stdout(io.StringIO()):  # training's data report
                prepare(workdir)
            added = {}
            for variant in variants:
                figures = measure(case, variant, workdir, size)
                added[variant] = figures["peak_mb"] - figures["base_mb"]
                print(
                    f"{case} {variant}: base (model + inputs) {figures['base_mb']:.0f} MB, "
                    f"peak {figures['peak_mb']:.0f} MB, added {added[variant]:.0f} MB "
                    f"({figures['what']})"
                )
            parts = ", ".join(f"{variant} +{mb:.0f} MB" for variant, mb in added.items())
            summary.append(f"{case} {size}: base {figures['base_mb']:.0f} MB, {parts}")
        print(f"memory added to base (predict target < {TARGET_MB} MB): " + "; ".join(summary))


if __name__ == "__main__":
    main()
