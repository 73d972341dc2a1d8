"""Experiment tracking: TensorBoard event files in the run directory's tensorboard/, beside
log.jsonl, and the wall time and peak memory each log.jsonl record carries.

TensorBoard is optional (`pip install everyseg[tensorboard]`); train.tensorboard says whether
to write (auto: when the package is installed). Only rank 0 writes. A resumed run reopens the
run directory with purge_step = the checkpoint's step + 1, so TensorBoard drops what the
killed process logged past its last checkpoint and no step appears twice.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from everyseg.config import Config, ConfigError

# overlays of the first few val images go to TensorBoard at each evaluation
NUM_IMAGES = 3
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
AREAS = ("all", "seen", "unseen")


def wants_tensorboard(setting: str) -> bool:
    """Whether train.tensorboard=`setting` writes event files here; ConfigError for "on"
    without the package."""
    installed = importlib.util.find_spec("tensorboard") is not None
    if setting == "on" and not installed:
        raise ConfigError(
            "train.tensorboard=on needs the tensorboard package: pip install "
            "'everyseg[tensorboard]' (or set train.tensorboard=auto to write event files only "
            "when it is installed)"
        )
    return setting != "off" and installed


def peak_memory(device: torch.device) -> dict[str, float]:
    """The process's peak resident memory and, on CUDA, the peak tensor memory, in MiB."""
    peak = {"max_rss_mb": round(_max_rss_bytes() / 2**20, 1)}
    if device.type == "cuda":
        peak["max_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def _max_rss_bytes() -> int:
    import resource  # POSIX only

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS counts bytes, Linux KiB


def logged_seconds(log: Path) -> float:
    """The `time` of the last record in `log` that has one (0 for none): where a resumed
    run's clock continues from, so `time` counts the seconds spent training the run."""
    seconds = 0.0
    for line in log.read_text().splitlines() if log.is_file() else []:
        record = json.loads(line)  # trim_log kept whole lines only
        seconds = float(record.get("time", seconds))
    return seconds


class Tracker:
    """Writes a run's TensorBoard scalars and images, or nothing (`Tracker(None)`)."""

    def __init__(self, writer, *, overlay_images: Sequence[Path] = ()) -> None:
        self.writer = writer
        self.overlay_images = list(overlay_images)

    @classmethod
    def open(cls, folder: Path, cfg: Config, *, start_step: int) -> Tracker:
        """The tracker writing into `folder` (a run's tensorboard/) for training that starts
        at `start_step`."""
        if not wants_tensorboard(cfg.train.tensorboard):
            return cls(None)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)
        return cls(writer, overlay_images=_first_images(cfg.data.val_images))

    def scalars(self, record: dict) -> None:
        """A log.jsonl training record: each number under train/, lr and resources apart."""
        if self.writer is None:
            return
        step = record["step"]
        for key, value in record.items():
            if key == "step" or not isinstance(value, (int, float)):
                continue
            group = "train" if key.startswith("loss") else "run"
            self.writer.add_scalar(f"{group}/{key}", value, step)
        self.writer.flush()

    def evaluation(self, step: int, metrics: dict, *, model=None, class_names=()) -> None:
        """metrics.json's AP of all / seen / unseen classes, masks and boxes, at `step`; and,
        given the model (in eval mode) and its class names, its overlays of the first few val
        images."""
        if self.writer is None:
            return
        for task in ("segm", "bbox"):
            for area in AREAS:
                ap = metrics.get(task, {}).get(area, {}).get("AP")
                if ap is not None:
                    self.writer.add_scalar(f"eval/{task}_AP_{area}", ap, step)
        if model is not None:
            self._overlays(step, model, class_names)
        self.writer.flush()

    def _overlays(self, step: int, model, class_names) -> None:
        import numpy as np

        from everyseg.predictor import Predictor, draw_overlay

        # a short run scores lower than a converged model: show its confident-ish detections
        predictor = Predictor(model, class_names=class_names, score_thresh=0.3)
        for path in self.overlay_images:
            try:
                image = draw_overlay(path, predictor(path), min_side=256)
            except (OSError, ValueError):  # evaluation reported the val set's bad files
                continue
            tag = f"overlays/{path.name}"
            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _first_images(folder: str | None) -> list[Path]:
    if not folder or not Path(folder).is_dir():
        return []
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return paths[:NUM_IMAGES]
