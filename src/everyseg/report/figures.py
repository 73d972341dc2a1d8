"""The report's plots, each a matplotlib Figure made without pyplot (no GUI backend, no global
state), and their encoding as base64 PNG for an <img> that needs no other file."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from everyseg.report.run_files import RunFiles

try:
    from matplotlib.figure import Figure
except ImportError:  # the report extra; write_report says how to install it
    Figure = None  # type: ignore[assignment,misc]

SEEN, UNSEEN, ALL = "#1f77b4", "#ff7f0e", "#333333"
SUBSET_COLORS = {"all": ALL, "seen": SEEN, "unseen": UNSEEN}
BARS_PER_PANEL = 20  # per-class bars: every class up to 2x this, else the top and the bottom
WIDTH = 10.0  # inches, at DPI: figures fill a ~1000 px column
DPI = 100


def require_matplotlib() -> None:
    if Figure is None:
        raise ValueError('report needs matplotlib: pip install "everyseg[report]"')


def png_base64(fig: Figure) -> str:
    """The figure as a base64 PNG, for <img src="data:image/png;base64,...">."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def training_curves(run: RunFiles) -> Figure:
    """Loss terms and learning rate against step; the segm AP of evaluations during training."""
    panels = 3 if run.evals else 2
    fig = Figure(figsize=(WIDTH, 3.2))
    losses, lr = fig.subplots(1, panels, squeeze=False)[0][:2]
    steps = [record["step"] for record in run.steps]
    terms = sorted({key for record in run.steps for key in record if key.startswith("loss")})
    for term in terms:
        values = [_float(record.get(term)) for record in run.steps]
        losses.plot(steps, values, label=term, lw=2.0 if term == "loss" else 1.0)
    losses.set(title="training losses", xlabel="step")
    if all(v > 0 for r in run.steps for k, v in r.items() if k in terms and _finite(v)):
        losses.set_yscale("log")
    losses.legend(fontsize="x-small")
    lr.plot(steps, [_float(record.get("lr")) for record in run.steps], color=ALL)
    lr.set(title="learning rate", xlabel="step")
    if run.evals:
        ap = fig.axes[2]
        ap.plot(*zip(*run.evals), marker="o", color=SEEN)
        ap.set(title="mask AP during training", xlabel="step", ylabel="AP (%)")
    fig.tight_layout()
    return fig


def loss_comparison(runs: list[RunFiles]) -> Figure:
    """The total training loss of several runs on one axis."""
    fig = Figure(figsize=(WIDTH, 3.2))
    ax = fig.subplots()
    for run in runs:
        steps = [record["step"] for record in run.steps]
        ax.plot(steps, [_float(record.get("loss")) for record in run.steps], label=run.name)
    ax.set(title="total training loss", xlabel="step", ylabel="loss")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def per_class_ap(metrics: dict[str, Any]) -> Figure:
    """Per-class mask AP as horizontal bars, seen classes in one colour and unseen in another:
    every class when they are few, else the best and the worst BARS_PER_PANEL."""
    return _per_class_bars(metrics, metrics["segm"]["per_class"], measure="mask AP")


def per_class_iu(metrics: dict[str, Any]) -> Figure:
    """An FCN run's per-class IU (metrics.json "semantic"), as per_class_ap draws AP; the
    background in the colour of neither."""
    iu = metrics["semantic"]["per_class_iu"]
    return _per_class_bars(metrics, iu, measure="IU", neutral=frozenset({"background"}))


def _per_class_bars(
    metrics: dict[str, Any], values: dict, *, measure: str, neutral: frozenset[str] = frozenset()
) -> Figure:
    seen = set(metrics.get("seen_classes", []))
    scored = sorted(((v, name) for name, v in values.items() if v is not None), reverse=True)
    if len(scored) <= 2 * BARS_PER_PANEL:
        panels = [(f"{measure} per class", scored)]
    else:
        panels = [
            (f"top {BARS_PER_PANEL} of {len(scored)} classes", scored[:BARS_PER_PANEL]),
            (f"bottom {BARS_PER_PANEL}", scored[-BARS_PER_PANEL:]),
        ]
    rows = max(len(bars) for _, bars in panels)
    fig = Figure(figsize=(WIDTH, 1.3 + 0.24 * rows), layout="constrained")
    for ax, (title, bars) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        names = [name for _, name in bars][::-1]  # best at the top
        drawn = ax.barh(
            names,
            [value for value, _ in bars][::-1],
            color=[ALL if n in neutral else SEEN if n in seen else UNSEEN for n in names],
        )
        ax.bar_label(drawn, fmt="%.1f", fontsize="x-small", padding=2)
        ax.set(title=title, xlabel=f"{measure} (%)", xlim=(0, 100))
        ax.tick_params(axis="y", labelsize="small")
    _seen_unseen_legend(fig)
    return fig


def class_distribution(metrics: dict[str, Any]) -> Figure:
    """For many classes: mask AP by class-frequency bucket, and the spread of per-class AP,
    seen and unseen."""
    buckets = metrics["segm"].get("by_frequency")
    fig = Figure(figsize=(WIDTH, 3.0))
    axes = fig.subplots(1, 2 if buckets else 1, squeeze=False)[0]
    seen = set(metrics.get("seen_classes", []))
    per_class = metrics["segm"]["per_class"]
    spread = axes[-1]
    for label, color, keep in (("seen", SEEN, True), ("unseen", UNSEEN, False)):
        values = [ap for name, ap in per_class.items() if ap is not None and (name in seen) == keep]
        if values:  # density of nothing is 0 / 0
            name = f"{label} ({len(values)} classes)"
            spread.hist(
                values, bins=20, range=(0, 100), density=True, alpha=0.6, color=color, label=name
            )
    spread.set(title="spread of per-class mask AP", xlabel="mask AP (%)", ylabel="density")
    spread.legend(fontsize="small")
    if buckets:
        counts = metrics.get("frequency_buckets", {}).get("classes", {})
        names = [f"{bucket} ({counts.get(bucket, '?')} classes)" for bucket in buckets]
        axes[0].bar(names, [_float(buckets[b]["AP"]) for b in buckets], color=ALL)
        axes[0].set(title="mask AP by class frequency", ylabel="mask AP (%)")
    fig.tight_layout()
    return fig


def pr_curves(metrics: dict[str, Any]) -> Figure:
    """Precision against recall at IoU 0.5 for all / seen / unseen classes, mask and box."""
    fig = Figure(figsize=(WIDTH, 3.4))
    for ax, iou_type in zip(fig.subplots(1, 2), ("segm", "bbox")):
        curve = metrics[iou_type]["pr_curve"]
        for subset, color in SUBSET_COLORS.items():
            if curve[subset] is not None:
                ap50 = metrics[iou_type][subset]["AP50"]
                label = f"{subset} (AP50 {ap50:.1f})"
                ax.plot(curve["recall"], curve[subset], color=color, label=label)
        kind = "mask" if iou_type == "segm" else "box"
        ax.set(title=f"{kind} precision-recall, IoU {curve['iou']}", xlabel="recall")
        ax.set(ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _seen_unseen_legend(fig: Figure) -> None:
    """Above the panels, where no bar can hide it."""
    from matplotlib.patches import Patch

    fig.legend(
        handles=[Patch(color=SEEN, label="seen"), Patch(color=UNSEEN, label="unseen")],
        fontsize="small",
        loc="outside upper center",
        ncols=2,
    )


def _float(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
