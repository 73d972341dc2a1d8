"""The model: torchvision equality, partial mask supervision, mask-head contract."""

import pytest
import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes

from everyseg.config import load_config
from everyseg.engine.initialize import initialize_for_training
from everyseg.modeling.detector import from_torchvision
from everyseg.modeling.losses import mask_bce_loss
from everyseg.modeling.mask_heads.base import SubpixelFeatures

SIZE = 64


def _losses_and_grads(model, image, target, seed=0):
    model.zero_grad(set_to_none=False)
    torch.manual_seed(seed)  # the RPN and RoI samplers draw random subsets
    losses = model([image], [target])
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.fixture
def model_and_image(make_model, tiny_cfg):
    torch.manual_seed(0)
    model = make_model(tiny_cfg, num_classes=4).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model, torch.rand(3, SIZE, SIZE)


def test_from_torchvision_gives_identical_predictions():
    """Bit for bit, though everyseg's copy pools its stem before the ReLU and keeps its
    anchors (the torchvision model is left as it was)."""
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    tv = MaskRCNN(backbone, num_classes=5, min_size=SIZE, max_size=SIZE, box_score_thresh=0.0)
    tv.eval()
    ours = from_torchvision(tv).eval()
    assert isinstance(ours.backbone.body.relu, torch.nn.Identity)
    assert isinstance(tv.backbone.body.relu, torch.nn.ReLU)
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, 48, SIZE)]
    with torch.no_grad():
        expected, got = tv(images), ours(images)
    for e, g in zip(expected, got):
        assert len(e["boxes"]) > 0
        assert set(e) == set(g) == {"boxes", "labels", "scores", "masks"}
        for key in e:
            assert torch.equal(e[key], g[key]), key


def test_box_only_instance_adds_nothing_to_mask_loss(model_and_image, partial_target):
    model, image = model_and_image
    target = partial_target
    losses, grads = _losses_and_grads(model, image, target)
    scrambled = dict(target, masks=target["masks"].clone())
    scrambled["masks"][1] = 1  # garbage mask on the box-only instance: must be ignored
    losses2, grads2 = _losses_and_grads(model, image, scrambled)
    assert torch.equal(losses["loss_mask"], losses2["loss_mask"])
    for name, grad in grads.items():
        if ".mask_head." in name:
            assert torch.equal(grad, grads2[name]), name


def test_box_only_instance_still_trains_the_box_head(model_and_image, partial_target):
    model, image = model_and_image
    target = partial_target
    none_masked = dict(target, has_mask=torch.tensor([False, False]))
    losses, grads = _losses_and_grads(model, image, none_masked)
    # no supervised RoI: a zero mask loss that keeps the graph, so every mask-head
    # parameter gets an all-zero gradient rather than none
    assert losses["loss_mask"].item() == 0.0
    mask_grads = [g for n, g in grads.items() if ".mask_head." in n]
    assert mask_grads and all(torch.count_nonzero(g) == 0 for g in mask_grads)
    box_grad = grads["roi_heads.box_predictor.cls_score.weight"]
    assert torch.count_nonzero(box_grad[2]) > 0  # the box-only class's classifier row trains
    assert losses["loss_classifier"] > 0


def test_masked_instance_trains_the_mask_head(model_and_image, partial_target):
    model, image = model_and_image
    losses, grads = _losses_and_grads(model, image, partial_target)
    assert losses["loss_mask"] > 0
    assert torch.count_nonzero(grads["roi_heads.mask_head.predictor.conv.weight"]) > 0


def test_image_without_instances_trains(model_and_image):
    model, image = model_and_image
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, SIZE, SIZE, dtype=torch.uint8),
        "has_mask": torch.zeros(0, dtype=torch.bool),
    }
    losses, _ = _losses_and_grads(model, image, empty)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_classifier"] > 0


def test_mask_bce_loss_empty_keeps_graph():
    logits = torch.zeros(0, 14, 14, requires_grad=True)
    loss = mask_bce_loss(logits, torch.zeros(0, 14, 14))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


@pytest.mark.parametrize("agnostic, channels", [(False, 4), (True, 1)])
def test_mask_head_shapes(make_config, make_model, agnostic, channels):
    cfg = make_config(f"model.mask_head.class_agnostic={str(agnostic).lower()}")
    head = make_model(cfg, num_classes=4).roi_heads.mask_head
    assert head.predictor.conv.out_channels == channels
    features = torch.rand(5, 16, 7, 7)  # (R, C, S, S)
    labels = torch.tensor([1, 2, 3, 1, 2])
    assert head(features, labels).shape == (5, 14, 14)
    assert head.predict(features, labels).shape == (5, 1, 14, 14)


def test_class_specific_head_selects_the_labels_channel(make_config, make_model):
    head = make_model(make_config(), num_classes=4).roi_heads.mask_head
    features = torch.rand(3, 16, 7, 7)
    all_channels = head.predictor.conv(head.features(features))  # (R, K, M, M)
    labels = torch.tensor([3, 1, 2])
    assert torch.equal(head(features, labels), all_channels[torch.arange(3), labels])


