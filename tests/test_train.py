"""Training loop: exact resume, checkpoints, logs, schedules, step-indexed sampling."""

import copy
import json
import math

import pytest
import torch

from everyseg.config import TrainConfig, load_config
from everyseg.engine import train as train_module
from everyseg.engine.checkpoint import load_checkpoint
from everyseg.engine.optim import lr_factor
from everyseg.engine.run_dir import RunDir
from everyseg.engine.sampler import StepBatchSampler
from everyseg.engine.train import train
from everyseg.modeling.channels_last import GroupNorm, PointwiseConv2d


def _weights(run: RunDir) -> dict[str, torch.Tensor]:
    return load_checkpoint(run.last)["model"]


def test_resume_continues_exactly(make_config, tmp_path, monkeypatch):
    n = 3
    cfg = make_config(f"train.steps={2 * n}", f"train.checkpoint_every={n}")
    straight = train(cfg, out_dir=tmp_path / "a", progress=False)

    real_step = train_module.train_one_step

    def interrupted(*args, step, **kwargs):
        if step == n:
            raise KeyboardInterrupt  # the run dies after its step-n checkpoint was written
        return real_step(*args, step=step, **kwargs)

    monkeypatch.setattr(train_module, "train_one_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out_dir=tmp_path / "b", progress=False)
    monkeypatch.undo()
    assert load_checkpoint(RunDir(tmp_path / "b").last)["step"] == n
    resumed = train(cfg, out_dir=tmp_path / "b", resume=True, progress=False)

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, changed[:5]
    # training did move the weights, so the equality above means something
    first = load_checkpoint(RunDir(tmp_path / "b").checkpoints / "last.pt")["step"]
    assert first == 2 * n
    untrained = train(
        make_config("train.steps=1", "train.lr=0.0"),
        out_dir=tmp_path / "c",
        progress=False,
    )
    moved = [
        k for k in a if a[k].is_floating_point() and not torch.equal(a[k], _weights(untrained)[k])
    ]
    assert moved


def test_run_directory_contents(trained_run):
    run = trained_run  # 2 steps, logged every step
    state = load_checkpoint(run.last)
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "step",
        "rng",
        "config",
        "class_names",
        "label_to_cat_id",
        "mask_classes",
    ):
        assert key in state, key
    assert state["step"] == 2
    assert len(state["class_names"]) == 14 and state["label_to_cat_id"][1] == 1
    assert run.config.is_file()
    records = [json.loads(line) for line in run.log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and "loss_mask" in r and "lr" in r for r in records)
    assert not list(run.checkpoints.glob("*.tmp"))  # atomic writes leave no temp files


def test_existing_run_needs_resume(trained_run, copy_run, tiny_cfg):
    run = copy_run(trained_run)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_cfg, out_dir=run.root, progress=False)


def test_loss_falls_when_training(make_config, tmp_path):
    cfg = make_config(
        "train.steps=40",
        "train.lr=0.02",
        "train.warmup_steps=5",
        "data.hflip_prob=0.0",
    )
    run = train(cfg, out_dir=tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in run.log.read_text().splitlines()]
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8


def test_sampler_is_a_pure_function_of_the_step():
    full = StepBatchSampler(num_items=5, batch_size=3, seed=1)
    stream = [b for _, b in zip(range(6), full)]
    later = StepBatchSampler(num_items=5, batch_size=3, seed=1, start_step=2)
    assert [b for _, b in zip(range(4), later)] == stream[2:]
    # each epoch visits every item once
    positions = [i for batch in stream for i, _ in batch]
    assert sorted(positions[:5]) == list(range(5)) and sorted(positions[5:10]) == list(range(5))
    assert len({seed for batch in stream for _, seed in batch}) == 18
    other = StepBatchSampler(num_items=5, batch_size=3, seed=2)
    assert [b for _, b in zip(range(6), other)] != stream


def test_lr_schedule_warmup_step_and_cosine():
    cfg = TrainConfig(steps=100, warmup_steps=10, warmup_factor=0.1, milestones=[50, 80], gamma=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(5, cfg) == pytest.approx(0.55)
    assert lr_factor(10, cfg) == 1.0 and lr_factor(49, cfg) == 1.0
    assert lr_factor(50, cfg) == pytest.approx(0.1) and lr_factor(80, cfg) == pytest.approx(0.01)
    cos = TrainConfig(steps=100, warmup_steps=0, schedule="cosine")
    assert lr_factor(0, cos) == 1.0 and lr_factor(50, cos) == pytest.approx(0.5)
    assert lr_factor(100, cos) == pytest.approx(0.0)
    # an unknown schedule never reaches lr_factor: it is refused when the config loads
    with pytest.raises(ValueError, match="train.schedule"):
        load_config("maskrcnn-tiny", ["train.schedule=linear"])


def test_run_buckets_classes_by_their_training_instances(trained_run, synth_paths):
    # the synthetic val set has no LVIS frequencies: the run's own training counts bucket it
    counts = load_checkpoint(trained_run.last)["train_instances"]
    train = json.loads(open(synth_paths["train_json"]).read())
    names = {c["id"]: c["name"] for c in train["categories"]}
    expected = {name: 0 for name in names.values()}
    for ann in train["annotations"]:
        expected[names[ann["category_id"]]] += not ann.get("iscrowd", 0)
    assert counts == expected
    metrics = json.loads(trained_run.metrics.read_text())
    assert metrics["frequency_buckets"]["by"] == "train_instances"
    for name, bucket in metrics["class_frequency"].items():
        assert bucket == ("r" if counts[name] <= 10 else "c" if counts[name] <= 100 else "f")
    assert set(metrics["segm"]["by_frequency"]) <= {"r", "c", "f"}


def test_cpu_training_runs_in_channels_last_layout_with_the_same_step(
    trained_run, tiny_cfg, make_model, partial_target
):
    # the engine trained the run's convolutions channels-last (the checkpoint keeps strides)
    conv = _weights(trained_run)["backbone.body.conv1.weight"]  # (64, 3, 7, 7)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not conv.is_contiguous()
    # and one training step in that layout is the default layout's within float rounding
    torch.manual_seed(0)
    default = make_model(tiny_cfg, num_classes=3).train()
    laid_out = train_module.training_layout(copy.deepcopy(default), torch.device("cpu"))
    swapped = {type(m) for m in laid_out.modules()}
    assert {PointwiseConv2d, GroupNorm} <= swapped  # modeling/channels_last.py's layers
    image = torch.rand(3, 64, 64)
    updated = []
    for model in (default, laid_out):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1)  # the same RoI sampling
        losses = model([image], [dict(partial_target)])
        sum(losses.values()).backward()
        optimizer.step()
        updated.append((losses, dict(model.named_parameters())))
    (losses_a, params_a), (losses_b, params_b) = updated
    for name, loss in losses_a.items():
        torch.testing.assert_close(losses_b[name], loss, rtol=1e-4, atol=1e-5)
    for name, param in params_a.items():
        torch.testing.assert_close(params_b[name], param, rtol=1e-4, atol=1e-5, msg=name)
