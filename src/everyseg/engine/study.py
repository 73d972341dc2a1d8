"""`everyseg study NAME --out DIR`: run a study's grid of trainings (engine/studies.py) and
write DIR/study.md (mean +- std over seeds, paired differences to the reference row with 95 %
t intervals) and DIR/study.json (every run's numbers), both rewritten as each run finishes,
and at the end DIR/study.html (everyseg report of each row's first seed, with matplotlib).

DIR holds data/ (the generated data, without --data), name_embedding.txt, detectors/ (the
fixed detectors of the mask-branch rows, one per seed), runs/ROW/seed_S and beside each run
its log, seed_S.log. Running the same command again keeps finished runs and continues the rest.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from everyseg.engine.files import atomic_write_bytes, write_json
from everyseg.engine.name_embedding import class_names_of, write_name_embedding
from everyseg.engine.run_dir import RunDir
from everyseg.engine.studies import STUDIES, Study
from everyseg.engine.study_runs import Job, Outcome, execute, plan
from everyseg.engine.study_table import difference_table, on_split, summary_table

# what `everyseg synth` writes by default (and each generator's own number of training
# images); a study without --data generates this into DIR/data
SYNTH_ARGS: dict[str, int] = dict(num_val=200, size=128, seed=0)
SYNTH_KINDS = ("easy", "hard")
SEEN_CLASSES_FILE = "seen_classes.txt"
PROTOCOL_NOTES = {"mask": "mask branch on the seed's detector", "end_to_end": "end to end"}


def run_study(
    study: str | Study,
    *,
    out: Path,
    seeds: int = 3,
    steps: int | None = None,
    jobs: int = 1,
    data: Path | None = None,
    synth: str = "easy",
    overrides: Sequence[str] = (),
    echo: Callable[[str], None] = print,
) -> dict[str, Outcome]:
    """Train what `study` (a name of STUDIES or a Study) still lacks in `out`, `jobs` at a
    time, and write its report; returns each run's outcome by name (status failed: see its
    message and log)."""
    if isinstance(study, str):
        if study not in STUDIES:
            raise ValueError(f"no study {study!r}; studies: {', '.join(STUDIES)}")
        study = STUDIES[study]
    out = Path(out).resolve()
    paths = _data_paths(data, out=out, synth=synth, echo=echo)
    write_name_embedding(class_names_of(Path(paths["train_json"])), out / "name_embedding.txt")
    split = seen_split(Path(paths["train_json"]).parents[1])
    grid = plan(
        study, out=out, seeds=seeds, steps=steps, data=paths, overrides=(*split, *overrides)
    )
    settings = {
        "seeds": seeds,
        "steps": steps if steps is not None else "each preset's train.steps",
        "data": paths,
        "overrides": [*split, *overrides],
    }

    def report_so_far(outcomes: dict[str, Outcome]) -> None:
        # a grid takes hours: its tables grow run by run (the HTML report waits for the end)
        write_study_report(study, grid, outcomes, out=out, settings=settings, html=False)

    outcomes = execute(grid, at_once=jobs, echo=echo, on_finished=report_so_far)
    write_study_report(study, grid, outcomes, out=out, settings=settings)
    echo(f"{out / 'study.md'}")
    return outcomes


def _data_paths(data: Path | None, *, out: Path, synth: str, echo) -> dict[str, str]:
    if data is not None:
        paths = {
            "train_json": data / "annotations" / "train.json",
            "train_images": data / "train",
            "val_json": data / "annotations" / "val.json",
            "val_images": data / "val",
        }
        for path in paths.values():
            if not path.exists():
                raise FileNotFoundError(
                    f"--data {data}: {path} does not exist (expected what `everyseg synth` "
                    "writes: annotations/train.json, annotations/val.json, train/, val/)"
                )
        return {key: str(path.resolve()) for key, path in paths.items()}
    if synth not in SYNTH_KINDS:
        raise ValueError(f"--synth {synth!r}: choose one of {', '.join(SYNTH_KINDS)}")
    folder = out / "data"
    if (folder / "annotations" / "val.json").is_file():  # written by an earlier start
        return _data_paths(folder, out=out, synth=synth, echo=echo)
    echo(f"generating the {synth} synthetic data into {folder}")
    if synth == "hard":  # everyseg synth --preset hard's generator, imported only when asked
        hard = importlib.import_module("everyseg.data.synthetic_hard")
        return hard.generate_hard(folder, **SYNTH_ARGS, progress=False)
    from everyseg.data.synthetic import generate

    return generate(folder, **SYNTH_ARGS, progress=False)


def seen_split(data: Path) -> list[str]:
    """The data's own seen split where it names one (`seen_classes.txt`, as the hard benchmark
    writes), for every row that does not set data.mask_classes itself; else the presets'."""
    names = data / SEEN_CLASSES_FILE
    return [f"data.mask_classes={names}"] if names.is_file() else []


