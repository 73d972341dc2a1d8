"""The model's seams: an architecture-only build_model, the detector dict, and masks for given
boxes through the one mask branch every detector shares (the Predictor's `segment`)."""

import numpy as np
import pytest
import torch
from torchvision.models import resnet18

from everyseg.config import ConfigError, ModelConfig
from everyseg.engine.initialize import initialize_for_training
from everyseg.modeling.detector import DETECTORS, build_model
from everyseg.modeling.fcos import FCOSWithMasks
from everyseg.modeling.rcnn import RCNN
from everyseg.predictor import Predictor

SIZES = dict(min_size=[64], max_size=64, test_min_size=64)
FCOS = ["model.backbone.fpn_channels=64"]  # FCOS's GroupNorm(32, C) needs C >= 32


def test_build_model_takes_only_the_model_section_and_loads_nothing(tmp_path):
    """Weight sources that cannot be read: build_model never touches them (the engine does)."""
    cfg = ModelConfig()
    cfg.backbone.name, cfg.backbone.fpn_channels = "resnet18", 16
    cfg.backbone.weights = str(tmp_path / "missing_resnet.pth")
    cfg.init = str(tmp_path / "missing_maskrcnn.pth")
    cfg.init_from_run = str(tmp_path / "missing_run")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=3, **SIZES)
    torch.manual_seed(0)
    again = build_model(ModelConfig(backbone=cfg.backbone), num_classes=3, **SIZES)
    for (name, value), other in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(value, other), name  # random initialisation only


def test_backbone_weights_are_loaded_by_the_engine(make_config, make_model, tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    weights = ["model.backbone.norm=frozen_bn", f"model.backbone.weights={path}"]
    cfg = make_config(*weights)
    model = make_model(cfg, num_classes=4)
    saved = torch.load(path, weights_only=True)
    body = model.backbone.body
    assert not torch.equal(body.layer2[0].conv1.weight, saved["layer2.0.conv1.weight"])
    initialize_for_training(model, cfg)
    assert torch.equal(body.layer2[0].conv1.weight, saved["layer2.0.conv1.weight"])
    assert torch.equal(body.layer2[0].bn1.running_var, saved["layer2.0.bn1.running_var"])


@pytest.mark.parametrize("name, cls", [("rcnn", RCNN), ("fcos", FCOSWithMasks)])
def test_the_detector_dict_chooses_the_builder(make_config, make_model, monkeypatch, name, cls):
    cfg = make_config(*FCOS, preset="deepmac-tiny" if name == "fcos" else "maskrcnn-tiny")
    assert isinstance(make_model(cfg, num_classes=4), cls)
    calls = []
    monkeypatch.setitem(DETECTORS, name, lambda *args, **kwargs: calls.append(kwargs) or "built")
    assert make_model(cfg, num_classes=4) == "built"
    assert calls[0]["num_classes"] == 4 and set(calls[0]) >= {"backbone", "transform"}
    cfg.model.detector = "yolo"
    with pytest.raises(ConfigError, match="model.detector 'yolo': choose one of rcnn, fcos"):
        make_model(cfg, num_classes=4)


def test_rcnn_masks_for_boxes_are_what_eval_forward_gives(make_model, tiny_cfg):
    torch.manual_seed(0)
    model = make_model(tiny_cfg, num_classes=4).eval()
    image = torch.rand(3, 40, 56)  # resized by the transform: boxes go to and fro
    with torch.no_grad():
        (detected,) = model([image])
        (given,) = model.masks_for_boxes([image], [detected["boxes"]], [detected["labels"]])
    assert len(detected["boxes"]) > 0
    assert given["masks"].shape == detected["masks"].shape == (len(detected["boxes"]), 1, 40, 56)
    assert torch.equal(given["labels"], detected["labels"])
    assert torch.allclose(given["masks"], detected["masks"], atol=1e-5)


@pytest.mark.parametrize("preset", ["maskrcnn-tiny", "deepmac-tiny"])
def test_masks_for_boxes_of_both_detectors(make_config, make_model, preset):
    torch.manual_seed(0)
    model = make_model(make_config(*FCOS, preset=preset), num_classes=4).eval()
    image = torch.rand(3, 48, 64)
    boxes = torch.tensor([[4.0, 6.0, 30.0, 20.0], [30.0, 20.0, 64.0, 48.0]])
    with torch.no_grad():
        (out,) = model.masks_for_boxes([image], [boxes])
        (labelled,) = model.masks_for_boxes([image], [boxes], [torch.tensor([3, 1])])
    assert out["masks"].shape == (2, 1, 48, 64)
    assert ((out["labels"] >= 1) & (out["labels"] <= 3)).all()
    assert ((out["scores"] >= 0) & (out["scores"] <= 1)).all()
    assert torch.equal(out["boxes"], boxes)
    assert labelled["labels"].tolist() == [3, 1]
    # pasted into the image's pixels: nothing far outside its box
    assert not out["masks"][0, 0, 30:, :].any() and not out["masks"][1, 0, :10, :].any()
    with torch.no_grad():
        (none,) = model.masks_for_boxes([image], [boxes[:0]])
    assert none["masks"].shape == (0, 1, 48, 64) and none["labels"].shape == (0,)


@pytest.mark.parametrize(
    "boxes, labels, message",
    [
        ([[4, 6, 30]], None, r"shape \(N, 4\)"),
        ([[4, 6, float("nan"), 20]], None, "finite"),
        ([[30, 6, 4, 20]], None, "X1 > X0 and Y1 > Y0"),
        ([[4, 20, 30, 20]], None, "X1 > X0 and Y1 > Y0"),
        ([[70, 70, 90, 90]], None, "outside the 64 x 64"),
        ([[4, 6, 30, 20]], [0], r"labels must be in 1\.\.14"),
        ([[4, 6, 30, 20]], [15], r"labels must be in 1\.\.14"),
        ([[4, 6, 30, 20]], [1.5], "labels must be integers"),
        ([[4, 6, 30, 20]], [1, 2], "1 boxes need 1 labels"),
        ([["a", 6, 30, 20]], None, "boxes must be numbers"),
    ],
)
def test_segment_rejects_bad_boxes_and_labels(runs, boxes, labels, message):
    predictor, image = runs["rcnn"], np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match=message):
        predictor.segment(image, boxes, labels=labels)


def test_segment_clips_boxes_to_the_image(runs):
    image = np.zeros((64, 64, 3), np.uint8)
    instances = runs["rcnn"].segment(image, [[-5, 10, 30, 80]])
    assert instances.boxes.tolist() == [[0, 10, 30, 64]]
    assert instances.masks.shape == (1, 64, 64)


@pytest.mark.parametrize("name", ["rcnn", "fcos"])
def test_segment_works_for_every_detector(runs, name):
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    instances = runs[name].segment(image, [[4, 6, 30, 20]], labels=[2])
    assert instances.masks.shape == (1, 64, 64) and instances.labels.tolist() == [2]
    assert not instances.mask_probs[0, 21:].any()  # cut to its box


@pytest.fixture(scope="module")
def runs(trained_run, fcos_run):
    """Predictors of the session's R-CNN and FCOS runs."""
    return {
        name: Predictor.from_run(run.root, device="cpu")
        for name, run in [("rcnn", trained_run), ("fcos", fcos_run)]
    }
