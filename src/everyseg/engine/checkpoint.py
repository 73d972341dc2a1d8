"""Checkpoint files: a run record (run_dir.RunRecord) plus tensors, written atomically and
read with torch.load(weights_only=True), so that loading one never runs code.

    last.pt, best.pt, step_XXXXXXX.pt  the record's fields, "step", "model", "optimizer",
                                       "scheduler", "scaler" (state dicts) and "rng"
                                       (rng.capture_rng): everything a resume needs; a run
                                       of several processes adds "rng_per_rank" (a list),
                                       one with train.ema_decay "ema" (engine/ema.py)
    model.pt                           the record's fields, "step" and "model" alone, to
                                       share (TrainingState.export_model): the weight
                                       average where the run keeps one

`inference_weights` is what evaluation, prediction and export load: the weight average where
there is one, else "model".
"""

from __future__ import annotations

import io
import json
import pickle
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from everyseg.engine.ema import WeightAverage
from everyseg.engine.files import atomic_write_bytes
from everyseg.engine.rng import capture_rng, restore_rng
from everyseg.engine.run_dir import RunRecord


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` atomically and record its step in `index.json` beside it.

    The index is rewritten after the checkpoint, so a kill between the two leaves it one
    checkpoint behind; the checkpoint's own "step" is authoritative.
    """
    atomic_write_bytes(path, lambda f: f.write(_serialize(state)))
    index_path = path.parent / "index.json"
    index = read_checkpoint_index(index_path)
    index[path.name] = {
        "step": state.get("step"),
        "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(index, indent=2, sort_keys=True).encode()
    atomic_write_bytes(index_path, lambda f: f.write(text))


def _serialize(state: dict[str, Any]) -> bytes:
    # into memory first: torch.save seeks in the file it writes, and turns a full disk into
    # "RuntimeError: unexpected pos" instead of the OSError that atomic_write_bytes explains
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _unreadable(path: Path, reason: str) -> str:
    return f"{path}: not a readable checkpoint (truncated, or not written by torch.save): {reason}"


def read_checkpoint_index(path: Path) -> dict[str, dict]:
    """checkpoints/index.json: file name -> {"step", "saved"}; empty if there is none yet."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:  # edited by hand into invalid JSON: it is rebuilt from here on
        return {}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents; ValueError naming the file if it holds anything but tensors
    and plain values (unpickling other objects could run code) or is not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names the first global it blocks: a function or class the file would call
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise ValueError(
                f"{path}: refused to load: it holds a {found.group(1)} object, not only tensors "
                "and plain values, and loading it could run code (everyseg's own checkpoints "
                "hold tensors and plain values only)"
            ) from None
        raise ValueError(_unreadable(path, "not a pickle of tensors and plain values")) from None
    except (RuntimeError, KeyError, EOFError) as err:
        raise ValueError(_unreadable(path, str(err))) from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: not an everyseg checkpoint (no model weights in it)")
    return state


def inference_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A checkpoint's weights to evaluate and predict with (see the module's docstring)."""
    ema = state.get("ema")
    return ema["weights"] if ema else state["model"]


def nonfinite_weights(model: torch.nn.Module) -> list[str]:
    """Names of the model's floating-point weights and buffers that hold a NaN or Inf."""
    tensors = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    finite = torch.stack([torch.isfinite(v).all() for v in tensors.values()])  # one sync
    if bool(finite.all()):
        return []
    return [name for name, ok in zip(tensors, finite.tolist()) if not ok]


@dataclass
class TrainingState:
    """What a checkpoint holds besides the run record: the model, the optimiser, the
    schedule, the AMP scaler and the number of steps taken."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    record: RunRecord
    step: int = 0
    ema: WeightAverage | None = None  # train.ema_decay

    def check_weights(self) -> None:
        """FloatingPointError if an update has made any weight NaN or Inf."""
        bad = nonfinite_weights(self.model)
        if bad:
            names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise FloatingPointError(
                f"step {self.step}: the model's weights hold NaN or Inf ({names}); training "
                "stopped (an update diverged: lower train.lr, or set train.clip_grad_norm)"
            )

    def save(self, path: Path, *, rngs: list[dict[str, Any]] | None = None) -> None:
        """`rngs`: every rank's capture_rng() under DDP (rank 0's is also the "rng" that a
        resume on another number of processes uses); by default this process's."""
        self.check_weights()  # a checkpoint never holds a diverged model
        rngs = rngs or [capture_rng()]
        per_rank = {"rng_per_rank": rngs} if len(rngs) > 1 else {}
        ema = {"ema": self.ema.state_dict()} if self.ema else {}
        save_checkpoint(
            path,
            {
                **self.record.to_plain(),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "step": self.step,
                "rng": rngs[0],
                **per_rank,
                **ema,
            },
        )

    def export_model(self, path: Path) -> None:
        """The weights to predict with and the run record alone (model.pt): no optimizer,
        no RNG state."""
        self.check_weights()
        weights = self.ema.weights if self.ema else self.model.state_dict()
        save_checkpoint(path, {**self.record.to_plain(), "step": self.step, "model": weights})

    def restore(self, path: Path, *, rank: int = 0, world_size: int = 1) -> None:
        """Continue from `path`; rank r of the same number of processes gets back its own
        random streams, any other gets rank 0's."""
        state = load_checkpoint(path)
        changes = RunRecord.from_plain(state, source=path).class_differences(self.record)
        if changes:
            raise ValueError(
                f"cannot resume {path} with this data set: its classes differ from the "
                f"checkpoint's ({'; '.join(changes)}); train into a new --out instead "
                "(model.init_from_run can start it from this run)"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # empty from a run without fp16: a resume that turns fp16 on starts a fresh scale
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        # a resume that turns the average on starts it from the checkpoint's weights
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        elif self.ema:
            self.ema = WeightAverage(self.model, decay=self.ema.decay)
        per_rank = state.get("rng_per_rank", [state["rng"]])
        restore_rng(per_rank[rank] if len(per_rank) == world_size else state["rng"])
        self.step = int(state["step"])