def collect(grid: Sequence[Job]) -> dict[str, dict[int, dict[str, Any]]]:
    """row name -> seed -> metrics.json of its finished runs, in the study's row order."""
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for job in grid:
        if job.row is None:
            continue
        seeds = rows.setdefault(job.row, {})
        metrics = RunDir(job.run_dir).metrics
        if metrics.is_file():
            seeds[job.seed] = json.loads(metrics.read_text(encoding="utf-8"))
    return rows


def on_reference_split(
    rows: dict[str, dict[int, dict[str, Any]]], reference: str, val_json: Path
) -> tuple[dict[str, dict[int, dict[str, Any]]], list[str]]:
    """`rows` with every run scored on the reference row's seen / unseen classes (a row
    trained with other mask classes, the oracle, is re-scored from its per-class numbers, as
    docs/results.md did by hand), and the names of the rows so re-scored."""
    finished = list(rows.get(reference, {}).values())
    if not finished:
        return rows, []
    seen = set(finished[0]["seen_classes"])
    instances = _masked_instances(val_json)
    scored: dict[str, dict[int, dict[str, Any]]] = {}
    moved = []
    for name, runs in rows.items():
        scored[name] = {}
        for seed, metrics in runs.items():
            if set(metrics.get("seen_classes", ())) != seen:
                metrics = on_split(metrics, sorted(seen), instances)
                moved += [name] if name not in moved else []
            scored[name][seed] = metrics
    return scored, moved


def _masked_instances(val_json: Path) -> dict[str, int]:
    """class name -> its val instances with a mask (the ground-truth box prompts)."""
    gt = json.loads(Path(val_json).read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in gt["categories"]}
    counts = dict.fromkeys(names.values(), 0)
    for ann in gt["annotations"]:
        if ann.get("segmentation") and not ann.get("iscrowd"):
            counts[names[ann["category_id"]]] += 1
    return counts


