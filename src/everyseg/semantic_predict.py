"""`everyseg predict` for an FCN run (model.kind=fcn): label maps and colour overlays.

OUT/labels/<name>.png holds each pixel's class id (0 background, k the run's k-th class;
8-bit grey, or 16-bit beyond 255 classes) and OUT/labels/classes.json the names of the ids,
OUT/overlays/<name>.png the image with every non-background pixel tinted in its class's
colour. A file that cannot be read is reported and skipped, as for instance runs.
"""

from __future__ import annotations

import colorsys
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from tqdm import tqdm

from everyseg.engine.checkpoint import load_checkpoint
from everyseg.engine.files import write_json
from everyseg.engine.load import load_run
from everyseg.engine.run_dir import RunDir
from everyseg.image_input import image_to_tensor
from everyseg.predict_files import overlay_names


def is_semantic_run(run_dir, *, checkpoint: str = "last") -> bool:
    """Whether `run_dir`'s checkpoint `checkpoint` is an FCN's (model.kind=fcn)."""
    run = RunDir(Path(run_dir))
    if not checkpoint.endswith(".pt") and run.config.is_file():
        config = yaml.safe_load(run.config.read_text()) or {}
    else:  # a checkpoint file of its own: its config is inside
        config = load_checkpoint(run.checkpoint(checkpoint))["config"]
    return isinstance(config, dict) and (config.get("model") or {}).get("kind") == "fcn"


def predict_semantic_files(
    run_dir,
    paths: Sequence[Path],
    *,
    overlays: Path,
    labels: Path | None = None,
    checkpoint: str = "last",
) -> list[str]:
    """Write each file's overlay into `overlays` and, given `labels`, its label map and
    classes.json there (module docstring); returns one line per file that failed."""
    loaded = load_run(run_dir, checkpoint=checkpoint)
    device = next(loaded.model.parameters()).device
    names = overlay_names([Path(p) for p in paths])
    overlays.mkdir(parents=True, exist_ok=True)
    classes = ["background", *loaded.record.class_names]
    if labels is not None:
        labels.mkdir(parents=True, exist_ok=True)
        write_json(classes, labels / "classes.json")
    colors = class_colors(len(classes))
    failures = []
    for path, name in tqdm(list(zip(paths, names)), desc="predict"):
        try:
            image = image_to_tensor(path)
        except (OSError, ValueError) as err:
            failures.append(f"{path}: {err}")
            continue
        with torch.inference_mode():
            (output,) = loaded.model([image.to(device)])
        predicted = output["sem_seg"].argmax(0).cpu()  # (H, W) class ids
        if labels is not None:
            label_image(predicted, num_classes=len(classes)).save(labels / name)
        overlay(image, predicted, colors=colors).save(overlays / name)
    for line in failures:
        print(f"skipped {line}", file=sys.stderr)
    return failures


def label_image(labels: torch.Tensor, *, num_classes: int) -> Image.Image:
    """(H, W) class ids as a PNG-ready grey image: 8-bit up to 256 ids, else 16-bit."""
    dtype = np.uint8 if num_classes <= 256 else np.uint16  # modes L and I;16
    return Image.fromarray(labels.numpy().astype(dtype))


def overlay(
    image: torch.Tensor, labels: torch.Tensor, *, colors: torch.Tensor, alpha: float = 0.5
) -> Image.Image:
    """(3, H, W) image in [0, 1] with the pixels of labels > 0 blended with their colour
    (`colors`: (C, 3) uint8, row k the colour of id k)."""
    rgb = image.permute(1, 2, 0) * 255  # (H, W, 3)
    tint = colors[labels].float()  # (H, W, 3)
    blended = torch.where((labels > 0)[..., None], rgb * (1 - alpha) + tint * alpha, rgb)
    return Image.fromarray(blended.round().clamp(0, 255).to(torch.uint8).numpy())


def class_colors(num_classes: int) -> torch.Tensor:
    """(C, 3) uint8: black for the background, then well-spread hues (golden-ratio steps)."""
    rows = [(0, 0, 0)] + [
        tuple(int(c * 255) for c in colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85, 1.0))
        for k in range(1, num_classes)
    ]
    return torch.tensor(rows, dtype=torch.uint8)
