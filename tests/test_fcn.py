"""FCN semantic segmentation (model.kind=fcn): architecture, labels from instances with
partial supervision, the FCN paper's metrics, training through the standard engine, and
evaluate / predict through the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from everyseg.cli import main
from everyseg.config import ConfigError
from everyseg.data.build import build_dataset
from everyseg.data.semantic import IGNORE, semantic_labels, target_labels
from everyseg.engine.evaluate_run import evaluate_run
from everyseg.engine.initialize import check_stage
from everyseg.engine.semantic_eval import confusion_matrix, semantic_metrics
from everyseg.modeling.fcn import FCN, bilinear_kernel, bilinear_upsampler, semantic_loss

FCN_SETS = ("model.kind=fcn", "model.backbone.stage5=true")  # as fcn8s-tiny


@pytest.mark.parametrize("stride", [32, 16, 8])
def test_output_shapes_and_skips(make_config, make_model, stride):
    cfg = make_config(*FCN_SETS, f"model.fcn.stride={stride}")
    model = make_model(cfg, num_classes=5)
    assert isinstance(model, FCN)
    scored = {32: ["32"], 16: ["32", "16"], 8: ["32", "16", "8"]}[stride]
    assert sorted(model.score) == sorted(scored)  # the strides whose scores are fused
    assert model.upsample.stride == (stride, stride)
    assert model.logits(torch.rand(2, 3, 64, 96)).shape == (2, 5, 64, 96)
    model.eval()
    with torch.no_grad():
        outputs = model([torch.rand(3, 50, 70), torch.rand(3, 64, 64)])
    assert [o["sem_seg"].shape for o in outputs] == [(5, 50, 70), (5, 64, 64)]


def test_bilinear_initialisation():
    assert torch.allclose(
        bilinear_kernel(4), torch.outer(*(torch.tensor([0.25, 0.75, 0.75, 0.25]),) * 2)
    )
    for factor in (2, 8, 32):
        up = bilinear_upsampler(3, factor=factor, learnable=True)
        x = torch.rand(1, 3, 5, 6)
        with torch.no_grad():
            ours = up(x)
        resized = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
        assert ours.shape == resized.shape
        inner = (..., slice(factor, -factor), slice(factor, -factor))  # the border pads zeros
        assert torch.allclose(ours[inner], resized[inner], atol=1e-5)


def test_scoring_starts_at_zero_last_upsampling_fixed(make_config, make_model):
    model = make_model(make_config(*FCN_SETS), num_classes=4)
    assert all(not conv.weight.any() and not conv.bias.any() for conv in model.score.values())
    assert all(up.weight.requires_grad for up in model.up2.values())
    assert not model.upsample.weight.requires_grad  # the paper's final bilinear layer


def test_ignored_pixels_get_no_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 7, requires_grad=True)
    labels = torch.randint(0, 4, (2, 6, 7))
    labels[0, 1:4, 2:6] = IGNORE
    labels[1, :, 5:] = IGNORE
    semantic_loss(logits, labels).backward()
    grad = logits.grad.abs().sum(1)  # (2, 6, 7)
    ignored = labels == IGNORE
    assert not grad[ignored].any()
    assert (grad[~ignored] > 0).all()


def test_all_ignored_loss_is_a_zero_with_a_graph():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = semantic_loss(logits, torch.full((1, 4, 4), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and not logits.grad.any()


def test_metrics_against_a_hand_computed_confusion_matrix():
    # classes: background, a, b, c. n_ij (true i, predicted j):
    #   background: 4 right, 1 as a;  a: 1 as background, 2 right, 1 as b;
    #   b: no pixel (predicted once: IU 0, no accuracy);  c: nowhere (no IU, no accuracy)
    pairs = [(0, 0)] * 4 + [(0, 1)] + [(1, 0)] + [(1, 1)] * 2 + [(1, 2)]
    labels = torch.tensor([t for t, _ in pairs] + [IGNORE] * 3)  # ignored pixels never count
    predicted = torch.tensor([p for _, p in pairs] + [3] * 3)
    confusion = confusion_matrix(labels, predicted, num_classes=4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, :2] = torch.tensor([4, 1])
    expected[1, :3] = torch.tensor([1, 2, 1])
    assert torch.equal(confusion, expected)
    m = semantic_metrics(confusion, class_names=["a", "b", "c"], seen=["a"])
    # t = (5, 4, 0, 0), predicted = (5, 3, 1, 0), hits = (4, 2, 0, 0)
    iu_bg, iu_a, iu_b = 4 / (5 + 5 - 4), 2 / (4 + 3 - 2), 0 / (0 + 1 - 0)
    assert m["pixel_accuracy"] == pytest.approx(100 * 6 / 9, abs=1e-3)
    assert m["mean_accuracy"] == pytest.approx(100 * (4 / 5 + 2 / 4) / 2, abs=1e-3)
    assert m["mean_iu"] == pytest.approx(100 * (iu_bg + iu_a + iu_b) / 3, abs=1e-3)
    assert m["frequency_weighted_iu"] == pytest.approx(100 * (5 * iu_bg + 4 * iu_a) / 9, abs=1e-3)
    assert m["per_class_iu"] == pytest.approx(
        {"background": 100 * iu_bg, "a": 100 * iu_a, "b": 0.0, "c": None}, abs=1e-3
    )
    assert m["per_class_accuracy"]["b"] is None and m["per_class_accuracy"]["c"] is None
    assert m["seen"]["mean_iu"] == pytest.approx(40.0) and m["unseen"]["mean_iu"] == 0.0
    assert m["pixels"] == 9
    json.dumps(m, allow_nan=False)  # null, never NaN


def _instances(order):
    """A 10 x 12 image: a large mask of class 1 (ann 7), a small mask of class 3 on top of
    it (ann 9), a box-only instance of class 2 (ann 8) whose box covers part of both."""
    masks = torch.zeros(3, 10, 12, dtype=torch.uint8)
    masks[0, 1:7, 1:8] = 1  # 42 px
    masks[1, 3:5, 3:5] = 1  # 4 px, inside the first
    rows = dict(
        boxes=[[1.0, 1.0, 8.0, 7.0], [3.0, 3.0, 5.0, 5.0], [6.5, 2.2, 10.4, 8.0]],
        labels=[1, 3, 2],
        has_mask=[True, True, False],
        ann_ids=[7, 9, 8],
    )
    pick = list(order)
    return dict(
        boxes=torch.tensor(rows["boxes"])[pick],
        labels=torch.tensor(rows["labels"])[pick],
        masks=masks[pick],
        has_mask=torch.tensor(rows["has_mask"])[pick],
        ann_ids=torch.tensor(rows["ann_ids"])[pick],
    )


def test_labels_from_instances_with_a_box_only_instance():
    labels = semantic_labels(**_instances([0, 1, 2]), height=10, width=12)
    expected = torch.zeros(10, 12, dtype=torch.int64)
    expected[2:8, 6:11] = IGNORE  # every pixel the box-only box touches (floor / ceil)
    expected[1:7, 1:8] = 1  # mask pixels are known, inside that box too
    expected[3:5, 3:5] = 3  # the smaller mask over the larger one
    assert torch.equal(labels, expected)
    for order in ([2, 1, 0], [1, 2, 0]):  # the annotations' order never matters
        assert torch.equal(semantic_labels(**_instances(order), height=10, width=12), labels)


def test_dataset_targets_ignore_box_only_classes(make_config):
    cfg = make_config(*FCN_SETS, "data.mask_classes=[circle, star]")
    dataset = build_dataset(cfg.data, split="train")
    found = 0
    for i in range(len(dataset)):
        image, target = dataset[i]
        labels = target_labels(target, height=image.shape[1], width=image.shape[2])
        names = {dataset.class_names[k - 1] for k in labels.unique().tolist() if k > 0}
        assert names <= {"circle", "star"}  # only mask classes' pixels get a class
        found += int((labels == IGNORE).sum() > 0) * int((~target["has_mask"]).any())
    assert found > 0


def test_fcn_refuses_detector_initialisation(make_config):
    with pytest.raises(ConfigError, match="model.kind=fcn"):
        check_stage(make_config(*FCN_SETS, "model.init=torchvision-coco"))
    with pytest.raises(ConfigError, match="model.fcn.stride"):
        make_config(*FCN_SETS, "model.fcn.stride=4")


def test_training_learns_on_easy_synthetic_data(train_tiny, make_config, synth_paths, tmp_path):
    """Through the standard engine: the loss falls, and on the images it trained on the
    model's mean IU beats predicting the most frequent class (background) everywhere."""
    sets = ["train.steps=60", "train.lr=0.02", "train.log_every=1", "data.hflip_prob=0"]
    run = train_tiny(tmp_path / "run", *FCN_SETS, *sets, preset="fcn8s-tiny")
    losses = [json.loads(line)["loss"] for line in run.log.read_text().splitlines()]
    # zero-initialised scores: the first step's softmax is uniform over the 15 classes
    assert losses[0] == pytest.approx(math.log(15), rel=1e-4)
    assert np.mean(losses[-10:]) < 0.25 * losses[0]
    train_json, train_images = synth_paths["train_json"], synth_paths["train_images"]
    metrics = evaluate_run(run.root, data_json=train_json, images=train_images, progress=False)
    data = replace(make_config().data, val_json=train_json, val_images=train_images)
    dataset = build_dataset(data, split="val")  # the training images, every mask kept
    confusion = torch.zeros(15, 15, dtype=torch.int64)
    for i in range(len(dataset)):
        image, target = dataset[i]
        labels = target_labels(target, height=image.shape[1], width=image.shape[2])
        confusion += confusion_matrix(labels, torch.zeros_like(labels), num_classes=15)
    trivial = semantic_metrics(confusion, class_names=dataset.class_names)["mean_iu"]
    assert metrics["semantic"]["mean_iu"] > trivial + 10