def write_study_report(
    study: Study,
    grid: Sequence[Job],
    outcomes: dict[str, Outcome],
    *,
    out: Path,
    settings: dict[str, Any],
    html: bool = True,
) -> None:
    """study.md and study.json of what has finished; `outcomes` lacks the runs still to
    train while the study runs (html=False: study.html is written at the end only)."""
    runs = collect(grid)
    rows, rescored = on_reference_split(runs, study.reference, settings["data"]["val_json"])
    detectors = [job for job in grid if job.row is None]
    parts = [
        f"# {study.title}",
        "",
        study.paper,
        "",
        "Each row: mean ± sample standard deviation over the seeds that finished; AP in percent "
        "(COCO); GT-box = the mask head prompted with the val ground-truth boxes and classes "
        "(metrics.json `gt_boxes`). Mask-branch rows train only the mask branch on their "
        "seed's fixed detector (train.stage=mask); end-to-end rows train everything.",
        "",
        summary_table(rows),
        "",
        *_rescored_note(rescored, study.reference),
        f"## Paired by seed: row minus `{study.reference}`",
        "",
        "Mean difference over the seeds both finished [95 % Student t interval].",
        "",
        difference_table(rows, study.reference),
        "",
        "## Runs",
        "",
        *_row_lines(study),
        f"- detectors: {study.detector_preset}, train.stage=detector ({len(detectors)} runs)",
        "",
        "Settings: " + json.dumps(settings),
        "",
        *_problems(grid, outcomes),
        *_other_steps(grid, settings["steps"]),
    ]
    if html:
        parts += [_html_report(runs, grid, out / "study.html"), ""]
    text = "\n".join(parts)
    atomic_write_bytes(out / "study.md", lambda f: f.write(text.encode()))
    write_json(
        {
            "study": study.title,
            "reference": study.reference,
            "settings": settings,
            "outcomes": {name: o.status for name, o in outcomes.items()},
            "rows": {name: {str(s): m for s, m in seeds.items()} for name, seeds in runs.items()},
        },
        out / "study.json",
    )


def _rescored_note(rescored: list[str], reference: str) -> list[str]:
    if not rescored:
        return []
    return [
        f"Scored on the classes `{reference}` has masks for (seen) and not (unseen), from "
        f"their per-class AP and IoU: {', '.join(rescored)}.",
        "",
    ]


def _row_lines(study: Study) -> list[str]:
    lines = []
    for row in study.rows:
        sets = f" (`{'`, `'.join(row.overrides)}`)" if row.overrides else ""
        how = PROTOCOL_NOTES[row.protocol]
        lines.append(f"- {row.name}: {row.preset}, {how}{sets}")
    return lines


def _problems(grid: Sequence[Job], outcomes: dict[str, Outcome]) -> list[str]:
    to_train = [job for job in grid if job.name not in outcomes]
    failed = [job for job in grid if job not in to_train and _failed(outcomes[job.name])]
    lines = []
    if to_train:
        lines += [
            f"**{len(to_train)} of {len(grid)} runs still to train** (the study is running, "
            "or was stopped: the same command continues it).",
            "",
        ]
    if not failed:
        return lines or [f"All {len(grid)} runs finished."]
    lines += [f"## Failed runs ({len(failed)} of {len(grid)})", ""]
    for job in failed:
        outcome = outcomes[job.name]
        lines.append(f"- **{job.name}** ({outcome.status}): {outcome.message}; log {outcome.log}")
        lines += [f"      {line}" for line in outcome.tail]
    return [*lines, ""]


def _failed(outcome: Outcome) -> bool:
    return outcome.status in ("failed", "skipped")


def _other_steps(grid: Sequence[Job], steps: Any) -> list[str]:
    """Kept runs trained for another number of steps than this start's --steps asks."""
    if not isinstance(steps, int):
        return []
    other = []
    for job in grid:
        run = RunDir(job.run_dir)
        if run.metrics.is_file() and run.config.is_file():
            trained = yaml.safe_load(run.config.read_text(encoding="utf-8"))["train"]["steps"]
            if trained != steps:
                other.append(f"- {job.name}: {trained} steps")
    if not other:
        return []
    head = f"Kept from an earlier start with other than {steps} steps (delete a run to retrain it):"
    return [head, "", *other, ""]


def _html_report(rows: dict[str, dict[int, Any]], grid: Sequence[Job], out: Path) -> str:
    from everyseg.report import write_report

    first: dict[str, Path] = {}
    for job in grid:
        if job.row is not None and job.seed in rows.get(job.row, {}):
            first.setdefault(job.row, job.run_dir)
    if not first:
        return "No run finished: no HTML report."
    try:
        write_report(list(first.values()), out=out, gallery_images=0)
    except ValueError as err:  # the report extra (matplotlib) is not installed
        return f"No HTML report: {err}."
    return f"HTML report of each row's first finished seed: {out.name}."
