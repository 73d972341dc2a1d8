"""`everyseg study`: the grid of trainings, its statistics, resuming, parallel runs, failures.

The trainings are real subprocesses (`python -m everyseg train`), sized to a few seconds each:
two steps of a narrow model on the session's 64 px synthetic images.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from everyseg.cli import main
from everyseg.config import load_config
from everyseg.engine.name_embedding import name_vector, write_name_embedding
from everyseg.engine.run_dir import RunDir
from everyseg.engine.studies import STUDIES, Row, Study
from everyseg.engine.study import run_study, seen_split, write_study_report
from everyseg.engine.study_runs import Outcome, plan
from everyseg.engine.study_table import (
    difference_table,
    mean_std,
    on_split,
    paired_interval,
    summary_table,
    t_quantile_975,
)
from everyseg.modeling.mask_heads.transfer import word_vectors

TINY = [
    "data.min_size=[64]",
    "data.test_min_size=64",
    "data.max_size=64",
    "data.num_workers=0",
    "model.backbone.fpn_channels=16",
    "model.rpn.anchor_sizes=[8,16,32,64,128]",
    "model.rpn.pre_nms_top_n_train=100",
    "model.rpn.post_nms_top_n_train=50",
    "model.rpn.pre_nms_top_n_test=100",
    "model.rpn.post_nms_top_n_test=30",
    "model.rpn.batch_size_per_image=32",
    "model.box_head.representation_size=32",
    "model.box_head.batch_size_per_image=16",
    "model.box_head.detections_per_img=20",
    "model.box_head.score_thresh=0.0",
    "model.mask_head.channels=8",
    "model.mask_head.num_convs=2",
    "model.mask_head.pooler_resolution=7",
    "train.batch_size=2",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.tensorboard=off",
    "train.trunk_pretrain=null",  # the tiny presets pretrain for minutes
]
TINY_STUDY = Study(
    title="tiny study",
    paper="a test",
    reference="agnostic",
    rows=(
        Row("agnostic", "baseline-tiny"),  # mask branch on the seed's fixed detector
        Row("specific, end to end", "maskrcnn-tiny", protocol="end_to_end"),
    ),
)


@pytest.fixture(scope="module")
def data_dir(synth_paths) -> Path:
    return Path(synth_paths["train_json"]).parents[1]


@pytest.fixture(scope="module")
def tiny_study(data_dir, tmp_path_factory):
    """TINY_STUDY run once, one seed, 2 steps, two trainings at a time: (out, echoed lines)."""
    out = tmp_path_factory.mktemp("study")
    lines: list[str] = []
    outcomes = run_study(
        TINY_STUDY, out=out, seeds=1, steps=2, jobs=2, data=data_dir, overrides=TINY,
        echo=lines.append,
    )  # fmt: skip
    assert {o.status for o in outcomes.values()} == {"trained"}, outcomes
    return out, lines


# --- statistics -------------------------------------------------------------------------------


def test_mean_sample_std_and_paired_t_interval_match_a_hand_computed_case():
    assert mean_std([10.0, 12.0, 14.0]) == (12.0, 2.0)
    assert mean_std([5.0]) == (5.0, None)
    # differences 1, 2, 4: mean 7/3, sample std sqrt(7/3), half width t(2) * std / sqrt(3)
    mean, half, pairs = paired_interval({0: 10, 1: 12, 2: 14, 3: 99}, {0: 9, 1: 10, 2: 10})
    assert pairs == 3
    assert mean == pytest.approx(2.333333, abs=1e-6)
    assert half == pytest.approx(4.303 * 1.527525 / 1.732051, abs=1e-5)
    assert paired_interval({0: 3.0}, {0: 1.0}) == (2.0, None, 1)
    assert paired_interval({0: 3.0}, {1: 1.0}) is None


def test_t_quantiles_from_the_table_and_beyond_it():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(2) == 4.303
    assert t_quantile_975(60) == pytest.approx(2.000, abs=1e-3)
    assert t_quantile_975(1000) == pytest.approx(1.962, abs=1e-3)


def test_tables_show_mean_std_and_intervals_and_dashes_where_nothing_was_measured():
    def metrics(seen, unseen, box):
        segm = {"seen": {"AP": seen}, "unseen": {"AP": unseen}}
        return {"segm": segm, "bbox": {"all": {"AP": box}}}

    rows = {
        "ref": {0: metrics(10.0, 5.0, 20.0), 1: metrics(12.0, 7.0, 20.0)},
        "new": {0: metrics(11.0, None, 20.0), 1: metrics(14.0, None, 20.0)},
    }
    summary = summary_table(rows)
    assert "| ref | 2 | 11.0 ± 1.4 | 6.0 ± 1.4 | 20.0 ± 0.0 | – |" in summary
    difference = difference_table(rows, "ref")
    # differences +1, +2: mean 1.5, half width 12.706 * 0.7071 / sqrt(2) = 6.353
    assert "| new | 2 | +1.5 [-4.9, +7.9] | – | +0.0 [+0.0, +0.0] |" in difference
    assert "| ref |" not in difference


def test_a_row_with_other_mask_classes_is_scored_on_the_reference_split():
    per_class = {"a": 10.0, "b": 20.0, "c": None, "d": 40.0}  # c: no val instance
    metrics = {
        "seen_classes": ["a", "b", "c", "d"],
        "segm": {"seen": {"AP": 23.3}, "unseen": {"AP": None}, "per_class": per_class},
        "gt_boxes": {
            "segm": {"seen": {"AP": 2.0}, "per_class": {"a": 1.0, "b": 2.0, "c": None, "d": 3.0}},
            "mean_iou": {"all": 0.5, "seen": 0.5, "unseen": None},
            "per_class_iou": {"a": 0.5, "b": 0.8, "c": None, "d": 0.2},
        },
    }
    split = on_split(metrics, ["a"], {"a": 1, "b": 3, "c": 0, "d": 1})
    assert split["segm"]["seen"] == {"AP": 10.0} and split["segm"]["unseen"] == {"AP": 30.0}
    assert split["gt_boxes"]["segm"]["seen"]["AP"] == 1.0
    assert split["gt_boxes"]["segm"]["unseen"]["AP"] == 2.5
    # instance-weighted: (0.8 * 3 + 0.2 * 1) / 4
    assert split["gt_boxes"]["mean_iou"] == {"all": 0.5, "seen": 0.5, "unseen": pytest.approx(0.65)}
    assert metrics["segm"]["seen"]["AP"] == 23.3  # the run's own numbers are not changed


# --- the grid ---------------------------------------------------------------------------------


def test_plan_trains_one_detector_per_seed_for_the_mask_branch_rows(tmp_path):
    study = Study(
        "s", "p", "a",
        (Row("a", "baseline-tiny"), Row("b", "maskx-tiny"), Row("c", "baseline-tiny", detector=("model.rpn.nms_thresh=0.6",))),  # noqa: E501
    )  # fmt: skip
    jobs = plan(study, out=tmp_path, seeds=2, steps=5, data={"val_json": "v.json"})
    detectors = [job for job in jobs if job.row is None]
    assert len(detectors) == 4 and len(jobs) == 10
    assert jobs[:4] == detectors  # detectors first
    b0 = next(job for job in jobs if job.name == "b / seed 0")
    assert b0.needs == "detector default / seed 0"
    assert f"model.init_from_run={tmp_path / 'detectors/default/seed_0'}" in b0.overrides
    assert {"train.stage=mask", "train.steps=5", "train.seed=0"} <= set(b0.overrides)
    c1 = next(job for job in jobs if job.name == "c / seed 1")
    assert c1.needs == "detector model-rpn-nms-thresh-0-6 / seed 1"


def test_a_data_folders_seen_classes_file_is_every_partial_rows_split(tmp_path):
    (tmp_path / "seen_classes.txt").write_text("circle\n")
    (split,) = seen_split(tmp_path)
    assert split == f"data.mask_classes={tmp_path / 'seen_classes.txt'}"
    assert seen_split(tmp_path / "easy") == []
    jobs = plan(STUDIES["maskx"], out=tmp_path, seeds=1, steps=1, data={}, overrides=[split])
    splits = {job.row: load_config(job.preset, job.overrides).data.mask_classes for job in jobs}
    assert splits["baseline (class-agnostic)"] == str(tmp_path / "seen_classes.txt")
    assert splits["oracle (all masks)"] == "all"


@pytest.mark.parametrize(
    "name, row",
    [(name, row) for name, study in STUDIES.items() for row in study.rows],
    ids=lambda value: value if isinstance(value, str) else value.name,
)
def test_every_study_row_is_a_valid_config(name, row, tmp_path):
    """Needs model.mask_head.loss and model.roi_pool (the ablations branch) for maskrcnn."""
    (job,) = [
        job
        for job in plan(STUDIES[name], out=tmp_path, seeds=1, steps=1, data={})
        if job.row == row.name
    ]
    load_config(job.preset, job.overrides)


def test_name_embedding_is_readable_as_glove_and_relates_names_by_spelling(tmp_path, synth_paths):
    names = [
        c["name"] for c in json.loads(Path(synth_paths["train_json"]).read_text())["categories"]
    ]  # noqa: E501
    path = write_name_embedding(names, tmp_path / "names.txt")
    vectors = word_vectors(path, names)
    assert vectors.shape == (len(names) + 1, 300)
    assert vectors[1:].norm(dim=1).allclose(vectors.new_ones(len(names)))
    assert (name_vector("circle") == name_vector("circle")).all()
    near = name_vector("circle") @ name_vector("semicircle")
    assert near > 0.5 > abs(name_vector("circle") @ name_vector("square"))


# --- running it -------------------------------------------------------------------------------


def test_study_md_has_every_row_and_the_reference_pairing(tiny_study):
    out, lines = tiny_study
    text = (out / "study.md").read_text()
    assert text.startswith("# tiny study")
    for row in TINY_STUDY.rows:
        assert f"| {row.name} | 1 |" in text
    assert "## Paired by seed: row minus `agnostic`" in text
    assert "All 3 runs finished." in text
    # the fully supervised row is scored on the reference row's seen / unseen classes
    assert "per-class AP and IoU: specific, end to end." in text
    summary = json.loads((out / "study.json").read_text())
    assert set(summary["rows"]) == {"agnostic", "specific, end to end"}
    agnostic = summary["rows"]["agnostic"]["0"]
    assert "gt_boxes" in agnostic and agnostic["seen_classes"]
    # the mask-branch row trained on the seed's detector and kept its box predictions
    run = out / "runs" / "agnostic" / "seed_0"
    config = load_config(str(RunDir(run).config))
    assert config.train.stage == "mask"
    assert config.model.init_from_run == str(out / "detectors" / "default" / "seed_0")
    assert (out / "study.html").is_file()


def test_two_jobs_run_at_once(tiny_study):
    _, lines = tiny_study
    events = [line.split()[0] for line in lines if line.split()[0] in ("start", "trained")]
    # the detector and the end-to-end row start together; the mask branch waits for its detector
    assert events[:3] == ["start", "start", "trained"]


def test_rerun_keeps_finished_runs_and_resumes_a_stopped_one(tiny_study, tmp_path):
    out = tmp_path / "study"
    shutil.copytree(tiny_study[0], out)
    kept = RunDir(out / "runs" / "agnostic" / "seed_0")
    stopped = RunDir(out / "runs" / "specific-end-to-end" / "seed_0")
    kept_mtime = kept.last.stat().st_mtime_ns
    stopped.metrics.unlink()  # stopped after its last checkpoint, before its evaluation
    lines: list[str] = []
    outcomes = run_study(
        TINY_STUDY, out=out, seeds=1, steps=3, data=_data_of(out), overrides=TINY,
        echo=lines.append,
    )  # fmt: skip
    assert outcomes["agnostic / seed 0"].status == "kept"
    assert outcomes["detector default / seed 0"].status == "kept"
    assert outcomes["specific, end to end / seed 0"].status == "trained"
    assert kept.last.stat().st_mtime_ns == kept_mtime
    assert [line.split()[0] for line in lines if " / seed " in line][:1] == ["resume"]
    log = (stopped.root.parent / "seed_0.log").read_text()
    assert "resumed from" in log and "at step 2" in log
    steps = [json.loads(line)["step"] for line in stopped.log.read_text().splitlines()]
    assert max(steps) == 3
    text = (out / "study.md").read_text()
    assert "other than 3 steps" in text and "- agnostic / seed 0: 2 steps" in text
    assert "- specific, end to end / seed 0:" not in text


def test_study_md_grows_run_by_run_while_the_study_trains(tiny_study, tmp_path):
    out = tmp_path / "study"
    shutil.copytree(tiny_study[0], out)
    (out / "study.html").unlink()
    RunDir(out / "runs" / "specific-end-to-end" / "seed_0").metrics.unlink()  # still training
    settings = json.loads((out / "study.json").read_text())["settings"]
    grid = plan(
        TINY_STUDY, out=out, seeds=1, steps=2, data=settings["data"],
        overrides=settings["overrides"],
    )  # fmt: skip
    done = {job.name: Outcome("trained") for job in grid if job.row != "specific, end to end"}
    write_study_report(TINY_STUDY, grid, done, out=out, settings=settings, html=False)
    text = (out / "study.md").read_text()
    assert "**1 of 3 runs still to train**" in text
    assert "| agnostic | 1 |" in text and "| specific, end to end | 0 | – |" in text
    assert "All 3 runs finished." not in text and not (out / "study.html").exists()


def test_a_run_copied_in_from_elsewhere_needs_only_its_config_and_metrics(tiny_study, tmp_path):
    # how a grid longer than one machine's time is shared: runs finished elsewhere are copied
    # in without their checkpoints and count as finished
    source = RunDir(tiny_study[0] / "runs" / "specific-end-to-end" / "seed_0")
    out = tmp_path / "study"
    copied = RunDir(out / "runs" / "specific-end-to-end" / "seed_0")
    copied.root.mkdir(parents=True)
    for path in (source.config, source.metrics):
        shutil.copy(path, copied.root / path.name)
    one_row = Study("one row", "a test", "specific, end to end", (TINY_STUDY.rows[1],))
    outcomes = run_study(
        one_row, out=out, seeds=1, steps=2, data=_data_of(tiny_study[0]), overrides=TINY,
        echo=lambda line: None,
    )  # fmt: skip
    assert outcomes["specific, end to end / seed 0"].status == "kept"
    assert "| specific, end to end | 1 |" in (out / "study.md").read_text()
    assert (out / "study.html").is_file()


def _data_of(study_dir: Path) -> Path:
    settings = json.loads((study_dir / "study.json").read_text())["settings"]
    return Path(settings["data"]["train_json"]).parents[1]


def test_a_failed_run_is_reported_by_name_and_what_needed_it_is_skipped(
    data_dir, tmp_path, monkeypatch, capsys
):
    broken = Study(
        "broken study", "a test", "ok",
        (Row("ok", "baseline-tiny", detector=("train.lr=-1",)),),
    )  # fmt: skip
    monkeypatch.setitem(STUDIES, "broken", broken)
    args = ["study", "broken", "--out", str(tmp_path), "--seeds", "1", "--data", str(data_dir)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "1 run(s) failed: detector train-lr-1 / seed 0" in err
    text = (tmp_path / "study.md").read_text()
    assert "## Failed runs (2 of 2)" in text
    assert "**detector train-lr-1 / seed 0** (failed): exit code 2" in text
    assert "train.lr" in text  # the end of its log: the config error
    assert "**ok / seed 0** (skipped): detector train-lr-1 / seed 0 did not finish" in text
    assert "| ok | 0 | – |" in text


def test_missing_data_folder_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["study", "maskx", "--out", str(tmp_path / "s"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "everyseg study: error: --data" in err and "annotations/train.json" in err


CHILD_OF_A_STUDY = """
import sys, time
from pathlib import Path
from everyseg.engine import study_runs

class Sleeper(study_runs.Job):
    def argv(self, *, resume):
        return [sys.executable, "-c", "import time; time.sleep(60)"]

job = Sleeper("sleeper / seed 0", Path(sys.argv[1]), "baseline-tiny", (), 0)
_, process, _ = study_runs._start(job, threads=1, echo=lambda line: None)
print(process.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_study_leaves_no_training_running(tmp_path):
    study = subprocess.Popen(
        [sys.executable, "-c", CHILD_OF_A_STUDY, str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        text=True,
    )
    training = int(study.stdout.readline())
    os.kill(training, 0)  # running
    study.kill()  # SIGKILL: execute's own cleanup never runs
    study.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(training):
        time.sleep(0.05)
    assert not _alive(training)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, reaped by init, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
