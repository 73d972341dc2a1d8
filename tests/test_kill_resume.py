"""Crash safety: SIGKILL at random moments then --resume ends with the same weights; checkpoint
writes that fail say why and keep the previous file; NaN/Inf losses stop or skip; bad samples
stop neither training (DataLoader workers included) nor evaluation."""

import errno
import itertools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from everyseg.cli import main
from everyseg.config import ConfigError
from everyseg.data.coco import DataError
from everyseg.data.synthetic import generate
from everyseg.engine import files as files_module
from everyseg.engine import train as train_module
from everyseg.engine.checkpoint import load_checkpoint
from everyseg.engine.evaluate_run import evaluate_run
from everyseg.engine.files import atomic_write_bytes
from everyseg.engine.run_dir import RunDir
from everyseg.engine.train import train

STEPS, KILLS = 12, 3
NAN = float("nan")


def _last_logged_step(log) -> int:
    steps = [0]
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):  # the half line of a killed writer
            continue
    return max(steps)


def _start(config, run, *, resume: bool, stderr):
    argv = [sys.executable, "-m", "everyseg.cli", "train", str(config), "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as the in-process reference
    argv += ["--no-eval"] + (["--resume"] if resume else [])
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def _kill_after_step(proc, log, step: int, delay: float, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while _last_logged_step(log) < step:
        assert proc.poll() is None, f"training exited early with code {proc.returncode}"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.01)
    time.sleep(delay)  # lands anywhere in the next step, or in a checkpoint write
    proc.kill()
    proc.wait()


def test_sigkill_at_random_moments_then_resume_gives_identical_weights(make_config, tmp_path):
    cfg = make_config(f"train.steps={STEPS}", "train.checkpoint_every=2")
    config = tmp_path / "config.yaml"
    config.write_text(cfg.to_yaml())
    run = RunDir(tmp_path / "killed")
    rng = random.Random(5)
    resumed_from = []
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        for kill in range(KILLS):
            target = _last_logged_step(run.log) + rng.randint(1, 3)
            proc = _start(config, run.root, resume=kill > 0, stderr=stderr)
            _kill_after_step(proc, run.log, target, delay=rng.uniform(0.0, 0.25))
            # atomic writes: whatever the moment, last.pt (if any) is complete and loads
            resumed_from.append(load_checkpoint(run.last)["step"] if run.last.is_file() else 0)
        final = _start(config, run.root, resume=True, stderr=stderr)
        assert final.wait(timeout=300) == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert len(resumed_from) == KILLS and resumed_from[-1] < STEPS, resumed_from

    reference = load_checkpoint(train(cfg, out_dir=tmp_path / "straight", progress=False).last)
    killed = load_checkpoint(run.last)
    assert killed["step"] == reference["step"] == STEPS
    differ = [
        k for k in reference["model"] if not torch.equal(reference["model"][k], killed["model"][k])
    ]
    assert not differ, differ[:5]
    assert [json.loads(line)["step"] for line in run.log.read_text().splitlines()] == list(
        range(1, STEPS + 1)
    )  # trimmed on each resume: no step logged twice, no half line
    assert json.loads(run.index.read_text())["last.pt"]["step"] == STEPS
    assert not list(run.checkpoints.glob("*.tmp"))


# --- failing checkpoint writes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "plain"),
    [
        (errno.ENOSPC, "the disk is full"),
        (errno.EDQUOT, "the disk quota is exceeded"),
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "the file system is read-only"),
    ],
)
def test_failed_write_says_why_and_keeps_the_previous_file(tmp_path, monkeypatch, code, plain):
    target = tmp_path / "last.pt"
    target.write_bytes(b"previous")

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files_module.os, "fsync", fail)
    with pytest.raises(
        OSError, match=f"could not write .*last.pt: {plain}; any previous file"
    ) as err:
        atomic_write_bytes(target, lambda f: f.write(b"new"))
    assert err.value.errno == code
    assert target.read_bytes() == b"previous" and sorted(tmp_path.iterdir()) == [target]


