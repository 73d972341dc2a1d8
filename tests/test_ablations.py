"""Mask R-CNN's ablations: RoIPool (model.roi_pool=pool), the softmax mask loss
(model.mask_head.loss=softmax) and the C4 backbone (model.backbone.fpn=false)."""

import json
import math

import pytest
import torch
from torchvision.models import resnet18
from torchvision.ops import MultiScaleRoIAlign, roi_pool

from everyseg.config import ConfigError
from everyseg.engine.train import train
from everyseg.modeling.backbone import C4Backbone, load_trunk_weights, resnet_c4
from everyseg.modeling.losses import mask_softmax_loss
from everyseg.modeling.mask_heads import MaskHead, SoftmaxMaskHead
from everyseg.modeling.poolers import MultiScaleRoIAlignGather, MultiScaleRoIPool

SIZE = 64
# C4 runs stage 5 per RoI, which the tiny presets leave out of their FPN trunk
C4 = ("model.backbone.fpn=false", "model.backbone.stage5=true", "model.mask_head.num_convs=0")
SOFTMAX = ("model.mask_head.loss=softmax",)
POOL = ("model.roi_pool=pool",)


def _losses_and_grads(model, image, target):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the RPN and RoI samplers draw random subsets
    losses = model([image], [target])
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def _model(make_config, make_model, *sets):
    torch.manual_seed(0)
    return make_model(make_config(*sets), num_classes=4)


# --- RoIPool --------------------------------------------------------------------------------


def test_roi_pool_on_one_level_equals_torchvision_roi_pool():
    torch.manual_seed(0)
    feature = torch.randn(2, 3, 16, 16)  # stride 4 on 64 px images
    boxes = [torch.tensor([[0.0, 0.0, 30.0, 20.0], [5.5, 7.2, 60.0, 63.0]]), torch.rand(3, 4) * 30]
    boxes[1][:, 2:] += boxes[1][:, :2] + 1
    pooler = MultiScaleRoIPool(["0"], 5)
    got = pooler({"0": feature}, boxes, [(SIZE, SIZE)] * 2)
    rois = torch.cat(
        [torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)]
    )
    assert torch.equal(got, roi_pool(feature, rois, (5, 5), spatial_scale=0.25))


def test_roi_pool_reads_each_box_from_the_fpn_level_roi_align_reads():
    torch.manual_seed(0)
    size = 256
    maps = {str(k): torch.randn(1, 2, size // 2 ** (k + 2), size // 2 ** (k + 2)) for k in range(4)}
    maps = {k: v.requires_grad_() for k, v in maps.items()}
    boxes = [torch.tensor([[0, 0, 20, 20], [0, 0, 100, 90], [10, 10, 250, 240], [3, 3, 60, 40.0]])]
    align = MultiScaleRoIAlign(list(maps), 3, sampling_ratio=2)
    pool = MultiScaleRoIPool(list(maps), 3)
    align(maps, boxes, [(size, size)])
    got = pool(maps, boxes, [(size, size)])
    levels = align.map_levels(boxes)
    assert len(set(levels.tolist())) > 1  # the case spans several levels
    assert torch.equal(levels, pool.map_levels(boxes))
    for i, level in enumerate(levels.tolist()):
        one = roi_pool(maps[str(level)], [boxes[0][i : i + 1]], 3, pool.scales[level])
        assert torch.equal(got[i : i + 1], one)
    got.sum().backward()
    for level in set(levels.tolist()):  # gradients reach every level a box was pooled from
        assert maps[str(level)].grad.abs().sum() > 0


def test_defaults_build_roi_align_and_the_sigmoid_head(make_config, make_model):
    heads = _model(make_config, make_model).roi_heads
    for pooler in (heads.box_roi_pool, heads.mask_roi_pool):
        assert type(pooler) is MultiScaleRoIAlignGather and pooler.sampling_ratio == 2
    assert type(heads.mask_head) is MaskHead
    pooled = _model(make_config, make_model, *POOL).roi_heads
    assert isinstance(pooled.box_roi_pool, MultiScaleRoIPool)
    assert isinstance(pooled.mask_roi_pool, MultiScaleRoIPool)


# --- softmax mask loss ----------------------------------------------------------------------


def test_softmax_mask_loss_matches_a_hand_computed_case():
    # one RoI of class 2 among 3 channels (background, 1, 2), two pixels with targets 1 and 0.25
    logits = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]], [[2.0, -1.0]]]])  # (1, 3, 1, 2)
    targets = torch.tensor([[[1.0, 0.25]]])
    pixel0 = -(2.0 - math.log(1 + math.e + math.e**2))  # -log p_2
    z1 = math.e + 1 + math.exp(-1)
    pixel1 = -(0.25 * (-1 - math.log(z1)) + 0.75 * (1 - math.log(z1)))
    got = mask_softmax_loss(logits, targets, torch.tensor([2]))
    assert got.item() == pytest.approx((pixel0 + pixel1) / 2, rel=1e-6)


