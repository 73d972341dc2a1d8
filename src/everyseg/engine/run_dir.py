"""A run directory (DESIGN.md, "Run directory"): its files, its one-writer lock, and the run
record every checkpoint carries (config, classes, category ids, mask classes)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from everyseg.engine.files import atomic_write_bytes


class RunDirInUse(OSError):
    """Another training run holds the run directory."""


@dataclass(frozen=True)
class RunDir:
    """The files of one training run."""

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
    def model(self) -> Path:
        """The weights and the run record alone, to share (TrainingState.export_model)."""
        return self.checkpoints / "model.pt"

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
    def tensorboard(self) -> Path:
        """TensorBoard event files (engine.tracking): `tensorboard --logdir` this or a parent."""
        return self.root / "tensorboard"

    @property
    def index(self) -> Path:
        """Which step each checkpoint holds (see checkpoint.save_checkpoint)."""
        return self.checkpoints / "index.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "train.lock"

    def snapshot(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:07d}.pt"

    def checkpoint(self, name: str) -> Path:
        """ "last", "best", "model", "step_0001000" or a path to a .pt file."""
        return Path(name) if name.endswith(".pt") else self.checkpoints / f"{name}.pt"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory for one training run; another is refused with RunDirInUse.

        An flock on the open lock file: the kernel drops it when the holder exits, however it
        exits, so a killed run never leaves the directory locked. The file says who holds it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "a process that has not said who it is yet"
                raise RunDirInUse(
                    f"{self.root} is in use by another training run ({holder}); wait for it "
                    "to finish, or choose another --out"
                ) from None
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            try:
                yield
            finally:
                f.truncate(0)
                fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class RunRecord:
    """What a checkpoint holds besides tensors to rebuild the model, evaluate it and label its
    predictions. Label k (1..K) is class_names[k - 1], COCO category label_to_cat_id[k]."""

    config: dict[str, Any]  # Config.to_dict()
    class_names: list[str]
    label_to_cat_id: dict[int, int]
    mask_classes: list[str]  # the classes that had masks in training ("seen")
    # class name -> training instances (boxes): evaluation buckets classes by it (rare /
    # common / frequent) when the val set has no LVIS frequencies; empty in older runs
    train_instances: dict[str, int] = field(default_factory=dict)
    # a keypoint model's keypoint list (data.keypoints.KeypointLayout.to_plain); empty: none
    keypoints: dict[str, Any] = field(default_factory=dict)

    def to_plain(self) -> dict[str, Any]:
        """Built-in types only (a numpy integer would make the checkpoint unloadable)."""
        keypoints = {"keypoints": self.keypoints} if self.keypoints else {}
        return keypoints | {
            "config": self.config,
            "class_names": [str(name) for name in self.class_names],
            "label_to_cat_id": {int(k): int(v) for k, v in self.label_to_cat_id.items()},
            "mask_classes": [str(name) for name in self.mask_classes],
            "train_instances": {str(k): int(v) for k, v in self.train_instances.items()},
        }

    @classmethod
    def from_plain(cls, state: dict[str, Any], *, source: Path) -> RunRecord:
        """The record of a loaded checkpoint; ValueError naming `source` if it has none."""
        fields = ("config", "class_names", "label_to_cat_id", "mask_classes")
        missing = [key for key in fields if key not in state]
        if missing:
            raise ValueError(
                f"{source}: not an everyseg checkpoint (no {', '.join(missing)} in it)"
            )
        return cls(
            **{key: state[key] for key in fields},
            train_instances=state.get("train_instances", {}),
            keypoints=state.get("keypoints", {}),
        )

    def class_differences(self, other: RunRecord) -> list[str]:
        """How `other`'s classes differ from these, in words; empty if they are the same."""
        ours, theirs = self._names_by_cat_id(), other._names_by_cat_id()
        changes = []
        added = [n for c, n in theirs.items() if c not in ours and n not in ours.values()]
        removed = [n for c, n in ours.items() if c not in theirs and n not in theirs.values()]
        if added:
            changes.append(f"added {added}")
        if removed:
            changes.append(f"removed {removed}")
        changes += [
            f"renamed {ours[c]!r} -> {theirs[c]!r} (category id {c})"
            for c in sorted(ours.keys() & theirs.keys())
            if ours[c] != theirs[c] and theirs[c] not in ours.values()
        ]
        cat_of = {n: c for c, n in ours.items()}
        changes += [
            f"category id of {name!r} {cat_of[name]} -> {c}"
            for c, name in theirs.items()
            if name in cat_of and cat_of[name] != c
        ]
        if not changes and list(self.class_names) != list(other.class_names):
            changes.append(f"class order {self.class_names} -> {other.class_names}")
        return changes

    def _names_by_cat_id(self) -> dict[int, str]:
        return {self.label_to_cat_id[k + 1]: name for k, name in enumerate(self.class_names)}


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
