"""What a report shows of one run directory, read once: config, training log, metrics.

A run may lack parts (trained with --no-eval: no metrics.json; evaluated by an older version:
no PR curves); each gap becomes a note on the page instead of an error. What cannot be read at
all (no config.yaml, a metrics.json that is not JSON) is an error naming the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from everyseg.config import Config, ConfigError, load_config
from everyseg.engine.run_dir import RunDir


@dataclass
class RunFiles:
    """One run's files as the report uses them."""

    name: str  # how the page calls the run: the path given on the command line
    run: RunDir
    config: Config
    steps: list[dict[str, Any]]  # log.jsonl's training records, in step order
    evals: list[tuple[int, float]]  # (step, segm AP) of evaluations during training
    metrics: dict[str, Any] | None  # metrics.json, None when the run was not evaluated
    notes: list[str] = field(default_factory=list)  # what is missing, and why


def read_run(path: Path, *, name: str) -> RunFiles:
    """Read run directory `path`; raises ValueError when it is not one (no config.yaml)."""
    run = RunDir(path)
    if not run.config.is_file():
        raise ValueError(
            f"{path}: not a run directory (no config.yaml; everyseg train --out makes one)"
        )
    try:
        config = load_config(run.config)
    except ConfigError as err:
        raise ValueError(f"{run.config}: {err}") from None
    notes: list[str] = []
    steps, evals = _read_log(run.log, notes)
    metrics = _read_metrics(run.metrics, notes)
    return RunFiles(name, run, config, steps, evals, metrics, notes)


def _read_log(path: Path, notes: list[str]) -> tuple[list[dict], list[tuple[int, float]]]:
    """Training records and evaluation points of log.jsonl; unreadable lines are counted in
    `notes` (a run killed mid-write can leave half a line)."""
    if not path.is_file():
        notes.append(f"{path.name} is missing: no loss or lr curves")
        return [], []
    steps: list[dict] = []
    evals: list[tuple[int, float]] = []
    bad = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, TypeError, KeyError):
            bad.append(number)
            continue
        if isinstance(record.get("eval"), dict):
            evals.append((step, _number(record["eval"].get("segm_AP"))))
        else:
            steps.append(record)
    if bad:
        notes.append(f"{path}: {len(bad)} unreadable line(s) left out: {bad[:10]}")
    steps.sort(key=lambda record: record["step"])
    return steps, sorted(evals)


def _read_metrics(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        notes.append(f"{path.name} is missing: run `everyseg evaluate {path.parent}`")
        return None
    try:
        metrics = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if not isinstance(metrics, dict) or not any(
        isinstance(metrics.get(block), dict) for block in ("segm", "semantic")
    ):
        raise ValueError(f'{path}: not an everyseg metrics.json (no "segm" or "semantic" block)')
    if "segm" in metrics and "pr_curve" not in metrics["segm"]:
        notes.append(
            f"{path.name} has no PR curves (written before they were added): "
            f"run `everyseg evaluate {path.parent}` again"
        )
    return metrics


def _number(value: Any) -> float:
    """A logged number as float; NaN for what is not one (null, a string)."""
    return float(value) if isinstance(value, (int, float)) else math.nan