def test_disk_full_during_training_is_a_plain_cli_error(make_config, tmp_path, monkeypatch, capsys):
    cfg = make_config("train.steps=4", "train.checkpoint_every=2")
    config = tmp_path / "config.yaml"
    config.write_text(cfg.to_yaml())
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if obj["step"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = RunDir(tmp_path / "run")
    assert main(["train", str(config), "--out", str(run.root), "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert f"everyseg train: error: [Errno {errno.ENOSPC}] could not write {run.last}" in err
    assert "the disk is full" in err
    assert load_checkpoint(run.last)["step"] == 2  # the previous checkpoint is intact
    assert json.loads(run.index.read_text())["last.pt"]["step"] == 2


# --- NaN / Inf losses ---------------------------------------------------------------------------


def _poison(monkeypatch, *, at_step: int, term: str, value: float) -> None:
    """Make the model's loss `term` `value` at training step `at_step` (counted from 1)."""
    build = train_module.build_model

    def poisoned_build(*args, **kwargs):
        model = build(*args, **kwargs)
        forward, calls = model.forward, itertools.count(1)

        def poisoned(images, targets=None):
            losses = forward(images, targets)
            if next(calls) == at_step:
                losses[term] = losses[term] * value
            return losses

        model.forward = poisoned
        return model

    monkeypatch.setattr(train_module, "build_model", poisoned_build)


def test_unknown_nonfinite_policy_is_a_config_error(make_config, tmp_path):
    # refused when the config loads, before train() could create anything
    with pytest.raises(ConfigError, match="train.on_nonfinite_loss: expected stop or skip"):
        cfg = make_config("train.on_nonfinite_loss=ignore")
        train(cfg, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_naming_step_and_term(make_config, tmp_path, monkeypatch):
    _poison(monkeypatch, at_step=4, term="loss_mask", value=float("nan"))
    cfg = make_config("train.steps=6", "train.checkpoint_every=2")
    with pytest.raises(FloatingPointError, match="step 4: loss_mask is nan; training stopped"):
        train(cfg, out_dir=tmp_path / "run", progress=False)
    state = load_checkpoint(RunDir(tmp_path / "run").last)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_inf_loss_is_skipped_when_asked(make_config, tmp_path, monkeypatch):
    _poison(monkeypatch, at_step=3, term="loss_box_reg", value=float("inf"))
    cfg = make_config("train.steps=4", "train.keep_every=1", "train.on_nonfinite_loss=skip")
    run = train(cfg, out_dir=tmp_path / "run", progress=False)
    records = [json.loads(line) for line in run.log.read_text().splitlines()]
    assert [r.get("skipped") for r in records] == [None, None, "loss_box_reg is inf", None]
    before, after = (load_checkpoint(run.snapshot(s)) for s in (2, 3))
    assert _same(before["model"], after["model"])  # no update, BatchNorm statistics restored
    assert _same(before["optimizer"]["state"], after["optimizer"]["state"])  # nor momentum
    assert not _same(after["model"], load_checkpoint(run.snapshot(4))["model"])


def test_weights_gone_nan_stop_training_without_a_nan_checkpoint(
    make_config, tmp_path, monkeypatch
):
    """An update that makes the weights NaN while its loss was finite: the following losses
    are NaN and, under skip, skipped; training must stop, not finish with a NaN model."""
    real_step = train_module.train_one_step

    def diverging(model, *args, step, **kwargs):
        values = real_step(model, *args, step=step, **kwargs)
        if step + 1 == 3:
            with torch.no_grad():
                model.roi_heads.box_predictor.cls_score.weight.fill_(NAN)
        return values

    monkeypatch.setattr(train_module, "train_one_step", diverging)
    cfg = make_config("train.steps=6", "train.checkpoint_every=2", "train.on_nonfinite_loss=skip")
    run = RunDir(tmp_path / "run")
    message = (
        r"step 3: the model's weights hold NaN or Inf \(roi_heads.box_predictor.cls_score.weight\)"
        rf"; training stopped .*; the last checkpoint, {run.last}, is intact"
    )
    with pytest.raises(FloatingPointError, match=message):
        train(cfg, out_dir=run.root, progress=False)
    for path in (run.last, run.model):
        state = load_checkpoint(path)
        assert state["step"] == 2
        assert all(
            torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
        )


def test_stop_before_any_checkpoint_says_none_was_written(make_config, tmp_path, monkeypatch):
    _poison(monkeypatch, at_step=1, term="loss_mask", value=NAN)
    run = RunDir(tmp_path / "run")
    with pytest.raises(FloatingPointError, match="step 1: .*; no checkpoint was written"):
        train(make_config("train.steps=2"), out_dir=run.root, progress=False)
    assert not run.checkpoints.exists()


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


# --- bad samples in training and evaluation -----------------------------------------------------


def _spoil(paths) -> None:
    """A missing training image, a NaN box, a training image whose pixel data is corrupt (its
    header and end intact, so only decoding finds it), a missing val image."""
    train_json = Path(paths["train_json"])
    data = json.loads(train_json.read_text())
    data["images"].append({"id": 999, "file_name": "gone.png", "width": 64, "height": 64})
    data["annotations"].append({**data["annotations"][0], "id": 10**6, "bbox": [1, NAN, 3, 3]})
    train_json.write_text(json.dumps(data))
    image = Path(paths["train_images"]) / data["images"][0]["file_name"]
    pixels = bytearray(image.read_bytes())
    middle = len(pixels) // 2
    pixels[middle : middle + 40] = bytes(b ^ 0x55 for b in pixels[middle : middle + 40])
    image.write_bytes(bytes(pixels))
    val = json.loads(Path(paths["val_json"]).read_text())
    (Path(paths["val_images"]) / val["images"][0]["file_name"]).unlink()


def test_bad_samples_stop_neither_training_nor_evaluation(make_config, tmp_path, capfd):
    paths = generate(tmp_path / "data", num_train=4, num_val=3, size=64, seed=1, progress=False)
    _spoil(paths)
    cfg = make_config("train.steps=4", "data.num_workers=1", paths=paths)  # a real worker
    run = train(cfg, out_dir=tmp_path / "run", progress=False)
    out, err = capfd.readouterr()
    assert "image 999, " in out and "gone.png" in out  # the start-up summary
    assert "bbox missing or not 4 finite numbers: 1 (annotation ids: 1000000)" in out
    assert "cannot read image" in err and "the next image stands in for it" in err
    metrics = evaluate_run(run.root, progress=False)
    assert metrics["images"] == 2  # the missing val image is skipped, and said so
    assert "image file not found: 1" in capfd.readouterr().out
    strict = make_config("data.on_bad_sample=error", paths=paths)
    with pytest.raises(DataError, match="image 999, .*gone.png: image file not found"):
        train(strict, out_dir=tmp_path / "strict", progress=False)
