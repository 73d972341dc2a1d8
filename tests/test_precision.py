"""Mixed precision (train.amp, inference precision) and gradient accumulation (train.accumulate).

CI has no GPU: fp16 (CUDA only) is covered by its refusals; bf16 runs on the CPU.
"""

import numpy as np
import pytest
import torch
from torch import nn

from everyseg.cli import main
from everyseg.config import ConfigError, from_dict, load_config
from everyseg.data.synthetic import generate
from everyseg.engine.checkpoint import TrainingState, load_checkpoint
from everyseg.engine.optim import build_optimizer, build_scheduler
from everyseg.engine.precision import inference_precision
from everyseg.engine.run_dir import RunRecord
from everyseg.engine.train import train, train_one_step
from everyseg.predictor import Predictor

CPU = torch.device("cpu")


def test_amp_choices_presets_and_old_booleans():
    assert load_config("maskrcnn").train.amp == "fp16"  # the GPU presets
    assert load_config("maskx-tiny").train.amp == "off"  # the CPU ones
    # YAML 1.1 reads an unquoted off as false: it still means off
    cfg = load_config("maskrcnn", ["train.amp=off"])
    assert cfg.train.amp == "off" and from_dict(cfg.to_dict()).train.amp == "off"
    assert load_config("maskrcnn", ["train.amp=bf16"]).train.amp == "bf16"
    # the old `amp: true` (fp16 on CUDA, ignored elsewhere) names the new choices
    with pytest.raises(ConfigError, match=r"train\.amp: expected off, fp16 or bf16, got True"):
        load_config("maskrcnn", ["train.amp=true"])
    with pytest.raises(ConfigError, match=r"train\.accumulate: expected a number >= 1"):
        load_config("maskrcnn", ["train.accumulate=0"])


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.amp=fp16"], r"train\.amp=fp16: fp16 needs a CUDA device.*use bf16 or off"),
        (["train.accumulate=3"], r"train\.accumulate=3 must divide train\.batch_size=2"),
    ],
)
def test_refused_before_anything_is_written(make_config, tmp_path, sets, message):
    cfg = make_config("train.device=cpu", *sets)
    with pytest.raises(ConfigError, match=message):
        train(cfg, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_inference_precision_defaults_to_the_runs_where_the_device_runs_it():
    assert inference_precision(None, trained="off", device=CPU) == "fp32"
    assert inference_precision(None, trained="bf16", device=CPU) == "bf16"
    # a run trained in fp16 on a GPU still predicts on a CPU, in float32
    assert inference_precision(None, trained="fp16", device=CPU) == "fp32"
    assert inference_precision("bf16", trained="off", device=CPU) == "bf16"
    with pytest.raises(ValueError, match="precision fp16: fp16 needs a CUDA device.*bf16 or fp32"):
        inference_precision("fp16", trained="fp16", device=CPU)
    with pytest.raises(ValueError, match="precision must be fp32, fp16 or bf16, got 'off'"):
        inference_precision("off", trained="off", device=CPU)


def test_cli_refuses_a_precision_the_device_cannot_run(trained_run, capsys):
    assert main(["evaluate", str(trained_run.root), "--precision", "fp16"]) == 2
    assert "everyseg evaluate: error: precision fp16: fp16 needs a CUDA device" in (
        capsys.readouterr().err
    )


def _one_image_paths(root) -> dict[str, str]:
    return generate(root, num_train=1, num_val=1, size=64, seed=3, progress=False)


def test_accumulated_micro_batches_update_as_the_full_batch(make_config, tmp_path):
    # Exact only where every loss averages per image alike and sampling cannot differ: one
    # image twice per batch (no flips, one scale), samplers that keep every anchor and RoI
    # (the micro-batches draw RoIs in another RNG order), GroupNorm (BatchNorm statistics of
    # a micro-batch are not the full batch's). With real data they agree only in expectation.
    sets = [
        "train.steps=3",
        "train.batch_size=2",
        "data.hflip_prob=0.0",
        "model.rpn.batch_size_per_image=4096",
        "model.box_head.batch_size_per_image=512",
    ]
    paths = _one_image_paths(tmp_path / "data")
    runs = {
        k: train(
            make_config(*sets, f"train.accumulate={k}", paths=paths),
            out_dir=tmp_path / f"k{k}",
            progress=False,
        )
        for k in (1, 2)
    }
    full, accumulated = (load_checkpoint(runs[k].last)["model"] for k in (1, 2))
    untrained = train(
        make_config(*sets, "train.lr=0.0", paths=paths), out_dir=tmp_path / "lr0", progress=False
    )
    moved = _max_difference(full, load_checkpoint(untrained.last)["model"])
    differ = _max_difference(full, accumulated)  # measured: 6e-8, the weights moved 1.2e-2
    assert moved > 1e-3 and differ < 1e-5, (moved, differ)
    logs = [runs[k].log.read_text().splitlines() for k in (1, 2)]
    assert len(logs[0]) == len(logs[1]) == 3  # one logged step per update, K micro-batches each


def _max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())


