"""`everyseg report`: one self-contained HTML page on one or several runs. Every figure is an
inline base64 PNG and the style sheet is inline, so the file can be mailed or archived alone."""

from __future__ import annotations

import datetime
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from everyseg import __version__
from everyseg.engine.files import atomic_write_bytes
from everyseg.report import figures
from everyseg.report.run_files import RunFiles, read_run

STYLE = """
body { font-family: sans-serif; max-width: 1040px; margin: 2em auto; color: #222; }
h1 { border-bottom: 3px solid #1f77b4; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; } td, th { padding: 3px 12px; border: 1px solid #ccc; }
td { text-align: right; } th { background: #eef3f8; text-align: left; }
.best { font-weight: bold; background: #e3f1e3; } .note { color: #a35200; }
img { max-width: 100%; }
"""
# (row label, path into metrics.json); AP rows mark the best run in bold
AP_ROWS = [
    (f"{kind} {stat} {subset}", (iou_type, subset, stat))
    for iou_type, kind in (("segm", "mask"), ("bbox", "box"))
    for stat in ("AP", "AP50")
    for subset in ("all", "seen", "unseen")
] + [  # the mask head alone: its masks for the ground-truth boxes (metrics.json gt_boxes)
    (f"gt-box mask AP {subset}", ("gt_boxes", "segm", subset, "AP"))
    for subset in ("all", "seen", "unseen")
]
BUCKET_ROWS = [(f"mask AP {b} (frequency)", ("segm", "by_frequency", b, "AP")) for b in "rcf"]
# an FCN run's (model.kind=fcn) metrics.json "semantic" block
SEMANTIC_ROWS = [
    (f"mean IU {subset}", ("semantic", *path, "mean_iu"))
    for subset, path in (("all", ()), ("seen", ("seen",)), ("unseen", ("unseen",)))
] + [
    (label, ("semantic", key))
    for label, key in (
        ("pixel accuracy", "pixel_accuracy"),
        ("mean accuracy", "mean_accuracy"),
        ("frequency-weighted IU", "frequency_weighted_iu"),
    )
]


def write_report(
    runs: Sequence[Path], *, out: Path, gallery_images: int = 4, checkpoint: str = "last"
) -> Path:
    """Write the report on `runs` (run directories) to `out`; `gallery_images` val images
    per run are predicted with its checkpoint `checkpoint` (0: no gallery)."""
    figures.require_matplotlib()
    if Path(out).is_dir():
        raise ValueError(f"--out {out} is a folder; give the path of the HTML file to write")
    files = [read_run(Path(path), name=str(path)) for path in runs]
    parts = [f"<h1>everyseg report: {len(files)} run(s)</h1>", _generated()]
    parts += ["<h2>Metrics</h2>", _metrics_table(files)]
    if len(files) > 1 and any(run.steps for run in files):
        parts.append(_image(figures.loss_comparison(files), "total loss of each run"))
    for run in files:
        parts += _run_section(run, gallery_images=gallery_images, checkpoint=checkpoint)
    text = _document("\n".join(parts))
    atomic_write_bytes(out, lambda f: f.write(text.encode()))
    return out


def _run_section(run: RunFiles, *, gallery_images: int, checkpoint: str) -> list[str]:
    parts = [f"<h2>{html.escape(run.name)}</h2>"]
    if run.steps:
        parts += ["<h3>Training</h3>", _image(figures.training_curves(run), "losses and lr")]
    metrics = run.metrics
    if metrics is not None and "semantic" in metrics:
        chart = figures.per_class_iu(metrics)
        parts += ["<h3>IU per class</h3>", _image(chart, "per class")]
    elif metrics is not None:
        parts += ["<h3>Mask AP per class</h3>", _image(figures.per_class_ap(metrics), "per class")]
        many = len(metrics["segm"]["per_class"]) > 2 * figures.BARS_PER_PANEL
        if many or "by_frequency" in metrics["segm"]:
            parts.append(_image(figures.class_distribution(metrics), "AP by frequency"))
        if "pr_curve" in metrics["segm"]:
            parts += ["<h3>Precision-recall</h3>", _image(figures.pr_curves(metrics), "PR")]
    if gallery_images:
        parts += [
            "<h3>Ground truth and predictions</h3>",
            *_gallery(run, gallery_images, checkpoint),
        ]
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in run.notes)
    if notes:
        parts.insert(1, f'<ul class="note">{notes}</ul>')
    return parts


