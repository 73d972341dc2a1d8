"""ResNet trunks: torchvision's numbers (the stem pooled before its ReLU);
model.backbone.stage5=false: a trunk without stage 5 under the same five FPN levels."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from everyseg.config import ConfigError, TrunkPretrainConfig
from everyseg.data.build import build_dataset
from everyseg.engine.trunk_pretrain import pretrain_trunk
from everyseg.modeling.backbone import NORMS, load_trunk_weights, resnet_fpn, resnet_trunk

NO_STAGE5 = "model.backbone.stage5=false"


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_the_trunk_equals_torchvision_s_resnet_bit_for_bit(norm):
    """The stem's ReLU runs after its max pool: the same logits and gradients, bit for
    bit, under torchvision's parameter names."""
    torch.manual_seed(0)
    trunk = resnet_trunk(name="resnet18", trainable_layers=5, norm=norm).train()
    reference = resnet18(norm_layer=NORMS[norm]).train().requires_grad_(False)
    for name, p in reference.named_parameters():
        p.requires_grad_(trunk.get_parameter(name).requires_grad)
    reference.load_state_dict(trunk.state_dict())
    images = torch.randn(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    grads = []
    for model in (trunk, reference):
        model.zero_grad()
        logits = model(images)
        (logits * torch.linspace(-1, 1, logits.shape[1])).sum().backward()
        trained = [p.grad for p in model.parameters() if p.grad is not None]
        grads.append([logits, *trained])
    assert len(grads[0]) == len(grads[1]) > 50
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert [n for n, _ in trunk.named_parameters()] == [n for n, _ in reference.named_parameters()]


def test_without_stage5_the_pyramid_keeps_its_levels_and_strides():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 128, 160)
    full = resnet_fpn(name="resnet18", trainable_layers=5, norm="gn", fpn_channels=16)
    lean = resnet_fpn(name="resnet18", trainable_layers=5, norm="gn", fpn_channels=16, stage5=False)
    shapes = {k: v.shape for k, v in full(images).items()}
    assert {k: v.shape for k, v in lean(images).items()} == shapes
    assert shapes["3"] == (2, 16, 4, 5) and shapes["pool"] == (2, 16, 2, 3)
    assert not any(k.startswith("body.layer4.") for k in lean.state_dict())
    # stage 5 holds three quarters of ResNet-18's weights
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(lean) < 0.3 * count(full)


def test_pretrained_resnet_weights_load_without_their_stage5(tmp_path):
    torch.manual_seed(0)
    reference = resnet18().state_dict()
    torch.save(reference, tmp_path / "r18.pth")
    lean = resnet_fpn(
        name="resnet18", trainable_layers=3, norm="frozen_bn", fpn_channels=16, stage5=False
    )
    load_trunk_weights(lean, name="resnet18", source=str(tmp_path / "r18.pth"))
    assert torch.equal(lean.body.layer3[1].conv2.weight, reference["layer3.1.conv2.weight"])
    # trainable_layers=3 counts the absent stage 5 among the three
    assert lean.body.layer3[0].conv1.weight.requires_grad
    assert not lean.body.layer1[0].conv1.weight.requires_grad


def test_a_model_without_stage5_trains_every_part(make_config, make_model, partial_target):
    model = make_model(make_config(NO_STAGE5), num_classes=4).train()
    images = [torch.rand(3, 64, 64)]
    losses = model(images, [partial_target])
    sum(losses.values()).backward()
    starved = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert starved == []
    model.eval()
    with torch.no_grad():
        (out,) = model(images)
    assert out["masks"].shape[-2:] == (64, 64)


def test_trunk_pretraining_pools_stage4_without_stage5(make_config, make_model):
    cfg = make_config(NO_STAGE5)
    dataset = build_dataset(cfg.data, split="train")
    model = make_model(cfg, num_classes=len(dataset.class_names) + 1)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    settings = TrunkPretrainConfig(steps=2, batch_size=4, max_crops=8)
    pretrain_trunk(
        model.backbone, dataset, settings, seed=0, device=torch.device("cpu"), progress=False
    )
    after = model.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if ".layer3." in k)


def test_stage5_false_needs_the_fpn(make_config, make_model):
    with pytest.raises(ConfigError, match="model.backbone.stage5=false needs"):
        make_model(make_config(NO_STAGE5, "model.backbone.fpn=false"), num_classes=4)


def test_fcn_without_stage5_predicts_at_image_size(make_config, make_model):
    model = make_model(make_config(NO_STAGE5, "model.kind=fcn"), num_classes=4).eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 64, 80)])
    assert out["sem_seg"].shape[-2:] == (64, 80)