class _Toy(nn.Module):
    """A loss per image's mean; counts the images its forward passes saw in a buffer."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, images, targets):
        self.seen += len(images)
        return {"loss_a": torch.stack([self.weight * image.mean() for image in images]).mean()}


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nonfinite_micro_batch_stops_or_skips_the_whole_step(policy):
    model = _Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images = [torch.ones(3, 4, 4), torch.full((3, 4, 4), float("nan"))]
    step = dict(optimizer=optimizer, scaler=scaler, accumulate=2, clip_grad_norm=None, step=6)
    if policy == "stop":
        with pytest.raises(FloatingPointError, match="step 7: loss_a is nan"):
            train_one_step(model, images, [{}, {}], **step)
    else:
        values = train_one_step(model, images, [{}, {}], on_nonfinite="skip", **step)
        assert values["skipped"] == "loss_a is nan"
        assert float(model.seen) == 0.0  # both micro-batches' buffer changes undone
    # the first micro-batch's gradient never reaches the weights, now or at the next update
    assert float(model.weight.detach()) == 1.0
    train_one_step(model, images[:1] * 2, [{}, {}], **step)
    assert float(model.weight.detach()) == pytest.approx(0.9)


def test_bf16_on_cpu_trains_and_predicts_float32_close_to_fp32(train_tiny, tmp_path):
    run = train_tiny(tmp_path / "run", "train.steps=2", "train.amp=bf16", "train.device=cpu")
    state = load_checkpoint(run.last)
    assert state["scaler"] == {}  # bf16 needs no loss scaling
    assert all(v.dtype in (torch.float32, torch.int64) for v in state["model"].values())
    image = np.asarray(np.random.default_rng(0).random((64, 64, 3)), dtype=np.float32)
    bf16 = Predictor.from_run(run.root, device="cpu", score_thresh=0.0)  # the run's precision
    fp32 = Predictor.from_run(run.root, device="cpu", score_thresh=0.0, precision="fp32")
    assert bf16.precision == "bf16" and fp32.precision == "fp32"
    got, want = bf16(image), fp32(image)
    for array in (got.boxes, got.scores, got.mask_probs):
        assert array.dtype == np.float32
    # detections of an untrained model score alike, so bf16 rounding reorders them: the
    # best-scoring box of each is compared, and masks for the same given boxes
    assert np.abs(got.scores.max() - want.scores.max()) < 0.02
    boxes = want.boxes[:5]
    masks = bf16.segment(image, boxes).mask_probs, fp32.segment(image, boxes).mask_probs
    assert masks[0].dtype == np.float32 and np.abs(masks[0] - masks[1]).max() < 0.05


def test_resuming_a_run_without_fp16_starts_a_fresh_loss_scale(trained_run, make_model):
    # the resume of `--set train.amp=fp16` on a GPU: its checkpoint's scaler state is empty
    state = load_checkpoint(trained_run.last)
    record = RunRecord.from_plain(state, source=trained_run.last)
    cfg = from_dict(record.config)
    model = make_model(cfg, num_classes=len(record.class_names) + 1)
    optimizer = build_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler("cpu", enabled=True)  # the GPU's, on the CPU
    training = TrainingState(
        model, optimizer, build_scheduler(optimizer, cfg.train), scaler, record
    )
    training.restore(trained_run.last)
    assert training.step == 2 and scaler.get_scale() == 2.0**16
