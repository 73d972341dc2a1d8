"""Run directories and checkpoints: nothing loaded runs code, one writer per directory, resume
says what is wrong, files follow the umask, a full disk is a plain error, model.pt to share."""

import errno
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from everyseg.cli import main
from everyseg.engine.checkpoint import load_checkpoint, save_checkpoint
from everyseg.engine.files import atomic_write_bytes
from everyseg.engine.load import load_run
from everyseg.engine.run_dir import RunDir, RunDirInUse, RunRecord
from everyseg.engine.train import train
from everyseg.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(trained_run) -> RunDir:
    """The session's finished 2-step run, trained under umask 002 (group-writable files)."""
    return trained_run


# --- nothing everyseg loads may run code ------------------------------------------------------


class _RunsCode:
    """Unpickling this makes the directory `marker`: what a crafted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _craft(run: RunDir, into: Path, marker: Path) -> RunDir:
    """A copy of `run` whose last.pt runs code when unpickled."""
    crafted = RunDir(into)
    shutil.copytree(run.root, crafted.root)
    state = load_checkpoint(run.last)
    state["config"] = {**state["config"], "train": _RunsCode(marker)}
    torch.save(state, crafted.last)
    return crafted


ENTRY_POINTS = {
    "load_checkpoint": lambda crafted, make_config: load_checkpoint(crafted.last),
    "load_run": lambda crafted, make_config: load_run(crafted.root),
    "load_run-checkpoint-path": lambda crafted, make_config: load_run(
        ".", checkpoint=str(crafted.last)
    ),
    "Predictor": lambda crafted, make_config: Predictor.from_run(crafted.root),
    "train-resume": lambda crafted, make_config: train(
        make_config("train.steps=4"), out_dir=crafted.root, resume=True, progress=False
    ),
    "init-from-run": lambda crafted, make_config: train(
        make_config(f"model.init_from_run={crafted.root}"),
        out_dir=crafted.root.parent / "stage2",
        progress=False,
    ),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_checkpoint_that_would_run_code_is_refused(run, make_config, tmp_path, entry):
    marker = tmp_path / "code-ran"
    crafted = _craft(run, tmp_path / "crafted", marker)
    with pytest.raises(ValueError, match=r"last.pt: refused to load: it holds a posix.mkdir"):
        ENTRY_POINTS[entry](crafted, make_config)
    assert not marker.exists()


@pytest.mark.parametrize("verb", ["evaluate", "predict"])
def test_cli_refuses_a_checkpoint_that_would_run_code(run, synth_paths, tmp_path, verb, capsys):
    marker = tmp_path / "code-ran"
    crafted = _craft(run, tmp_path / "crafted", marker)
    image = next(Path(synth_paths["val_images"]).iterdir())
    argv = {"evaluate": [], "predict": [str(image), "--out", str(tmp_path / "out")]}[verb]
    assert main([verb, str(crafted.root), *argv]) == 2
    assert f"everyseg {verb}: error: {crafted.last}: refused to load" in capsys.readouterr().err
    assert not marker.exists()


def test_garbage_checkpoint_is_a_plain_error(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="last.pt: not a readable checkpoint"):
        load_checkpoint(path)


def test_checkpoint_whose_weights_do_not_fit_its_config(run, tmp_path):
    state = load_checkpoint(run.last)
    state["config"]["model"]["backbone"]["fpn_channels"] = 8  # the weights have 16
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="edited.pt: its weights do not fit the model its config"):
        load_run(run.root, checkpoint=str(tmp_path / "edited.pt"))


def test_checkpoints_load_weights_only_and_model_pt_is_slim(run, synth_paths):
    full = torch.load(run.last, weights_only=True)
    slim = torch.load(run.model, weights_only=True)
    record = {"config", "class_names", "label_to_cat_id", "mask_classes", "train_instances"}
    assert set(slim) == record | {"step", "model"}
    assert set(full) == set(slim) | {"optimizer", "scheduler", "scaler", "rng"}
    assert slim["step"] == full["step"] == 2
    assert all(torch.equal(slim["model"][k], v) for k, v in full["model"].items())
    assert json.loads(run.index.read_text())["model.pt"]["step"] == 2
    image = next(Path(synth_paths["val_images"]).iterdir())
    from_last = Predictor.from_run(run.root)
    from_model = Predictor.from_run(run.root, checkpoint="model")
    assert from_model.class_names == from_last.class_names
    assert (from_model(image).scores == from_last(image).scores).all()
    loaded = load_run(run.root, checkpoint=str(run.model))
    assert loaded.step == 2 and loaded.path == run.model
    assert loaded.record == RunRecord.from_plain(full, source=run.last)


# --- one writer per run directory ---------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from everyseg.engine.run_dir import RunDir
with RunDir(Path(sys.argv[1])).lock():
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_training_into_a_run_dir_is_refused_until_the_first_ends(tiny_cfg, tmp_path):
    root = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        busy = rf"in use by another training run \(pid {holder.pid} on "
        with pytest.raises(RunDirInUse, match=busy):
            train(tiny_cfg, out_dir=root, progress=False)
        assert not RunDir(root).config.exists()  # refused before writing anything
    finally:
        holder.kill()  # as a crash would: the kernel releases the lock
        holder.wait()
        holder.stdout.close()
    assert train(tiny_cfg, out_dir=root, progress=False).last.is_file()


def test_a_second_lock_in_the_same_process_is_refused_too(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.lock(), pytest.raises(RunDirInUse, match=f"pid {os.getpid()} on "):
        with run.lock():
            pass
    with run.lock():  # released on leaving
        pass


# --- resuming -----------------------------------------------------------------------------------


def test_resume_without_a_checkpoint_says_so(tiny_cfg, tmp_path):
    message = r"no checkpoint in .*new to resume .*; drop --resume to start a new run"
    with pytest.raises(FileNotFoundError, match=message):
        train(tiny_cfg, out_dir=tmp_path / "new", resume=True, progress=False)
    assert not (tmp_path / "new").exists()


def test_new_run_after_one_killed_before_its_first_checkpoint_logs_each_step_once(
    tiny_cfg, tmp_path
):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.log.write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n{"st')  # killed
    train(tiny_cfg, out_dir=run.root, progress=False)  # as `everyseg demo` re-run does
    steps = [json.loads(line)["step"] for line in run.log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_with_renamed_classes_is_refused(run, make_config, synth_paths, tmp_path):
    data = json.loads(Path(synth_paths["train_json"]).read_text())
    old_name = data["categories"][0]["name"]
    data["categories"][0]["name"] = "renamed"
    renamed = tmp_path / "train.json"
    renamed.write_text(json.dumps(data))
    shutil.copytree(run.root, tmp_path / "run")
    cfg = make_config("train.steps=4", paths={**synth_paths, "train_json": renamed})
    with pytest.raises(ValueError, match=rf"renamed '{old_name}' -> 'renamed' \(category id 1\)"):
        train(cfg, out_dir=tmp_path / "run", resume=True, progress=False)


def _record(classes: dict[int, str]) -> RunRecord:
    names = list(classes.values())
    return RunRecord(
        config={},
        class_names=names,
        label_to_cat_id={k + 1: cat for k, cat in enumerate(classes)},
        mask_classes=names,
    )


@pytest.mark.parametrize(
    ("theirs", "difference"),
    [
        ({1: "cat", 2: "dog", 3: "cow"}, "added ['cow']"),
        ({1: "cat"}, "removed ['dog']"),
        ({1: "cat", 2: "hound"}, "renamed 'dog' -> 'hound' (category id 2)"),
        ({1: "cat", 7: "dog"}, "category id of 'dog' 2 -> 7"),
    ],
)
def test_class_differences_name_each_change(theirs, difference):
    assert _record({1: "cat", 2: "dog"}).class_differences(_record(theirs)) == [difference]
    assert _record(theirs).class_differences(_record(theirs)) == []


# --- the files a run writes ---------------------------------------------------------------------


def test_run_files_follow_the_umask(run, tmp_path):
    for path in (run.config, run.last, run.model, run.index, run.log):
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path
    previous = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "metrics.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o640


def check_checkpoint_on_a_full_disk(directory: Path) -> None:
    """On a 256 KiB file system: a checkpoint that does not fit fails with the documented
    message and leaves the previous one intact. Also run in a subprocess (see below)."""
    path = directory / "last.pt"
    save_checkpoint(path, {"step": 1, "model": {"w": torch.zeros(10_000)}})  # 40 kB
    full = r"could not write .*last.pt: the disk is full; any previous file there is intact"
    with pytest.raises(OSError, match=full) as err:
        save_checkpoint(path, {"step": 2, "model": {"w": torch.ones(100_000)}})  # 400 kB
    assert err.value.errno == errno.ENOSPC
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in directory.iterdir()) == ["index.json", "last.pt"]


def test_full_disk_is_the_documented_error_on_a_real_file_system(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)]
    if os.geteuid() == 0 and subprocess.run(mount, capture_output=True).returncode == 0:
        try:
            check_checkpoint_on_a_full_disk(mount_point)
        finally:
            subprocess.run(["umount", str(mount_point)], check=True)
        return
    # not root: a user and mount namespace of our own may mount a tmpfs
    unshare = ["unshare", "--user", "--map-root-user", "--mount"]
    if not shutil.which("unshare") or subprocess.run([*unshare, "true"]).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root or unprivileged user namespaces")
    check = (  # this file's check, loaded by path: test files are not a package to import
        "import runpy; from pathlib import Path;"
        f" check = runpy.run_path({__file__!r})['check_checkpoint_on_a_full_disk'];"
        f" check(Path({str(mount_point)!r}))"
    )
    python = f"{shlex.quote(sys.executable)} -c {shlex.quote(check)}"
    script = f"{shlex.join(mount)} || exit 77; exec {python}"
    done = subprocess.run([*unshare, "sh", "-c", script], cwd=REPO, capture_output=True, text=True)
    if done.returncode == 77:
        pytest.skip(f"cannot mount a tmpfs in a user namespace: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr[-3000:]
