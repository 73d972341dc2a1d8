"""Ground truth beside predictions on the first few val images of a run.

The report predicts them afresh with the run's checkpoint rather than reusing overlays/: the
same image then sits in both columns at the same scale, and runs trained with --no-eval get a
gallery too. Colours follow the class name, so a class looks the same in both columns.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from everyseg.data.build import build_dataset
from everyseg.data.semantic import IGNORE, target_labels
from everyseg.engine.load import load_run
from everyseg.predictor import Predictor
from everyseg.report.figures import WIDTH, Figure
from everyseg.report.run_files import RunFiles
from everyseg.semantic_predict import class_colors, overlay

SCORE_THRESH = 0.3  # as the overlays training draws: a short run's confident-ish detections
ALPHA = 0.5
ALPHA_SEMANTIC = 0.7  # every pixel of a label map is tinted: strong enough to tell from the image
PALETTE = [  # matplotlib's tab10, which reads well on photos and on flat synthetic shapes
    (0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16),
    (0.58, 0.4, 0.74), (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.5, 0.5, 0.5),
    (0.74, 0.74, 0.13), (0.09, 0.75, 0.81),
]  # fmt: skip


def gallery(run: RunFiles, *, images: int, checkpoint: str) -> Figure:
    """A figure of `images` rows: an image's ground truth (box-only instances dashed), then the
    run's detections scoring at least SCORE_THRESH. Raises ValueError / OSError when the val
    set or the checkpoint cannot be read."""
    if not run.config.data.val_json:
        raise ValueError("the run's config has no data.val_json")
    dataset = build_dataset(run.config.data, split="val")
    predictor = Predictor.from_run(run.run.root, checkpoint=checkpoint, score_thresh=SCORE_THRESH)
    shown = range(min(images, len(dataset)))
    rows = [dataset[i] for i in shown]
    aspect = max(image.shape[1] / image.shape[2] for image, _ in rows)  # H / W
    fig = Figure(figsize=(WIDTH, 0.5 * WIDTH * aspect * len(rows) + 0.4))
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for (truth, predicted), (image, target) in zip(axes, rows):
        names = [dataset.class_names[label - 1] for label in target["labels"].tolist()]
        masks = target["compact_masks"].to_dense().bool()  # (N, H, W), empty when box-only
        _draw(truth, image, masks.numpy(), target["boxes"].numpy(), names, target["has_mask"])
        truth.set_title(f"ground truth: image {int(target['image_id'])}", fontsize="small")
        found = predictor(image)
        captions = [f"{n} {s:.2f}" for n, s in zip(found.class_names, found.scores)]
        _draw(predicted, image, found.masks, found.boxes, captions, None, found.class_names)
        predicted.set_title(f"predicted, score >= {SCORE_THRESH}", fontsize="small")
    fig.tight_layout()
    return fig


def semantic_gallery(run: RunFiles, *, images: int, checkpoint: str) -> Figure:
    """An FCN run's gallery: per row an image's true label map (unlabelled pixels grey) and the
    run's predicted one, each class tinted in its `everyseg predict` colour and named in the
    legend. Raises ValueError / OSError as `gallery` does."""
    if not run.config.data.val_json:
        raise ValueError("the run's config has no data.val_json")
    dataset = build_dataset(run.config.data, split="val")
    loaded = load_run(run.run.root, checkpoint=checkpoint, device="cpu")
    classes = ["background", *loaded.record.class_names]
    to_run = torch.tensor([0] + [classes.index(name) for name in dataset.class_names])
    colors = class_colors(len(classes))
    rows = [dataset[i] for i in range(min(images, len(dataset)))]
    aspect = max(image.shape[1] / image.shape[2] for image, _ in rows)  # H / W
    fig = Figure(figsize=(WIDTH, 0.5 * WIDTH * aspect * len(rows) + 0.8))
    axes = fig.subplots(len(rows), 2, squeeze=False)
    shown: set[int] = set()
    for (truth, predicted), (image, target) in zip(axes, rows):
        labels = target_labels(target, height=image.shape[-2], width=image.shape[-1])
        unlabelled = labels == IGNORE
        labels = torch.where(unlabelled, 0, to_run[labels.clamp(min=0)])
        with torch.inference_mode():
            guess = loaded.model([image])[0]["sem_seg"].argmax(0)  # (H, W) class ids
        truth_rgb = np.asarray(overlay(image, labels, colors=colors, alpha=ALPHA_SEMANTIC)).copy()
        truth_rgb[unlabelled.numpy()] = 128
        truth.imshow(truth_rgb)
        truth.set_title(f"ground truth: image {int(target['image_id'])}", fontsize="small")
        predicted.imshow(overlay(image, guess, colors=colors, alpha=ALPHA_SEMANTIC))
        predicted.set_title("predicted", fontsize="small")
        shown |= set(labels.unique().tolist()) | set(guess.unique().tolist())
        for ax in (truth, predicted):
            ax.set_axis_off()
    from matplotlib.patches import Patch

    rgb = [tuple(channel / 255 for channel in color) for color in colors.tolist()]
    legend = [Patch(color=rgb[k], label=classes[k]) for k in sorted(shown) if k]
    if legend:
        fig.legend(handles=legend, fontsize="small", loc="lower center", ncols=min(6, len(legend)))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def _draw(ax, image: torch.Tensor, masks, boxes, captions, has_mask, names=None) -> None:
    """`image` (3, H, W) in [0, 1] with (N, H, W) bool `masks` blended in, (N, 4) xyxy
    `boxes` outlined (dashed where `has_mask` is False) and captioned."""
    from matplotlib.patches import Rectangle

    names = names or captions
    canvas = image.permute(1, 2, 0).numpy().copy()  # (H, W, 3)
    colors = [np.array(_color(name)) for name in names]
    for mask, color in zip(masks, colors):
        canvas[mask] = (1 - ALPHA) * canvas[mask] + ALPHA * color
    ax.imshow(canvas)
    for i, ((x0, y0, x1, y1), caption, color) in enumerate(zip(boxes, captions, colors)):
        box_only = has_mask is not None and not bool(has_mask[i])
        style = "--" if box_only else "-"
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=color, ls=style, lw=1.5))
        text = f"{caption} (box only)" if box_only else caption
        ax.text(x0, y0, text, fontsize=6, va="bottom", color="white", backgroundcolor=color)
    ax.set_axis_off()


def _color(name: str) -> tuple[float, float, float]:
    """A colour per class name, the same in every run and column (crc32: no hash seed)."""
    return PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]