@pytest.mark.parametrize("agnostic", [False, True])
def test_training_head_reads_the_deconv_before_its_shuffle(make_config, make_model, agnostic):
    """Training on a CPU, the FCN head's deconv and per-class 1x1 conv run as matrix
    products in subpixel order (mask_heads/base.py): the logits and every gradient equal
    the plain layers' within float rounding, channels-last and empty inputs included."""
    cfg = make_config(f"model.mask_head.class_agnostic={str(agnostic).lower()}")
    head = make_model(cfg, num_classes=4).roi_heads.mask_head.train()
    assert isinstance(head.features, SubpixelFeatures)
    torch.nn.init.normal_(head.predictor.conv.weight, std=0.1)  # logits far from 0
    plain = head.predictor.class_logits
    for layout in (torch.contiguous_format, torch.channels_last):
        head.to(memory_format=layout)
        for rois in (6, 0):
            features = torch.rand(rois, 16, 7, 7).to(memory_format=layout).requires_grad_()
            labels = torch.tensor([1, 2, 3, 1, 2, 3])[:rois]
            got = head(features, labels)  # (R, 14, 14)
            all_classes = plain(head.features(features))  # (R, K + 1 or 1, 14, 14)
            expected = all_classes[torch.arange(rois), 0 if agnostic else labels]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            if rois:
                inputs = [features, *head.parameters()]
                got_grads = torch.autograd.grad((got**2).sum(), inputs)
                expected_grads = torch.autograd.grad((expected**2).sum(), inputs)
                for g, e in zip(got_grads, expected_grads):
                    torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_eval_outputs_masks_in_image_size(make_model, tiny_cfg):
    model = make_model(tiny_cfg, num_classes=4).eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 40, 56)])
    assert out["masks"].shape[1:] == (1, 40, 56)
    assert out["masks"].shape[0] == out["boxes"].shape[0] == out["labels"].shape[0]


def test_mask_head_learns_masks_that_match_the_ground_truth(make_model, tiny_cfg):
    """Fit the mask branch on ground-truth boxes of an easy image, then paste its masks back
    into the image: they must cover the true shapes (checks loss, RoI targets and pasting
    agree on geometry)."""
    torch.manual_seed(0)
    model = make_model(tiny_cfg, num_classes=4).eval()
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    disc = ((yy - 20) ** 2 + (xx - 18) ** 2 <= 100).to(torch.uint8)
    triangle = ((yy >= 36) & (yy <= 58) & (xx >= 30) & (xx - 30 <= yy - 36)).to(torch.uint8)
    masks = torch.stack([disc, triangle])  # (2, H, W)
    image = torch.full((3, SIZE, SIZE), 0.2)
    image[:, masks.bool().any(0)] = 0.9
    boxes = torch.tensor([[8.0, 10.0, 29.0, 31.0], [30.0, 36.0, 53.0, 59.0]])
    labels = torch.tensor([1, 2])
    roi_heads = model.roi_heads
    with torch.no_grad():
        images, _ = model.transform([image])
        features = model.backbone(images.tensors)
    head = roi_heads.mask_head.train()
    optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
    resolution = roi_heads.mask_roi_pool.output_size[0] * 2
    targets = project_masks_on_boxes(masks, boxes, torch.tensor([0, 1]), resolution)
    roi_features = roi_heads.mask_roi_pool(features, [boxes], [(SIZE, SIZE)])
    initial = head.loss(head(roi_features, labels), targets).item()
    for _ in range(150):
        loss = head.loss(head(roi_features, labels), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3 * initial
    probs = head.eval().predict(roi_features, labels)  # (2, 1, M, M)
    pasted = paste_masks_in_image(probs, boxes, (SIZE, SIZE))[:, 0] > 0.5
    for predicted, truth in zip(pasted, masks.bool()):
        iou = (predicted & truth).sum() / (predicted | truth).sum()
        assert iou > 0.8, iou


def test_init_from_a_torchvision_state_dict(make_model, tmp_path, capsys):
    """model.init loads a torchvision MaskRCNN .pth: the same predictions when the class
    count matches; when it differs only the class-dependent predictors start afresh."""
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    tv = MaskRCNN(backbone, num_classes=6, min_size=SIZE, max_size=SIZE).eval()
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    sizes = [f"data.min_size=[{SIZE}]", f"data.test_min_size={SIZE}", f"data.max_size={SIZE}"]
    overrides = ["model.backbone.name=resnet18", "model.backbone.weights=null", *sizes]
    cfg = load_config("maskrcnn", [*overrides, f"model.init={path}"])
    ours = make_model(cfg, num_classes=6)
    initialize_for_training(ours, cfg)
    ours.eval()
    images = [torch.rand(3, SIZE, SIZE)]
    with torch.no_grad():
        expected, got = tv(images)[0], ours(images)[0]
    for key in expected:
        assert torch.equal(expected[key], got[key]), key

    other = make_model(cfg, num_classes=3)
    initialize_for_training(other, cfg)
    reinitialised = capsys.readouterr().out
    assert "roi_heads.box_predictor.cls_score.weight" in reinitialised
    assert "roi_heads.mask_head.predictor.conv.weight" in reinitialised
    tv_conv = tv.backbone.body.layer1[0].conv1.weight
    assert torch.equal(other.backbone.body.layer1[0].conv1.weight, tv_conv)