def test_softmax_mask_loss_of_no_rois_is_a_zero_that_keeps_the_graph():
    logits = torch.zeros(0, 3, 4, 4, requires_grad=True)
    loss = mask_softmax_loss(logits, torch.zeros(0, 4, 4), torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_softmax_trains_every_class_mask_sigmoid_only_the_ground_truths(
    make_config, make_model, partial_target
):
    image = torch.rand(3, SIZE, SIZE)
    for sets, other_classes_train in (((), False), (SOFTMAX, True)):
        model = _model(make_config, make_model, *sets).train()
        _, grads = _losses_and_grads(model, image, partial_target)
        conv = grads["roi_heads.mask_head.predictor.conv.weight"]  # (K + 1, D, 1, 1)
        assert conv[1].abs().sum() > 0  # the masked instance's class
        # background and the other classes compete in the softmax only
        assert bool(conv[[0, 2, 3]].abs().sum() > 0) == other_classes_train


def test_softmax_box_only_instances_add_nothing_to_the_mask_loss(
    make_config, make_model, partial_target
):
    model = _model(make_config, make_model, *SOFTMAX).train()
    assert isinstance(model.roi_heads.mask_head, SoftmaxMaskHead)
    image = torch.rand(3, SIZE, SIZE)
    losses, grads = _losses_and_grads(model, image, partial_target)
    scrambled = dict(partial_target, masks=partial_target["masks"].clone())
    scrambled["masks"][1] = 1  # a garbage mask on the box-only instance must be ignored
    losses2, grads2 = _losses_and_grads(model, image, scrambled)
    assert losses["loss_mask"] > 0 and torch.equal(losses["loss_mask"], losses2["loss_mask"])
    none = dict(partial_target, has_mask=torch.tensor([False, False]))
    losses3, grads3 = _losses_and_grads(model, image, none)
    assert losses3["loss_mask"].item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for n, g in grads3.items() if ".mask_head." in n)


def test_softmax_inference_gives_the_class_channel_of_the_softmax(make_config, make_model):
    head = _model(make_config, make_model, *SOFTMAX).roi_heads.mask_head
    torch.manual_seed(1)
    features = torch.randn(3, 16, 7, 7)  # (R, fpn_channels, S, S)
    labels = torch.tensor([1, 3, 2])
    probs = head.predict(features, labels)
    assert probs.shape == (3, 1, 14, 14)
    every = head(features, labels).softmax(1)  # (R, K + 1, M, M)
    for r, label in enumerate(labels.tolist()):
        assert torch.equal(probs[r, 0], every[r, label])
    assert torch.allclose(every.sum(1), torch.ones(3, 14, 14))


@pytest.mark.parametrize(
    "clash, key",
    [
        ("model.mask_head.class_agnostic=true", "model.mask_head.class_agnostic"),
        ("model.mask_head.predictor=transfer", "model.mask_head.predictor"),
        ("model.mask_head.mlp_fusion=true", "model.mask_head.mlp_fusion"),
    ],
)
def test_softmax_with_a_head_without_competing_class_masks_is_refused(
    make_config, make_model, clash, key
):
    with pytest.raises(ConfigError, match="model.mask_head.loss") as err:
        _model(make_config, make_model, *SOFTMAX, clash)
    assert key in str(err.value)


# --- C4 -------------------------------------------------------------------------------------


def test_c4_backbone_gives_one_stride_16_map_and_keeps_stage_5():
    backbone = resnet_c4(name="resnet18", trainable_layers=5, norm="gn")
    features = backbone(torch.rand(2, 3, 64, 96))
    assert list(features) == ["0"] and features["0"].shape == (2, 256, 4, 6)
    assert backbone.out_channels == 256
    assert backbone.res5(features["0"]).shape == (2, 512, 2, 3)


