"""A study's trainings: which runs it needs (`plan`) and running them J at a time (`execute`).

Each training is `python -m everyseg train` in a subprocess of its own, with the CPU's threads
split between the J running at once (OMP_NUM_THREADS), its output in RUN.log beside its run
directory RUN. A run whose metrics.json exists is finished and kept; one with a checkpoint but
no metrics.json was stopped and continues with train's --resume; a failed run is reported by
name with the end of its log, and the runs that needed it (a detector's mask branches) are
skipped, not hidden.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from everyseg.engine.run_dir import RunDir
from everyseg.engine.studies import Row, Study

LOG_TAIL = 8  # lines of a failed run's log quoted in the report
POLL_SECONDS = 0.2
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Job:
    """One training: `everyseg train PRESET --set ... --out run_dir`."""

    name: str  # "<row> / seed S" or "detector <variant> / seed S"
    run_dir: Path
    preset: str
    overrides: tuple[str, ...]
    seed: int
    row: str | None = None  # None for a detector
    needs: str | None = None  # the name of the job that must finish first

    def argv(self, *, resume: bool) -> list[str]:
        sets = [arg for item in self.overrides for arg in ("--set", item)]
        tail = ["--resume"] if resume else []
        return [
            sys.executable,
            "-m",
            "everyseg",
            "train",
            self.preset,
            *sets,
            "--out",
            str(self.run_dir),
            *tail,
        ]


@dataclass
class Outcome:
    status: str  # kept | trained | failed | skipped
    message: str = ""
    log: Path | None = None
    tail: list[str] = field(default_factory=list)


def slug(text: str) -> str:
    """A folder name for a row or a detector variant."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "default"


def plan(
    study: Study,
    *,
    out: Path,
    seeds: int,
    steps: int | None,
    data: dict[str, str],
    overrides: Sequence[str] = (),
) -> list[Job]:
    """The study's trainings, detectors first, then the rows seed by seed (so that a stopped
    study already has whole seeds). `overrides` (user `--set`s) apply to every run before a
    row's own; `{out}` in a row's overrides is the study folder."""
    folders = [slug(row.name) for row in study.rows]
    if len(set(folders)) != len(folders):
        raise ValueError(f"study {study.title!r}: two rows share a folder name: {folders}")
    common = [*(f"data.{key}={value}" for key, value in data.items()), *overrides]
    schedule = [f"train.steps={steps}"] if steps is not None else []
    detectors: dict[tuple[tuple[str, ...], int], Job] = {}
    rows: list[Job] = []
    for seed in range(seeds):
        run_keys = [*schedule, f"train.seed={seed}"]
        for row in study.rows:
            own = tuple(item.replace("{out}", str(out)) for item in row.overrides)
            needs = None
            if row.protocol == "mask":
                detector = detectors.get((row.detector, seed))
                if detector is None:
                    detector = _detector_job(
                        study, row, out, seed, (*common, *row.detector, *run_keys)
                    )
                    detectors[row.detector, seed] = detector
                own += ("train.stage=mask", f"model.init_from_run={detector.run_dir}")
                needs = detector.name
            run_dir = out / "runs" / slug(row.name) / f"seed_{seed}"
            name = f"{row.name} / seed {seed}"
            rows.append(
                Job(name, run_dir, row.preset, (*common, *own, *run_keys), seed, row.name, needs)
            )
    return [*detectors.values(), *rows]


def _detector_job(study: Study, row: Row, out: Path, seed: int, overrides: tuple) -> Job:
    variant = slug(" ".join(row.detector))
    return Job(
        name=f"detector {variant} / seed {seed}",
        run_dir=out / "detectors" / variant / f"seed_{seed}",
        preset=study.detector_preset,
        overrides=(*overrides, "train.stage=detector"),
        seed=seed,
    )


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def execute(
    jobs: Sequence[Job],
    *,
    at_once: int,
    echo: Callable[[str], None] = print,
    on_finished: Callable[[dict[str, Outcome]], None] | None = None,
) -> dict[str, Outcome]:
    """Run `jobs` (in order, `at_once` at a time, each after the job it needs) -> outcome by
    job name; `on_finished(outcomes so far)` after each training that ends. Stopping the
    study (Ctrl-C) stops its running trainings; rerun to continue."""
    outcomes: dict[str, Outcome] = {}
    for job in jobs:
        if RunDir(job.run_dir).metrics.is_file():
            outcomes[job.name] = Outcome("kept")
    pending = [job for job in jobs if job.name not in outcomes]
    if len(outcomes):
        echo(f"{len(outcomes)} of {len(jobs)} runs finished before: kept")
    threads = max(1, available_cpus() // at_once)
    running: dict[str, tuple[Job, subprocess.Popen, Path]] = {}
    try:
        while pending or running:
            for job in list(pending):
                if len(running) >= at_once:
                    break
                before = outcomes.get(job.needs) if job.needs else Outcome("kept")
                if before is None:
                    continue
                pending.remove(job)
                if before.status in ("failed", "skipped"):
                    outcomes[job.name] = Outcome("skipped", f"{job.needs} did not finish")
                    echo(f"skipped {job.name}: {job.needs} did not finish")
                    continue
                running[job.name] = _start(job, threads=threads, echo=echo)
            time.sleep(POLL_SECONDS)
            for name, (job, process, log) in list(running.items()):
                if process.poll() is not None:
                    del running[name]
                    outcomes[name] = _finished(job, process.returncode, log)
                    echo(f"{outcomes[name].status} {name} ({process.returncode=})")
                    if on_finished is not None:
                        on_finished(dict(outcomes))
    finally:
        for _, process, _ in running.values():
            process.terminate()
            process.wait()
    return outcomes


def _start(job: Job, *, threads: int, echo) -> tuple[Job, subprocess.Popen, Path]:
    resume = RunDir(job.run_dir).last.is_file()
    log = job.run_dir.parent / f"{job.run_dir.name}.log"  # beside the run: train owns the run
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    echo(f"{'resume' if resume else 'start'} {job.name} -> {job.run_dir} (log {log})")
    with open(log, "ab") as f:
        process = subprocess.Popen(
            job.argv(resume=resume),
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_stop_with_parent if sys.platform == "linux" else None,
        )
    return job, process, log


def _stop_with_parent() -> None:
    """In a training's process before it starts: SIGTERM when the study dies, even by SIGKILL
    (which skips execute's cleanup), so no training outlives its study and a rerun never
    finds the last one's still writing (Linux's PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _finished(job: Job, returncode: int, log: Path) -> Outcome:
    if returncode == 0 and RunDir(job.run_dir).metrics.is_file():
        return Outcome("trained", log=log)
    text = log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
    tail = [line for line in text.splitlines() if line.strip()][-LOG_TAIL:]
    return Outcome("failed", f"exit code {returncode}", log=log, tail=tail)
