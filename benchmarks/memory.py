"""Peak memory (RSS) of everyseg's heavy paths, each before and after bounding its masks.

Each case runs in a fresh child process per variant, which reports its RSS after its setup
(model and inputs loaded: the "base") and its peak (ru_maxrss) after the measured work; the
figure that matters is peak - base, the memory the work itself added.

- predict (4000 x 3000): an image with 100 detections (a 1-step maskrcnn-tiny run whose box
  head keeps its top 100 at score threshold 0), predicted and encoded as COCO RLE results.
  "before" is the old path, kept here only as the reference: the eval forward pastes every
  detection as a full-image float mask, then filters and thresholds. "after" is
  Predictor(image) + coco_results. Target: after's peak under base + 300 MB.
- overlay (4000 x 3000): drawing the predict case's 100 detections on the image. "before"
  makes every mask a full-image plane for torchvision's draw_segmentation_masks (the old
  draw_overlay), "after" is draw_overlay (each mask painted in its region). The setup
  predicts, so a peak that stays under the setup's shows as +0.
- train (1333 x 800): loading one sample with 100 polygon instances and one training step of
  maskrcnn-tiny at that size (a small network, so that what the masks cost shows). "before"
  decodes every polygon into an (N, H, W) mask (the old loader); "after" is the loader's
  CompactMasks (polygons rasterised at the RoIs' M x M only).
- load (a ~25 MB COCO JSON: 4000 images, 48,000 annotations, polygons and RLE): building the
  training set (`build_dataset`): peak and retained RSS over the base (imports and config),
  then the private memory (USS, and PSS) of 2 DataLoader workers, right after they start and
  after one epoch, each time after a garbage collection: copy-on-write pages of the parent's
  objects the workers touched (a bare worker, with no data set, holds ~90 MB here).
  "before" runs the loader of git revision BEFORE_REV["load"] (extracted to a temporary
  folder, `--before-rev` to change it), "after" the working tree's.
- sources: the load case's file as a COCO source with masks, plus a box-only VG-style source
  (4000 images, half of them the COCO source's through `coco_id`, 40 boxes each, 1,000
  classes), merged (data.train_sources); figures as in the load case. "before" is
  BEFORE_REV["sources"] (merged instances as Python objects), "after" the working tree's.

    python benchmarks/memory.py [--cases predict overlay train load sources]
        [--size WxH (overrides each case's)]

CASES maps a case name to (prepare, setup, {variant: work}, default size); add a case there.
The last line prints every case's figures.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image
from torchvision.utils import draw_segmentation_masks

from everyseg.config import load_config
from everyseg.data.build import build_dataset
from everyseg.data.compact_masks import CompactMasks, compact
from everyseg.data.segmentation import to_rle
from everyseg.data.synthetic import generate
from everyseg.engine.coco_results import to_coco_results
from everyseg.engine.train import train
from everyseg.modeling.detector import build_model
from everyseg.predictor import Predictor, draw_overlay, image_to_tensor

TARGET_MB = 300
DETECTIONS = 100
INSTANCES = 100
LOAD_IMAGES, LOAD_ANNOTATIONS_PER_IMAGE, LOAD_CLASSES = 4000, 12, 80
LOAD_WORKERS = 2
VG_BOXES_PER_IMAGE, VG_CLASSES = 40, 1000
# main before the loader stored instances as columns / before merged sources did
BEFORE_REV = {"load": "541eb36", "sources": "1620c24"}


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


def setup_overlay(workdir: Path, size: tuple[int, int]):
    predictor, image = setup_predict(workdir, size)
    return image, predictor(image)


def overlay_before(image: np.ndarray, instances) -> str:
    """The old draw_overlay's masks: every mask a full-image plane for torchvision's drawing."""
    canvas = torch.from_numpy(image).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
    colors = [(255, 0, 0)] * len(instances)
    draw_segmentation_masks(canvas, torch.from_numpy(instances.masks), alpha=0.45, colors=colors)
    return f"{len(instances)} masks drawn"


def overlay_after(image: np.ndarray, instances) -> str:
    draw_overlay(image, instances)  # masks, boxes and captions
    return f"{len(instances)} masks drawn"


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


# --- load -------------------------------------------------------------------------------------


def prepare_load(workdir: Path) -> None:
    """A COCO JSON of LOAD_IMAGES images (one PNG, hard-linked) with polygon and RLE masks."""
    json_path = workdir / "load/train.json"
    if json_path.is_file():
        return
    images = workdir / "load/images"
    images.mkdir(parents=True)
    (width, height), rng = (640, 480), np.random.default_rng(0)
    png = images / "1.png"
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(png)
    entries, annotations = [], []
    for image_id in range(1, LOAD_IMAGES + 1):
        if image_id > 1:
            os.link(png, images / f"{image_id}.png")
        entries.append({"id": image_id, "file_name": f"{image_id}.png", "width": width,
                        "height": height})  # fmt: skip
        for _ in range(LOAD_ANNOTATIONS_PER_IMAGE):
            annotations.append(_load_annotation(rng, len(annotations) + 1, image_id, width, height))
    categories = [{"id": i, "name": f"class {i}"} for i in range(1, LOAD_CLASSES + 1)]
    data = {"images": entries, "annotations": annotations, "categories": categories}
    json_path.write_text(json.dumps(data, separators=(",", ":")))


def _load_annotation(rng, ann_id: int, image_id: int, width: int, height: int) -> dict:
    """A star-shaped object: 3 in 4 as a polygon, 1 in 4 as a compressed RLE (COCO's split)."""
    radius = rng.uniform(10, 60)
    cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
    angles = np.linspace(0, 2 * np.pi, int(rng.integers(12, 40)), endpoint=False)
    r = radius * rng.uniform(0.5, 1.0, angles.size)
    xs, ys = cx + r * np.cos(angles), cy + r * np.sin(angles)
    polygon = np.stack([xs, ys], 1).ravel().round(2).tolist()
    segm: list | dict = [polygon]
    if rng.random() < 0.25:
        rle = to_rle(segm, height=height, width=width)
        segm = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    box = [round(float(xs.min()), 2), round(float(ys.min()), 2)]
    box += [round(float(xs.max()) - box[0], 2), round(float(ys.max()) - box[1], 2)]
    return {"id": ann_id, "image_id": image_id, "category_id": int(rng.integers(1, LOAD_CLASSES)),
            "bbox": box, "area": box[2] * box[3], "iscrowd": 0, "segmentation": segm}  # fmt: skip


def setup_load(workdir: Path, size: tuple[int, int]):
    root = workdir / "load"
    sets = [f"data.train_json={root / 'train.json'}", f"data.train_images={root / 'images'}"]
    return (load_config("maskrcnn-tiny", sets).data,)


def prepare_sources(workdir: Path) -> None:
    """The load case's COCO file, and a box-only source sharing half its images."""
    prepare_load(workdir)
    json_path = workdir / "load/vg.json"
    if json_path.is_file():
        return
    (width, height), rng = (640, 480), np.random.default_rng(1)
    entries, annotations = [], []
    for image_id in range(1, LOAD_IMAGES + 1):
        entry = {"id": 10**6 + image_id, "file_name": f"{image_id}.png", "width": width,
                 "height": height}  # fmt: skip
        if image_id % 2:
            entry["coco_id"] = image_id
        entries.append(entry)
        for _ in range(VG_BOXES_PER_IMAGE):
            x, y = rng.uniform(0, width - 40), rng.uniform(0, height - 40)
            w, h = rng.uniform(8, 40, size=2).round(2).tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": entry["id"],
                                "category_id": int(rng.integers(1, VG_CLASSES + 1)),
                                "bbox": [round(x, 2), round(y, 2), w, h], "area": w * h,
                                "iscrowd": 0})  # fmt: skip
    categories = [{"id": i, "name": f"class {i}"} for i in range(1, VG_CLASSES + 1)]
    data = {"images": entries, "annotations": annotations, "categories": categories}
    json_path.write_text(json.dumps(data, separators=(",", ":")))


