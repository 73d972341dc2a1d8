"""Deep-MARC: crop-to-ground-truth mask training and the deep mask-head family."""

import json

import pytest
import torch

from everyseg.config import ConfigError, load_config
from everyseg.engine.evaluate_run import evaluate_run
from everyseg.modeling.mask_heads.deep import HOURGLASS_LAYOUTS, RESNET_DEPTHS

HEADS = [("resnet", n) for n in RESNET_DEPTHS] + [("hourglass", n) for n in HOURGLASS_LAYOUTS]


def _mask_head_inputs(make_model, cfg, target):
    """The (R, 4) boxes and (R,) labels the mask head trains on for one image with `target`."""
    torch.manual_seed(0)
    model = make_model(cfg, num_classes=4).train()
    seen = {}

    def spy_pool(module, args):
        seen["rois"] = args[1][0].clone()  # args: features, [boxes per image], image_shapes

    def spy_head(module, args):
        seen["labels"] = args[1].clone()  # args: roi_features, labels

    model.roi_heads.mask_roi_pool.register_forward_pre_hook(spy_pool)
    model.roi_heads.mask_head.register_forward_pre_hook(spy_head)
    model([torch.rand(3, *target["masks"].shape[-2:])], [target])
    return seen["rois"], seen["labels"]


def test_gt_crops_are_exactly_the_masked_instances_boxes(make_config, make_model, partial_target):
    target = partial_target  # instance 0 has a mask, instance 1 is box-only
    cfg = make_config("model.mask_head.train_rois=gt")
    rois, labels = _mask_head_inputs(make_model, cfg, target)
    # the transform keeps 64 px images at 64 px, so image and RoI coordinates agree
    assert torch.equal(rois, target["boxes"][:1])
    assert torch.equal(labels, target["labels"][:1])


def test_no_crops_without_masks(make_config, make_model, partial_target):
    cfg = make_config("model.mask_head.train_rois=gt")
    target = dict(partial_target, has_mask=torch.tensor([False, False]))
    rois, labels = _mask_head_inputs(make_model, cfg, target)
    assert rois.shape == (0, 4) and labels.numel() == 0


def test_both_is_proposals_plus_gt(make_config, make_model, partial_target):
    target = partial_target
    proposals, _ = _mask_head_inputs(make_model, make_config(), target)
    both, _ = _mask_head_inputs(make_model, make_config("model.mask_head.train_rois=both"), target)
    assert torch.equal(both, torch.cat([proposals, target["boxes"][:1]]))


def test_jitter_moves_gt_crops_a_little(make_config, make_model, partial_target):
    target = partial_target
    cfg = make_config("model.mask_head.train_rois=gt", "model.mask_head.roi_jitter=0.1")
    rois, _ = _mask_head_inputs(make_model, cfg, target)
    shift = (rois - target["boxes"][:1]).abs()
    assert 0 < shift.max() <= 0.1 * 22 + 1e-4  # the masked box is 22 x 22


def test_unknown_mask_rois(make_config, make_model):
    with pytest.raises(ValueError, match="train_rois"):
        make_model(make_config("model.mask_head.train_rois=boxes"), num_classes=4)


@pytest.mark.parametrize("name, depth", HEADS)
@pytest.mark.parametrize("agnostic", [True, False])
def test_deep_head_shapes(make_config, make_model, name, depth, agnostic):
    cfg = make_config(
        f"model.mask_head.name={name}",
        f"model.mask_head.depth={depth}",
        "model.mask_head.resolution=28",
        f"model.mask_head.class_agnostic={str(agnostic).lower()}",
    )
    head = make_model(cfg, num_classes=4).roi_heads.mask_head
    features = torch.rand(3, 16, 7, 7)  # (R, C, S, S)
    labels = torch.tensor([1, 3, 2])
    all_channels = head.predictor.conv(head.features(features))
    assert all_channels.shape == (3, 1 if agnostic else 4, 28, 28)
    assert head(features, labels).shape == (3, 28, 28)
    assert head.predict(features, labels).shape == (3, 1, 28, 28)


