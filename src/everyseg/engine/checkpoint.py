"""Run directories and checkpoints: written atomically, holding everything a resume needs."""

from __future__ import annotations

import errno
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class RunDir:
    """The files of one training run (see DESIGN.md, "Run directory")."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def overlays(self) -> Path:
        return self.root / "overlays"

    def snapshot(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:07d}.pt"


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it into place.

    A crash at any moment leaves either the old file or the new one, never a truncated one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        reason = {errno.ENOSPC: "the disk is full", errno.EACCES: "permission denied"}.get(
            err.errno, err.strerror or str(err)
        )
        raise OSError(err.errno, f"could not write {path}: {reason}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # our checkpoints hold numpy RNG state, which the weights_only unpickler rejects
    return torch.load(path, map_location="cpu", weights_only=False)


def capture_rng() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