def test_c4_trunk_weights_load_stage_5_into_res5(tmp_path):
    torch.manual_seed(0)
    reference = resnet18().state_dict()
    torch.save(reference, tmp_path / "r18.pth")
    backbone = resnet_c4(name="resnet18", trainable_layers=3, norm="frozen_bn")
    load_trunk_weights(backbone, name="resnet18", source=str(tmp_path / "r18.pth"))
    assert torch.equal(backbone.res5[1].conv2.weight, reference["layer4.1.conv2.weight"])
    assert torch.equal(backbone.body.layer3[0].conv1.weight, reference["layer3.0.conv1.weight"])
    # trainable_layers=3 trains stages 3-5: res5 is among them
    assert backbone.res5[0].conv1.weight.requires_grad
    assert not backbone.body.layer1[0].conv1.weight.requires_grad


def test_c4_model_trains_stage_5_from_both_branches_and_predicts(
    make_config, make_model, partial_target
):
    model = _model(make_config, make_model, *C4, "model.box_head.pooler_resolution=14")
    assert isinstance(model.backbone, C4Backbone)
    heads = model.roi_heads
    # one stage 5, shared by the backbone's state and both RoI branches
    assert heads.box_roi_pool.res5 is model.backbone.res5 is heads.mask_roi_pool.res5
    assert heads.mask_resolution == 8  # mask pooler 7 -> stage 5: 4 -> deconv: 8
    assert model.rpn.anchor_generator.num_anchors_per_location() == [15]
    image = torch.rand(3, SIZE, SIZE)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    losses = model([image], [partial_target])
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0
    res5_weight = model.backbone.res5[1].conv2.weight
    for name in ("loss_mask", "loss_classifier"):
        (grad,) = torch.autograd.grad(losses[name], res5_weight, retain_graph=True)
        assert grad.abs().sum() > 0, name
    sum(losses.values()).backward()
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (out,) = model([image])
        (detected,) = model.detect([image])
        (prompted,) = model.masks_for_boxes([image], [partial_target["boxes"]])
    n = len(out["boxes"])
    assert n > 0 and out["masks"].shape == (n, 1, SIZE, SIZE)
    assert detected["box_masks"].shape == (n, 1, 8, 8)
    assert prompted["masks"].shape == (2, 1, SIZE, SIZE)


def test_c4_state_dict_round_trips(make_config, make_model):
    model = _model(make_config, make_model, *C4)
    torch.manual_seed(3)
    other = make_model(make_config(*C4), num_classes=4)
    other.load_state_dict(model.state_dict())
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert other.roi_heads.box_roi_pool.res5 is other.backbone.res5


@pytest.mark.parametrize(
    "sets, keys",
    [
        (("model.mask_head.name=resnet",), ("model.backbone.fpn", "model.mask_head.name")),
        (
            ("model.mask_head.resolution=14",),
            ("model.backbone.fpn", "model.mask_head.resolution"),
        ),
    ],
)
def test_c4_with_a_head_it_cannot_feed_is_refused(make_config, make_model, sets, keys):
    with pytest.raises(ConfigError) as err:
        _model(make_config, make_model, *C4, *sets)
    assert all(key in str(err.value) for key in keys)


def test_c4_with_fcos_is_refused(make_config, make_model):
    with pytest.raises(ConfigError) as err:
        make_model(
            make_config(*C4, "model.fcos.anchor_sizes=[8,16,32,64,128]", preset="deepmac-tiny"),
            num_classes=4,
        )
    assert "model.backbone.fpn" in str(err.value) and "model.detector" in str(err.value)


# --- a short training of each ---------------------------------------------------------------


VARIANTS = pytest.mark.parametrize("sets", [POOL, SOFTMAX, C4], ids=["roi_pool", "softmax", "c4"])


@VARIANTS
def test_each_ablation_learns_on_synthetic_data(make_config, tmp_path, sets):
    cfg = make_config(
        "train.steps=40", "train.lr=0.02", "train.warmup_steps=5", "data.hflip_prob=0.0", *sets
    )
    run = train(cfg, out_dir=tmp_path / "run", progress=False)
    records = [json.loads(line) for line in run.log.read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8
    # from scratch the mask loss only starts to move in 40 steps (sigmoid: 0.693 -> 0.68)
    mask_losses = [r["loss_mask"] for r in records]
    assert sum(mask_losses[-8:]) < sum(mask_losses[:8])


@VARIANTS
def test_each_ablation_fits_one_image_mask(make_config, make_model, partial_target, sets):
    # on the ground-truth box, so the mask head's crop stays put while the RPN learns
    model = _model(make_config, make_model, *sets, "model.mask_head.train_rois=gt").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    image = torch.rand(3, SIZE, SIZE)
    mask_losses = []
    for _ in range(25):
        losses, _ = _losses_and_grads(model, image, partial_target)
        optimizer.step()
        mask_losses.append(losses["loss_mask"].item())
    assert mask_losses[-1] < 0.5 * mask_losses[0]
