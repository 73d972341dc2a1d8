"""Training under torchrun: 2 CPU processes (gloo) match one process with the same global
batch, resume after a kill as if never interrupted, and only rank 0 writes the run."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from everyseg.config import ConfigError
from everyseg.engine import distributed
from everyseg.engine import train as train_module
from everyseg.engine.checkpoint import load_checkpoint
from everyseg.engine.run_dir import RunDir
from everyseg.engine.sampler import StepBatchSampler
from everyseg.engine.train import train

# Every loss torchvision computes is a mean over the samples of the process's batch; DDP then
# averages those means over the ranks. That equals one process's mean over the global batch
# when every image contributes the same number of samples to each loss, and RoI sampling
# draws nothing at random. These settings make it so on images of one shared geometry:
EXACT = [
    "train.steps=4",
    "train.lr=0.02",
    "data.hflip_prob=0.0",
    "model.rpn.batch_size_per_image=100000",  # every anchor not ignored: a geometry count
    # 4 proposals survive NMS in every image. From random weights their scores sit within
    # ~1e-5 of 0.5, so float noise can swap the last survivor with the first left out where
    # they nearly tie: at 8 they came within 1.2e-6 (step 3), a swap and 1.5e-4 apart at
    # step 4; the 4th and 5th stay >= 9e-6 apart
    "model.rpn.post_nms_top_n_train=4",
    "model.box_head.batch_size_per_image=100000",  # all 4 + the ground truth
    "model.mask_head.train_rois=gt",  # one mask RoI per instance
]
# measured: 2-process weights within 1.2e-7 of one process's, after 4 steps moved them 2.7e-2
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(config: Path, out: Path, *extra: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    argv += [f"--master_port={_free_port()}", "-m", "everyseg", "train", str(config)]
    argv += ["--out", str(out), "--no-eval", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a session of its own: a kill takes the launcher and both workers, as a lost node would
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
    )


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (err or b"").decode()[-3000:]
    return (err or b"").decode()


def _same_geometry_data(root: Path) -> dict[str, str]:
    """Two 64 px images with the same two masked instances, painted in different colours."""
    images = root / "img"
    images.mkdir(parents=True)
    square = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]
    bar = [36.0, 20.0, 58.0, 20.0, 58.0, 50.0, 36.0, 50.0]
    entries, anns = [], []
    for image_id, (back, front) in enumerate([(20, 200), (180, 40)], start=1):
        pixels = np.full((64, 64, 3), back, dtype=np.uint8)
        pixels[10:30, 10:30] = (front, 255 - front, 90)
        pixels[20:50, 36:58] = (90, front, 255 - front)
        Image.fromarray(pixels).save(images / f"{image_id}.png")
        entries.append({"id": image_id, "file_name": f"{image_id}.png", "width": 64, "height": 64})
        for k, (poly, cat) in enumerate([(square, 1), (bar, 2)]):
            xs, ys = poly[0::2], poly[1::2]
            box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            anns.append(
                {
                    "id": 10 * image_id + k,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "segmentation": [poly],
                    "iscrowd": 0,
                }
            )
    cats = [{"id": 1, "name": "square"}, {"id": 2, "name": "bar"}]
    json_path = root / "ann.json"
    json_path.write_text(json.dumps({"images": entries, "annotations": anns, "categories": cats}))
    return {
        "train_json": str(json_path),
        "train_images": str(images),
        "val_json": str(json_path),
        "val_images": str(images),
    }


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)["model"]
    return {k: v for k, v in state.items() if v.is_floating_point()}


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _logged_steps(run: RunDir) -> list[int]:
    return [json.loads(line)["step"] for line in run.log.read_text().splitlines()]


def test_two_processes_match_one_with_the_same_global_batch(make_config, tmp_path):
    paths = _same_geometry_data(tmp_path / "data")
    cfg = make_config(*EXACT, paths=paths)
    config = tmp_path / "config.yaml"
    config.write_text(cfg.to_yaml())
    two = RunDir(tmp_path / "two")
    proc = _torchrun(config, two.root)  # runs while this process trains the reference
    one = train(cfg, out_dir=tmp_path / "one", progress=False)
    _finish(proc)

    frozen = make_config(*EXACT, "train.lr=0.0", paths=paths)
    start = train(frozen, out_dir=tmp_path / "start", progress=False)
    moved = _max_difference(_weights(one.last), _weights(start.last))
    difference = _max_difference(_weights(one.last), _weights(two.last))
    print(f"2 processes vs 1: max |difference| {difference:.2e}; weights moved {moved:.2e}")
    assert moved > 0.01 and difference < TOLERANCE
    # rank 0 alone wrote: each step logged once, the losses those of the global batch
    assert _logged_steps(two) == _logged_steps(one) == [1, 2, 3, 4]
    for a, b in zip(*(map(json.loads, r.log.read_text().splitlines()) for r in (one, two))):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert sorted(p.name for p in two.root.iterdir()) == sorted(p.name for p in one.root.iterdir())
    if importlib.util.find_spec("tensorboard") is not None:  # train.tensorboard=auto
        assert len(list(two.tensorboard.iterdir())) == 1  # rank 0's event file alone
    assert sorted(p.name for p in two.checkpoints.iterdir()) == [
        "index.json",
        "last.pt",
        "model.pt",
    ]


def _last_logged_step(run: RunDir) -> int:
    steps = [0]
    for line in run.log.read_text().splitlines() if run.log.is_file() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):  # the half line of a killed writer
            continue
    return max(steps)


def test_kill_and_resume_under_torchrun_ends_as_an_uninterrupted_run(make_config, tmp_path):
    steps = 4
    cfg = make_config(f"train.steps={steps}", "train.checkpoint_every=2")
    config = tmp_path / "config.yaml"
    config.write_text(cfg.to_yaml())
    straight, killed = RunDir(tmp_path / "straight"), RunDir(tmp_path / "killed")
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        proc = _torchrun(config, killed.root, stderr=stderr)
        deadline = time.monotonic() + 120
        while _last_logged_step(killed) < 3:  # past the step-2 checkpoint
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "step 3 not reached in 120 s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers at once
        proc.wait()
    resumed_from = load_checkpoint(killed.last)["step"]
    assert 2 <= resumed_from < steps
    _finish(_torchrun(config, killed.root, "--resume"))
    _finish(_torchrun(config, straight.root))
    assert load_checkpoint(killed.last)["step"] == steps
    assert _max_difference(_weights(killed.last), _weights(straight.last)) == 0.0
    assert _logged_steps(killed) == list(range(1, steps + 1))  # trimmed, logged by rank 0 only


def test_an_error_on_rank_0_ends_every_rank(trained_run, copy_run, tmp_path):
    run = copy_run(trained_run)
    config = tmp_path / "config.yaml"
    config.write_text(run.config.read_text())
    proc = _torchrun(config, run.root)  # the run exists and --resume is missing
    _, err = proc.communicate(timeout=120)  # no rank waits forever for rank 0
    assert proc.returncode != 0
    assert "everyseg train: error: " in err.decode() and "pass --resume" in err.decode()
    assert "rank 0 failed: FileExistsError" in err.decode()  # rank 1's account of it


def test_the_global_batch_is_split_over_the_ranks():
    one = StepBatchSampler(num_items=7, batch_size=4, seed=3, start_step=2)
    ranks = [
        StepBatchSampler(num_items=7, batch_size=4, seed=3, start_step=2, rank=r, world_size=2)
        for r in range(2)
    ]
    for _, whole, *shares in zip(range(6), one, *ranks):
        assert shares[0] + shares[1] == whole and len(shares[0]) == 2
    with pytest.raises(ValueError, match="must be divisible by the number of processes, 3"):
        StepBatchSampler(num_items=7, batch_size=4, seed=3, world_size=3)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.batch_size=3"], "make it a multiple of 2"),
        (["model.backbone.norm=bn"], "SyncBatchNorm, which runs on CUDA only; on the CPU use gn"),
    ],
)
def test_configs_two_cpu_processes_cannot_train(make_config, tmp_path, monkeypatch, sets, message):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match=message):
        train_module.train(make_config(*sets), out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
