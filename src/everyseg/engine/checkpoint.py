"""Run directories and checkpoints: written atomically, holding everything a resume needs."""

from __future__ import annotations

import errno
import json
import os
import random
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
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

    @property
    def index(self) -> Path:
        """Which step each checkpoint holds (see save_checkpoint)."""
        return self.checkpoints / "index.json"

    def snapshot(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:07d}.pt"


_PLAIN_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
}


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it into place.

    A crash at any moment leaves either the old file or the new one, never a truncated one.
    A failure to write (disk full, permission denied...) raises OSError saying so plainly.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a run killed mid-write leaves its temporary file; one writer per run directory
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        reason = _PLAIN_REASONS.get(err.errno, err.strerror or str(err))
        raise OSError(
            err.errno, f"could not write {path}: {reason}; any previous file there is intact"
        ) from err
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself must survive a power cut


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        # some file systems (network, FUSE) cannot sync a directory; the rename is still atomic
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` atomically and record its step in `index.json` beside it.

    The index is rewritten after the checkpoint, so a kill between the two leaves it one
    checkpoint behind; the checkpoint's own "step" is authoritative.
    """
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    index_path = path.parent / "index.json"
    index = read_checkpoint_index(index_path)
    index[path.name] = {
        "step": state.get("step"),
        "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(index, indent=2, sort_keys=True).encode()
    atomic_write_bytes(index_path, lambda f: f.write(text))


def read_checkpoint_index(path: Path) -> dict[str, dict]:
    """checkpoints/index.json: file name -> {"step", "saved"}; empty if there is none yet."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:  # edited by hand into invalid JSON: it is rebuilt from here on
        return {}


def trim_log(path: Path, *, step: int) -> None:
    """Keep the records of steps <= `step`: what a killed run logged past its last checkpoint
    (and a half-written last line) would otherwise be logged twice after a resume."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    text = "".join(kept).encode()
    atomic_write_bytes(path, lambda f: f.write(text))


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