def setup_sources(workdir: Path, size: tuple[int, int]):
    root = workdir / "load"
    sources = (
        f"[{{json: {root / 'train.json'}, images: {root / 'images'}, mask_classes: all}}, "
        f"{{json: {root / 'vg.json'}, images: {root / 'images'}, mask_classes: none}}]"
    )
    sets = ["data.train_json=null", "data.train_images=null", f"data.train_sources={sources}"]
    sets += ["data.val_json=null", "data.val_images=null"]  # no val set to leave out
    return (load_config("maskrcnn-tiny", sets).data,)


def status_mb(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MB; unlike ru_maxrss, VmHWM is not
    inherited from the parent that started this process, and clear_refs resets it."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


class _WorkerProbe(torch.utils.data.Dataset):
    """The dataset's samples, and at key -1 the worker's USS / PSS after a garbage collection."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int):
        if key >= 0:
            return len(self.dataset[(key, key)][1]["labels"])
        gc.collect()  # as a long run's own collections would: they touch every tracked object
        with open("/proc/self/smaps_rollup") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) for line in f if "kB" in line}
        uss = fields["Private_Clean"] + fields["Private_Dirty"]
        return {"uss_mb": uss / 1024, "pss_mb": fields["Pss"] / 1024}


def _sum_mb(workers: list[dict]) -> str:
    uss, pss = (sum(w[key] for w in workers) for key in ("uss_mb", "pss_mb"))
    return f"{uss:.0f} / {pss:.0f} MB"


def load_work(data_cfg) -> dict:
    """Builds the train set (the measured peak), then iterates it with DataLoader workers."""
    gc.collect()
    base = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    started = time.perf_counter()
    dataset = build_dataset(data_cfg, split="train")
    seconds = time.perf_counter() - started
    peak = status_mb("VmHWM")
    gc.collect()
    retained = status_mb("VmRSS") - base
    keys = list(range(len(dataset)))
    random.Random(0).shuffle(keys)
    loader = torch.utils.data.DataLoader(
        _WorkerProbe(dataset),
        # batches go round-robin: one probe per worker at the start and at the end
        sampler=[-1] * LOAD_WORKERS + keys + [-1] * LOAD_WORKERS,
        batch_size=None,
        num_workers=LOAD_WORKERS,
    )
    samples = list(loader)
    started, done = samples[:LOAD_WORKERS], samples[-LOAD_WORKERS:]
    what = f"{len(dataset)} images in {seconds:.1f} s; retained {retained:.0f} MB; "
    what += f"{LOAD_WORKERS} workers' USS / PSS at start {_sum_mb(started)}"
    what += f", after an epoch {_sum_mb(done)}"
    return {"base_mb": base, "peak_mb": peak, "what": what}


# name -> (prepare(workdir) in the parent, setup(workdir, size) -> args, {variant: work(*args)},
# default size W x H)
CASES: dict[str, tuple[Callable, Callable, dict[str, Callable], str]] = {
    "predict": (
        prepare_predict,
        setup_predict,
        {"before": predict_before, "after": predict_after},
        "4000x3000",
    ),
    "overlay": (
        prepare_predict,
        setup_overlay,
        {"before": overlay_before, "after": overlay_after},
        "4000x3000",
    ),
    "train": (
        prepare_train,
        setup_train,
        {"before": train_before, "after": train_after},
        "1333x800",
    ),
    "load": (prepare_load, setup_load, {"before": load_work, "after": load_work}, "640x480"),
    "sources": (
        prepare_sources,
        setup_sources,
        {"before": load_work, "after": load_work},
        "640x480",
    ),
}


def child(case: str, variant: str, workdir: Path, size: tuple[int, int]) -> dict:
    torch.set_num_threads(1)
    _, setup, variants, _ = CASES[case]
    args = setup(workdir, size)
    base = rss_peak_mb()
    what = variants[variant](*args)
    if isinstance(what, dict):  # the work measured its own base and peak
        return what
    return {"base_mb": base, "peak_mb": rss_peak_mb(), "what": what}


def measure(case: str, variant: str, workdir: Path, size: str, before_rev: str | None) -> dict:
    argv = [sys.executable, __file__, "--child", f"{case}:{variant}", "--workdir", str(workdir)]
    env = dict(os.environ)
    if case in BEFORE_REV and variant == "before":
        env["PYTHONPATH"] = str(_extract_src(before_rev or BEFORE_REV[case], workdir))
    done = subprocess.run([*argv, "--size", size], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{case} {variant} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _extract_src(rev: str, workdir: Path) -> Path:
    """`src/` of git revision `rev` of this repository, extracted under `workdir`."""
    out = workdir / f"src-{rev}"
    if not out.is_dir():
        out.mkdir()
        repo = Path(__file__).resolve().parent.parent
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", rev, "src"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--size", help="image W x H (default: each case's own)")
    parser.add_argument("--workdir", type=Path, help="keep the prepared runs here")
    parser.add_argument("--before-rev", help="the load / sources cases' 'before' revision")
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
                figures = measure(case, variant, workdir, size, args.before_rev)
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