def test_evaluate_and_predict_through_the_cli(synth_paths, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "fcn8s-tiny", "--out", str(run), "--no-eval"]
    sets = [f"data.{key}={value}" for key, value in synth_paths.items()]
    sets += ["train.steps=2", "train.batch_size=2", "data.num_workers=0", "data.min_size=[64]"]
    sets += ["data.test_min_size=64", "data.max_size=64", "data.mask_classes=[circle, star]"]
    sets += ["train.eval_every=2"]  # the engine's evaluation keeps the best mean IU
    sets += ["train.trunk_pretrain=null"]  # the preset's pretraining takes minutes
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 0
    evals = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert "mean_iu" in evals[-1]["eval"] and (run / "checkpoints" / "best.pt").is_file()
    assert main(["evaluate", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    s = metrics["semantic"]
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iu", "frequency_weighted_iu"):
        assert 0.0 <= s[key] <= 100.0
    assert metrics["seen_classes"] == ["circle", "star"] and len(metrics["unseen_classes"]) == 12
    assert set(s["per_class_iu"]) == {
        "background",
        *metrics["seen_classes"],
        *metrics["unseen_classes"],
    }
    assert metrics["images"] == 4 and "segm" not in metrics
    out = tmp_path / "pred"
    images = sorted(Path(synth_paths["val_images"]).iterdir())
    assert main(["predict", str(run), str(images[0]), str(images[1]), "--out", str(out)]) == 0
    assert json.loads((out / "labels" / "classes.json").read_text())[0] == "background"
    for image in images[:2]:
        label_map = np.asarray(Image.open(out / "labels" / f"{image.stem}.png"))
        overlay = Image.open(out / "overlays" / f"{image.stem}.png")
        assert label_map.shape == (64, 64) and label_map.max() <= 14
        assert overlay.size == (64, 64) and overlay.mode == "RGB"
    assert math.isfinite(s["mean_iu"])
    page = tmp_path / "report.html"  # the report shows what an FCN run has, no mask AP
    assert main(["report", str(run), "--out", str(page), "--gallery", "2"]) == 0
    text = page.read_text()
    assert "FCN-8s (resnet18)" in text and "<th>mean IU unseen</th>" in text
    assert "<h3>IU per class</h3>" in text and "mask AP" not in text
    assert text.count("<img") == 3 and "no gallery" not in text  # curves, classes, gallery
    # the instance-only verbs refuse an FCN run with a message, not a traceback
    box = ["--box", "2", "2", "30", "30"]
    assert main(["segment", str(run), str(images[0]), *box, "--out", str(tmp_path / "s")]) == 2
    assert "model.kind=fcn" in capsys.readouterr().err
    export = ["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]
    assert main(export) == 2
    assert "model.kind=fcn" in capsys.readouterr().err
