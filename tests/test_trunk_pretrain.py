"""train.trunk_pretrain: the trunk as a classifier of the train set's box crops, before the
detector (engine/trunk_pretrain.py)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from everyseg.config import ConfigError, TrunkPretrainConfig, load_config
from everyseg.data.build import build_dataset
from everyseg.engine import train as train_module
from everyseg.engine.train import train
from everyseg.engine.trunk_pretrain import collect_crops, pretrain_trunk
from everyseg.modeling.detector import IMAGENET_MEAN, IMAGENET_STD

CPU = torch.device("cpu")


@pytest.fixture
def dataset(make_config):
    return build_dataset(make_config().data, split="train")


def test_crops_are_the_normalised_boxes_in_a_seeded_order(dataset):
    cfg = TrunkPretrainConfig(crop_size=8, max_crops=5)
    crops, labels = collect_crops(dataset, cfg, seed=1, progress=False)
    again, _ = collect_crops(dataset, cfg, seed=1, progress=False)
    assert crops.shape == (5, 3, 8, 8) and labels.shape == (5,)
    assert torch.equal(crops, again)
    first = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(1))[0]
    image, target = dataset[int(first)]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = roi_align(((image - mean) / std)[None], [target["boxes"]], 8, 1.0, 2, True)
    n = min(5, len(target["boxes"]))
    torch.testing.assert_close(crops[:n], expected[:n])
    assert torch.equal(labels[:n], target["labels"][:n] - 1)  # classes 1..K -> 0..K-1


def test_every_box_is_cropped_when_max_crops_allows(dataset):
    crops, labels = collect_crops(dataset, TrunkPretrainConfig(crop_size=4), seed=0, progress=False)
    total = sum(len(dataset[i][1]["labels"]) for i in range(len(dataset)))
    assert len(crops) == len(labels) == total


def test_pretraining_trains_every_trunk_stage_and_leaves_the_freezing(
    make_config, make_model, dataset
):
    cfg = make_config("model.backbone.trainable_layers=2")
    model = make_model(cfg, num_classes=len(dataset.class_names) + 1)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrunkPretrainConfig(steps=40, batch_size=16, crop_size=32, lr=0.002, max_crops=24)
    done = pretrain_trunk(model.backbone, dataset, settings, seed=0, device=CPU, progress=False)
    # 24 crops, 40 steps of 16: the trunk memorises them (chance is 1 / 14)
    assert done["crops"] == 24 and done["accuracy"] > 0.5 and done["loss"] < 1.5
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    stages = ("conv1", "layer1", "layer2", "layer3")  # the tiny presets have no stage 5
    for stage in stages:  # a random stage is not worth freezing: all of the trunk learns
        assert any(k.startswith(f"backbone.body.{stage}.") for k in changed), stage
    assert all(k.startswith(tuple(f"backbone.body.{s}" for s in (*stages, "bn1"))) for k in changed)
    # the detector then trains what trainable_layers says
    assert {k for k, p in model.named_parameters() if p.requires_grad} == trainable
    assert not any(k.startswith("backbone.body.layer2") for k in trainable)


def test_pretraining_leaves_the_global_random_streams_alone(make_config, make_model, dataset):
    model = make_model(make_config(), num_classes=len(dataset.class_names) + 1)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    settings = TrunkPretrainConfig(steps=2, batch_size=4, max_crops=8)
    pretrain_trunk(model.backbone, dataset, settings, seed=0, device=CPU, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_training_pretrains_a_new_run_but_not_a_resumed_one(make_config, tmp_path, monkeypatch):
    calls = []
    real = train_module.pretrain_trunk

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "pretrain_trunk", counting)
    cfg = make_config(
        "train.steps=2",
        "train.checkpoint_every=1",
        "train.trunk_pretrain={steps: 2, batch_size: 4, max_crops: 8}",
    )
    train(cfg, out_dir=tmp_path / "run", progress=False)
    assert calls == [1]
    longer = make_config(
        "train.steps=3",
        "train.checkpoint_every=1",
        "train.trunk_pretrain={steps: 2, batch_size: 4, max_crops: 8}",
    )
    train(longer, out_dir=tmp_path / "run", resume=True, progress=False)
    assert calls == [1]  # the checkpoint holds the pretrained trunk


def test_a_trunk_from_another_run_is_not_pretrained(make_config, tmp_path, monkeypatch, capsys):
    detector = make_config("train.steps=1", "train.stage=detector")
    train(detector, out_dir=tmp_path / "detector", progress=False)
    monkeypatch.setattr(train_module, "pretrain_trunk", pytest.fail)
    mask = make_config(
        "train.steps=1",
        "train.stage=mask",
        f"model.init_from_run={tmp_path / 'detector'}",
        "train.trunk_pretrain={steps: 2}",
    )
    train(mask, out_dir=tmp_path / "mask", progress=False)
    assert "train.trunk_pretrain skipped" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["model.backbone.fpn=false", "model.kind=fcn"])
def test_c4_and_fcn_trunks_pretrain_too(make_config, make_model, dataset, kind):
    cfg = make_config(kind, "model.backbone.stage5=true")
    model = make_model(cfg, num_classes=len(dataset.class_names) + 1)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    settings = TrunkPretrainConfig(steps=1, batch_size=4, max_crops=8)
    pretrain_trunk(model.backbone, dataset, settings, seed=0, device=CPU, progress=False)
    after = model.backbone.state_dict()
    stage5 = "res5." if kind.endswith("false") else "body.layer4."  # C4 runs stage 5 per RoI
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(stage5))


def test_training_data_without_boxes_is_refused_by_name(dataset, monkeypatch):
    image, target = dataset[0]
    empty = {**target, "boxes": target["boxes"][:0], "labels": target["labels"][:0]}
    monkeypatch.setattr(type(dataset), "__getitem__", lambda self, key: (image, empty))
    with pytest.raises(ValueError, match=r"train\.json has no boxes to crop"):
        collect_crops(dataset, TrunkPretrainConfig(), seed=0, progress=False)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.trunk_pretrain.steps=0", "train.trunk_pretrain.steps"),
        ("train.trunk_pretrain={lr: -1}", "train.trunk_pretrain.lr"),
        ("train.trunk_pretrain.crop_size=nan", "train.trunk_pretrain.crop_size"),
        ("train.trunk_pretrain.max_crops=1e999", "train.trunk_pretrain.max_crops"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("maskrcnn-tiny", [override])