@pytest.mark.parametrize("resolution", [28, 32, 56])
def test_deep_head_resolutions_through_the_model(
    make_config, make_model, partial_target, resolution
):
    cfg = make_config(
        "model.mask_head.name=hourglass",
        "model.mask_head.depth=10",
        f"model.mask_head.resolution={resolution}",
        "model.mask_head.train_rois=gt",
    )
    model = make_model(cfg, num_classes=4).train()
    size = partial_target["masks"].shape[-1]
    losses = model([torch.rand(3, size, size)], [partial_target])
    assert losses["loss_mask"] > 0
    with torch.no_grad():
        (out,) = model.eval()([torch.rand(3, size, size)])
    assert out["masks"].shape[1:] == (1, size, size)


@pytest.mark.parametrize("name, depth", HEADS)
def test_deep_heads_train_on_a_tiny_batch(make_config, make_model, name, depth):
    cfg = make_config(f"model.mask_head.name={name}", f"model.mask_head.depth={depth}")
    torch.manual_seed(0)
    head = make_model(cfg, num_classes=4).roi_heads.mask_head.train()
    features = torch.rand(4, 16, 7, 7)
    labels = torch.tensor([1, 2, 3, 1])
    targets = (torch.rand(4, 14, 14) > 0.5).float()
    optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
    losses = []
    for _ in range(20):
        loss = head.loss(head(features, labels), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_depth_and_resolution_errors(make_config, make_model):
    with pytest.raises(ConfigError, match="depth 6 for hourglass"):
        make_model(
            make_config("model.mask_head.name=hourglass", "model.mask_head.depth=6"),
            num_classes=4,
        )
    with pytest.raises(ConfigError, match="fcn head's deconv"):
        make_model(make_config("model.mask_head.resolution=32"), num_classes=4)


def test_deepmarc_presets():
    full, tiny = load_config("deepmarc"), load_config("deepmarc-tiny")
    for cfg in (full, tiny):
        assert cfg.model.mask_head.train_rois == "gt" and cfg.model.mask_head.name == "hourglass"
        assert cfg.model.mask_head.class_agnostic
    assert full.model.mask_head.depth == 52 and full.model.backbone.name == "resnet50"
    assert tiny.data.mask_classes == load_config("baseline-tiny").data.mask_classes


def test_deepmarc_tiny_trains_and_evaluates(train_tiny, tmp_path):
    run = train_tiny(tmp_path / "deepmarc", "train.steps=3", preset="deepmarc-tiny")
    records = [json.loads(line) for line in run.log.read_text().splitlines()]
    assert len(records) == 3 and any(r["loss_mask"] > 0 for r in records)
    metrics = evaluate_run(run.root, progress=False)
    assert len(metrics["seen_classes"]) == 7 and len(metrics["unseen_classes"]) == 7


@pytest.mark.parametrize("name", ["resnet", "hourglass"])
def test_deep_heads_take_the_transfer_and_fused_predictors(make_config, make_model, name):
    cfg = make_config(
        f"model.mask_head.name={name}",
        f"model.mask_head.depth={4 if name == 'resnet' else 10}",
        "model.mask_head.resolution=32",
        "model.mask_head.class_agnostic=false",
        "model.mask_head.predictor=transfer",
        "model.mask_head.mlp_fusion=true",
    )
    head = make_model(cfg, num_classes=4).roi_heads.mask_head
    assert head(torch.rand(2, 16, 7, 7), torch.tensor([1, 3])).shape == (2, 32, 32)


def test_deepmac_tiny_fcos_trains_and_evaluates(fcos_run, copy_run):
    records = [json.loads(line) for line in fcos_run.log.read_text().splitlines()]
    assert len(records) == 3 and any(r["loss_mask"] > 0 for r in records)
    metrics = evaluate_run(copy_run(fcos_run).root, progress=False)  # writes metrics.json
    assert len(metrics["seen_classes"]) == 7 and set(metrics["segm"]) >= {"seen", "unseen"}


def test_fcos_masks_in_eval_and_config_errors(make_config, make_model):
    cfg = make_config("model.backbone.fpn_channels=64", preset="deepmac-tiny")
    model = make_model(cfg, num_classes=4).eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 40, 56)])
    assert out["masks"].shape[1:] == (1, 40, 56) and len(out["masks"]) == len(out["boxes"])
    with pytest.raises(ConfigError, match="train_rois=gt"):
        make_model(make_config("model.detector=fcos"), num_classes=4)