def _gallery(run: RunFiles, images: int, checkpoint: str) -> list[str]:
    from everyseg.report.gallery import gallery, semantic_gallery

    draw = semantic_gallery if run.config.model.kind == "fcn" else gallery
    try:
        return [_image(draw(run, images=images, checkpoint=checkpoint), "gallery")]
    except (OSError, ValueError) as err:  # data moved, checkpoint gone: the rest still shows
        return [f'<p class="note">no gallery: {html.escape(str(err))}</p>']


def _metrics_table(runs: list[RunFiles]) -> str:
    header = "".join(f"<th>{html.escape(run.name)}</th>" for run in runs)
    rows = [f"<tr><th>metric</th>{header}</tr>"]
    described = [_describe(run) for run in runs]
    rows += [_row(label, [d[label] for d in described]) for label in described[0]]
    evaluated = [run.metrics for run in runs if run.metrics]
    bucketed = any("by_frequency" in metrics.get("segm", {}) for metrics in evaluated)
    semantic = any("semantic" in metrics for metrics in evaluated)
    instances = any("segm" in metrics for metrics in evaluated) or not evaluated
    chosen = (AP_ROWS if instances else []) + (BUCKET_ROWS if bucketed else [])
    for label, path in chosen + (SEMANTIC_ROWS if semantic else []):
        rows.append(_row(label, [_lookup(run.metrics, path) for run in runs], best=True))
    return "<table>" + "\n".join(rows) + "</table>"


def _row(label: str, values: list[Any], *, best: bool = False) -> str:
    numbers = [v for v in values if isinstance(v, float)]
    top = max(numbers) if best and len(numbers) > 1 else None
    cells = "".join(
        f'<td class="best">{_cell(v)}</td>' if v == top else f"<td>{_cell(v)}</td>" for v in values
    )
    return f"<tr><th>{html.escape(label)}</th>{cells}</tr>"


def _describe(run: RunFiles) -> dict[str, Any]:
    """The rows that say what a run is, before its numbers."""
    model, metrics = run.config.model, run.metrics or {}
    seen, unseen = metrics.get("seen_classes"), metrics.get("unseen_classes")
    architecture = (
        f"FCN-{model.fcn.stride}s ({model.backbone.name})"
        if model.kind == "fcn"
        else f"{model.detector} / {model.mask_head.name} ({model.mask_head.predictor})"
    )
    return {
        "model": architecture,
        "steps trained": run.steps[-1]["step"] if run.steps else None,
        "val images": metrics.get("images"),
        "classes seen / unseen": None
        if seen is None or unseen is None
        else f"{len(seen)} / {len(unseen)}",
    }


def _lookup(metrics: dict | None, path: tuple[str, ...]) -> float | None:
    value: Any = metrics
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def _cell(value: Any) -> str:
    if value is None:
        return "&ndash;"
    return f"{value:.1f}" if isinstance(value, float) else html.escape(str(value))


def _image(fig, alt: str) -> str:
    source = f"data:image/png;base64,{figures.png_base64(fig)}"
    return f'<p><img alt="{html.escape(alt)}" src="{source}"></p>'


def _generated() -> str:
    when = datetime.datetime.now().isoformat(timespec="seconds")
    legend = "seen classes had masks in training, unseen ones only boxes"
    return f"<p>everyseg {__version__}, {when}; {legend}.</p>"


def _document(body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>everyseg report</title><style>{STYLE}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )
