"""TensorBoard event files beside log.jsonl, read back with TensorBoard's own reader; the wall
time and peak memory of log.jsonl's records."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from everyseg.config import ConfigError
from everyseg.engine.train import train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)


def _events(root) -> EventAccumulator:
    events = EventAccumulator(str(root), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def _scalars(events: EventAccumulator, tag: str) -> dict[int, float]:
    points = events.Scalars(tag)
    steps = [p.step for p in points]
    assert len(steps) == len(set(steps)), f"{tag} logged a step twice: {steps}"
    return {p.step: p.value for p in points}


def _train_records(run) -> list[dict]:
    records = [json.loads(line) for line in run.log.read_text().splitlines()]
    return [r for r in records if "loss" in r]


def test_training_writes_losses_lr_eval_ap_and_overlays(train_tiny, tmp_path):
    run = train_tiny(
        tmp_path / "run",
        "train.steps=4",
        "train.eval_every=2",
        "data.mask_classes=[circle, star, ring]",
        "train.tensorboard=on",
    )
    assert list(run.tensorboard.glob("events.out.tfevents.*")), "no event file in tensorboard/"
    events = _events(run.tensorboard)
    records = _train_records(run)
    for key in ("loss", "loss_mask", "loss_classifier"):
        logged = _scalars(events, f"train/{key}")
        assert logged == pytest.approx({r["step"]: r[key] for r in records}, rel=1e-6)
    assert _scalars(events, "run/lr") == pytest.approx({r["step"]: r["lr"] for r in records})
    ap = {
        json.loads(line)["step"]: json.loads(line)["eval"]["segm_AP"]
        for line in run.log.read_text().splitlines()
        if "eval" in line
    }
    assert _scalars(events, "eval/segm_AP_all") == pytest.approx(ap, abs=1e-4)
    for tag in ("eval/segm_AP_seen", "eval/segm_AP_unseen", "eval/bbox_AP_all"):
        assert sorted(_scalars(events, tag)) == [2, 4]
    overlays = [tag for tag in events.Tags()["images"] if tag.startswith("overlays/")]
    assert len(overlays) == 3
    assert [image.step for image in events.Images(overlays[0])] == [2, 4]


def test_log_records_wall_time_and_peak_memory(train_tiny, tmp_path):
    run = train_tiny(tmp_path / "run", "train.steps=3", "train.tensorboard=off")
    records = _train_records(run)
    times = [r["time"] for r in records]
    assert times == sorted(times) and times[0] > 0
    assert all(r["max_rss_mb"] > 50 for r in records)  # torch alone takes more
    assert "max_cuda_mb" not in records[0]  # a CPU run
    assert not list(run.tensorboard.glob("events.out.tfevents.*"))


def test_resume_appends_without_logging_a_step_twice(make_config, tmp_path):
    """A process killed after step 4 whose last checkpoint is step 2: the resumed run's
    TensorBoard shows each step once, with the values of the steps it trained again."""
    sets = ("train.checkpoint_every=2", "train.keep_every=2", "train.tensorboard=on")
    run = train(make_config("train.steps=4", *sets), out_dir=tmp_path / "run", progress=False)
    shutil.copy(run.snapshot(2), run.last)  # what the killed process left behind
    first_times = {r["step"]: r["time"] for r in _train_records(run)}
    train(make_config("train.steps=6", *sets), out_dir=run.root, resume=True, progress=False)
    records = _train_records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    logged = _scalars(_events(run.tensorboard), "train/loss")
    assert logged == pytest.approx({r["step"]: r["loss"] for r in records}, rel=1e-6)
    times = [r["time"] for r in records]
    assert times == sorted(times) and times[2] > first_times[2]  # the clock went on


def test_tensorboard_on_without_the_package_names_the_extra(make_config, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a),
    )
    with pytest.raises(ConfigError, match=r"train\.tensorboard=on .*everyseg\[tensorboard\]"):
        train(make_config("train.steps=1", "train.tensorboard=on"), out_dir=tmp_path / "on")
    run = train(make_config("train.steps=1"), out_dir=tmp_path / "auto", progress=False)
    assert run.log.is_file() and not list(run.tensorboard.glob("events.out.tfevents.*"))


@pytest.mark.parametrize(("text", "value"), [("on", "on"), ("off", "off"), ("auto", "auto")])
def test_tensorboard_setting_reads_yaml_on_and_off(make_config, text, value):
    # YAML 1.1 reads unquoted on/off as booleans
    assert make_config(f"train.tensorboard={text}").train.tensorboard == value
