"""Peak memory (RSS) of loading a training sample and one training step: dense masks against
everyseg's compact masks (polygons rasterised at the RoIs' M x M only).

The case: one 1333 x 800 image with 100 polygon instances, maskrcnn-tiny at data.min_size 800,
data.max_size 1333 (a small network, so that what the masks cost shows). "before" is the old
path, kept here as the reference: the loader decodes every polygon into an (N, H, W) uint8
mask, torchvision's transform resizes it as floats, the RoI targets are cut from it. "after"
is the loader's CompactMasks. Each variant runs in a fresh child process, which reports its
RSS after setup (model, image and polygons: the "base") and its peak (ru_maxrss) after the
work; peak - base is what loading and the step added.

    python benchmarks/memory_train.py [--size 1333x800] [--instances 100]

Written in the shape of benchmarks/memory.py's CASES (prepare, setup, {variant: work}), so
the case can move there. The last line prints both figures and their ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch

from everyseg.config import load_config
from everyseg.data.compact_masks import CompactMasks, compact
from everyseg.data.segmentation import to_rle
from everyseg.modeling.detector import build_model


def rss_peak_mb() -> float:
    """This process's peak resident set size so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare_train(workdir: Path) -> None:
    """Nothing to prepare: the model trains from random weights."""


def setup_train(workdir: Path, size: tuple[int, int], instances: int = 100):
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


def train_before(model, image, target, polygons) -> int:
    """The old loader: every polygon decoded into an (N, H, W) mask. Returns the bytes of
    masks the sample carries (as train_after)."""
    height, width = image.shape[-2:]
    rles = [to_rle(p, height=height, width=width) for p in polygons]
    masks = torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1)  # (N, H, W) uint8
    train_step(model, image, dict(target, masks=masks))
    return masks.numel()


def train_after(model, image, target, polygons) -> int:
    height, width = image.shape[-2:]
    segms = [compact(p, height=height, width=width) for p in polygons]
    mask_bytes = sum(array.nbytes for polygon in segms for array in polygon)
    train_step(
        model, image, dict(target, compact_masks=CompactMasks(segms, height=height, width=width))
    )
    return mask_bytes


CASE = (prepare_train, setup_train, {"before": train_before, "after": train_after})


def child(variant: str, workdir: Path, size: tuple[int, int], instances: int) -> dict:
    torch.set_num_threads(1)
    _, setup, variants = CASE
    args = setup(workdir, size, instances)
    base = rss_peak_mb()
    count = variants[variant](*args)
    return {"base_mb": base, "peak_mb": rss_peak_mb(), "mask_bytes": count}


def measure(variant: str, size: str, instances: int) -> dict:
    argv = [sys.executable, __file__, "--child", variant, "--size", size]
    done = subprocess.run([*argv, "--instances", str(instances)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"train {variant} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1333x800", help="image W x H")
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    width, height = (int(side) for side in args.size.split("x"))
    if args.child:
        print(json.dumps(child(args.child, Path("."), (height, width), args.instances)))
        return
    added = {}
    for variant in CASE[2]:
        figures = measure(variant, args.size, args.instances)
        added[variant] = figures["peak_mb"] - figures["base_mb"]
        print(
            f"train {variant}: base (model + image) {figures['base_mb']:.0f} MB, "
            f"peak {figures['peak_mb']:.0f} MB, added {added[variant]:.0f} MB; "
            f"the sample's masks: {figures['mask_bytes'] / 1e6:.2f} MB"
        )
    print(
        f"memory_train {args.size}, {args.instances} polygons, loading + 1 step added: "
        f"before (dense masks) +{added['before']:.0f} MB, after (compact) "
        f"+{added['after']:.0f} MB, ratio after/before {added['after'] / added['before']:.3f}"
    )


if __name__ == "__main__":
    main()
