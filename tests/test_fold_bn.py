"""Inference readiness: frozen batch norms folded into their convolutions (and, on a CPU,
channels-last weights) give the unfolded model's outputs within float rounding."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from everyseg.engine.load import ready_for_inference
from everyseg.modeling.backbone import resnet_fpn
from everyseg.modeling.fold_bn import fold_frozen_batchnorm


def _trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    """Random, non-identity statistics in every FrozenBatchNorm2d, as training leaves."""
    generator = torch.Generator().manual_seed(0)
    for norm in model.modules():
        if isinstance(norm, FrozenBatchNorm2d):
            n = norm.weight.numel()
            norm.weight.copy_(0.5 + torch.rand(n, generator=generator))
            norm.bias.copy_(0.1 * torch.randn(n, generator=generator))
            norm.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            norm.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return model


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_folded_backbone_gives_the_same_features(name):
    torch.manual_seed(0)
    backbone = resnet_fpn(name=name, trainable_layers=3, norm="frozen_bn", fpn_channels=16)
    # in float64, so that what is compared is the folding, not float32's rounding
    backbone = _trained_looking(backbone).double().eval()
    norms = sum(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    folded = copy.deepcopy(backbone)
    assert fold_frozen_batchnorm(folded) == norms  # every one follows a conv in a ResNet
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    images = torch.rand(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        expected, actual = backbone(images), folded(images)
    for level in expected:
        torch.testing.assert_close(actual[level], expected[level], rtol=1e-9, atol=1e-9)


def test_trainable_batch_norms_are_left_alone():
    backbone = resnet_fpn(name="resnet18", trainable_layers=5, norm="bn", fpn_channels=16)
    assert fold_frozen_batchnorm(backbone) == 0


def test_ready_model_detects_as_the_unfolded_one(make_config, make_model):
    cfg = make_config("model.backbone.norm=frozen_bn", "model.box_head.score_thresh=0.0")
    torch.manual_seed(0)
    model = _trained_looking(make_model(cfg, num_classes=4)).eval()
    ready = ready_for_inference(copy.deepcopy(model))
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in ready.modules())
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    with torch.inference_mode():
        expected, actual = model.detect(images), ready.detect(images)
    for want, got in zip(expected, actual, strict=True):
        assert len(want["scores"]) > 0
        assert torch.equal(got["labels"], want["labels"])
        for key in ("boxes", "scores", "box_masks"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "head",
    [
        [],
        ["model.mask_head.name=resnet", "model.mask_head.depth=4"],
        ["model.mask_head.name=hourglass", "model.mask_head.depth=10"],
        ["model.mask_head.predictor=transfer", "model.mask_head.mlp_fusion=true"],
    ],
)
def test_ready_mask_heads_segment_as_before(make_config, make_model, head):
    # the mask head runs channels-last once readied: each kind reads and reshapes its
    # features as it did in the contiguous layout
    torch.manual_seed(0)
    model = _trained_looking(make_model(make_config(*head), num_classes=4)).eval()
    ready = ready_for_inference(copy.deepcopy(model))
    mask_head = ready.roi_heads.mask_head
    convs = [p for p in mask_head.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    images = [torch.rand(3, 64, 80)]
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 78.0, 60.0]])]
    labels = [torch.tensor([1, 3])]
    with torch.inference_mode():
        (want,) = model.masks_for_boxes(images, boxes, labels, paste=False)
        (got,) = ready.masks_for_boxes(images, boxes, labels, paste=False)
    torch.testing.assert_close(got["box_masks"], want["box_masks"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-4, atol=1e-4)
