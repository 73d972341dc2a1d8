"""Compact training masks: RoI targets from polygons / RLE agree with torchvision's targets
from dense masks, flips are exact, and the loader never builds a full-image mask."""

import math
import pickle

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from torch.nn.functional import interpolate
from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes

from everyseg.data import compact_masks
from everyseg.data.coco import CocoInstances
from everyseg.data.compact_masks import CompactMasks, batch_targets, compact, to_coco
from everyseg.data.transforms import hflip
from everyseg.modeling.mask_branch import jitter_boxes

M = 28
# torchvision's targets from dense masks, to float rounding (soft RoIAlign values included)
ATOL = 1e-5


def _torchvision_targets(masks, boxes, idxs, image_size):
    """torchvision's targets for (R, 4) boxes: the dense masks resized as its transform
    resizes them (nearest), then project_masks_on_boxes."""
    dense = masks.to_dense()  # (N, H, W), as the loader used to send
    resized = interpolate(dense[:, None].float(), size=image_size)[:, 0].byte()
    return project_masks_on_boxes(resized, boxes, idxs, M)


def _rois(target, image_size, rng_seed):
    """Boxes around every masked instance (exact and jittered) in an image resized to
    image_size, and the instances they belong to."""
    masks = target["compact_masks"]
    h, w = image_size
    scale = torch.tensor([w / masks.width, h / masks.height] * 2)
    keep = torch.where(target["has_mask"])[0]
    boxes = target["boxes"][keep] * scale
    torch.manual_seed(rng_seed)
    boxes = torch.cat([boxes, jitter_boxes(boxes.repeat(3, 1), jitter=0.2)])
    return boxes, keep.repeat(4)


# the training sizes of the tiny presets (112-144 px from 128 px images) and more
@pytest.mark.parametrize("scale", [0.875, 1.0, 1.125, 1.5, 2.0])
def test_targets_equal_torchvision_targets_from_dense_masks(synth_paths, scale):
    dataset = CocoInstances(
        json_path=synth_paths["train_json"],
        images_dir=synth_paths["train_images"],
        train=True,
        hflip_prob=0.5,
    )
    kinds = []
    for i in range(len(dataset)):
        image, target = dataset[(i, i)]
        masks = target["compact_masks"]
        size = (round(image.shape[1] * scale), round(image.shape[2] * scale))
        boxes, idxs = _rois(target, size, rng_seed=i)
        got = masks.crop_and_resize(boxes, idxs, resolution=M, image_size=size)
        expected = _torchvision_targets(masks, boxes, idxs, size)
        assert got.shape == expected.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        kinds += [isinstance(masks.segms[j], bytes) for j in idxs.tolist()]
    assert 20 <= sum(kinds) <= len(kinds) - 20  # both polygons and RLE were compared


def _border_case():
    """A 37 x 53 image's polygons with vertices outside the image and off pycocotools'
    fifth-of-a-pixel grid (left of and above each crop, where its truncating cast rounds
    up), an RLE, and RoIs over the image's borders and thinner than a pixel."""
    height, width = 37, 53
    polygons = [
        [[-3.37, -2.11, 20.93, 1.07, 14.41, 30.77, 0.33, 36.58]],
        [[30.13, 4.49, 56.71, 12.29, 47.87, 39.93], [33.3, 20.1, 41.7, 21.3, 36.9, 33.9]],
    ]
    rle = np.zeros((height, width), dtype=np.uint8, order="F")
    rle[3:30, 8:17] = 1
    rle[20:37, 40:53] = 1
    segms = [compact(p, height=height, width=width) for p in polygons]
    segms.append(compact(mask_utils.encode(rle), height=height, width=width))
    boxes = torch.tensor(
        [
            [-2.5, -1.3, 21.7, 35.2],
            [2.2, 6.9, 12.8, 20.1],
            [9.6, 12.3, 9.9, 30.2],  # thinner than a pixel
            [28.4, 3.1, 55.9, 38.6],
            [35.05, 18.2, 40.3, 30.7],
            [7.2, 2.4, 50.1, 36.9],
            [40.6, 19.2, 60.3, 41.4],
        ]
    )
    idxs = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    return CompactMasks(segms, height=height, width=width), boxes, idxs


def test_targets_at_image_borders_and_off_grid_vertices():
    """_border_case's instances, at three scales and flipped: still torchvision's targets."""
    unflipped, boxes, idxs = _border_case()
    height, width = unflipped.height, unflipped.width
    for scale in (0.7, 1.0, 1.37):
        size = (round(height * scale), round(width * scale))
        rois = boxes * scale
        for masks in (unflipped, unflipped.hflip()):
            got = masks.crop_and_resize(rois, idxs, resolution=M, image_size=size)
            expected = _torchvision_targets(masks, rois, idxs, size)
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
            assert ((got > 0) & (got < 1)).any()  # soft values, as torchvision's


@pytest.mark.parametrize("dense_floats", [compact_masks.DENSE_FLOATS, 0])
def test_batch_targets_equal_torchvision_targets_image_by_image(
    synth_paths, monkeypatch, dense_floats
):
    """A batch of images of other sizes, scales and flips: all RoIs cut at once from the
    masks drawn whole (or, over DENSE_FLOATS, image by image from crops) give torchvision's
    targets of each image, in order."""
    monkeypatch.setattr(compact_masks, "DENSE_FLOATS", dense_floats)
    dataset = CocoInstances(
        json_path=synth_paths["train_json"],
        images_dir=synth_paths["train_images"],
        train=True,
        hflip_prob=0.5,
    )
    border_masks, border_rois, border_idxs = _border_case()
    batch = [(border_masks.hflip(), border_rois * 1.37, border_idxs, (51, 73))]
    for i, scale in enumerate((0.875, 1.5, 1.0)):
        image, target = dataset[(i, i)]
        size = (round(image.shape[1] * scale), round(image.shape[2] * scale))
        boxes, idxs = _rois(target, size, rng_seed=i)
        batch.append((target["compact_masks"], boxes, idxs, size))
    batch.append((border_masks, border_rois, border_idxs, (37, 53)))
    no_rois = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    batch.insert(2, (border_masks, *no_rois, (300, 200)))  # the largest image, with no RoI
    masks, boxes, idxs, sizes = zip(*batch)
    got = batch_targets(masks, boxes, idxs, resolution=M, image_sizes=sizes)
    expected = torch.cat([_torchvision_targets(*item) for item in batch if len(item[1])])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert ((got > 0) & (got < 1)).any()
    empty = [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.int64)]
    none = batch_targets(masks[:1], *empty, resolution=M, image_sizes=sizes[:1])
    assert none.shape == (0, M, M)


def test_polygons_are_drawn_on_the_rois_crop_only(monkeypatch):
    """Memory stays with the RoIs: a small instance of a large image is drawn on a canvas the
    size of what its RoIs read, not the image's."""
    canvases = []
    draw = mask_utils.frPyObjects

    def recording(polygons, height, width):
        canvases.append((height, width))
        return draw(polygons, height, width)

    monkeypatch.setattr(mask_utils, "frPyObjects", recording)
    square = [[1000.0, 1500.0, 1040.0, 1500.0, 1040.0, 1530.0, 1000.0, 1530.0]]
    masks = CompactMasks([compact(square, height=2000, width=3000)], height=2000, width=3000)
    boxes = torch.tensor([[995.0, 1495.0, 1045.0, 1535.0], [1002.0, 1490.0, 1050.0, 1520.0]])
    targets = masks.crop_and_resize(
        boxes, torch.tensor([0, 0]), resolution=M, image_size=(2000, 3000)
    )
    assert canvases == [(48, 58)]  # the union of both RoIs and a pixel each side
    assert targets[0].sum() > 0 and targets[0].max() == 1


def _square_polygon_and_rle(height=30, width=40):
    polygon = [[3.0, 4.0, 17.5, 4.0, 25.0, 20.0, 3.0, 26.0]]
    dense = np.zeros((height, width), dtype=np.uint8, order="F")
    dense[5:12, 22:37] = 1
    dense[12:25, 30:33] = 1
    counts = mask_utils.encode(dense)["counts"].decode("ascii")
    rle = {"size": [height, width], "counts": counts}
    segms = [compact(s, height=height, width=width) for s in (polygon, rle)]
    return CompactMasks([*segms, None], height=height, width=width), (polygon, rle)


def test_hflip_of_compact_masks_is_the_flip_of_their_masks():
    masks, _ = _square_polygon_and_rle()
    image = torch.rand(3, masks.height, masks.width)
    boxes = torch.tensor([[3.0, 4.0, 25.0, 26.0], [22.0, 5.0, 37.0, 25.0], [0.0, 0.0, 5.0, 5.0]])
    target = {"boxes": boxes, "compact_masks": masks}
    _, flipped = hflip(image, target)
    assert torch.equal(flipped["compact_masks"].to_dense(), masks.to_dense().flip(-1))
    assert torch.equal(flipped["compact_masks"].hflip().to_dense(), masks.to_dense())
    # an RoI target of the flipped image is the mirror of the RoI's mirror in the original
    rois = torch.tensor([[2.0, 3.0, 27.0, 28.0], [20.5, 4.0, 38.0, 26.0]])
    mirrored = torch.stack([masks.width - rois[:, 2], rois[:, 1], masks.width - rois[:, 0]], 1)
    mirrored = torch.cat([mirrored, rois[:, 3:]], 1)
    idxs = torch.tensor([0, 1])
    size = (masks.height, masks.width)
    got = flipped["compact_masks"].crop_and_resize(rois, idxs, resolution=M, image_size=size)
    # in torchvision's convention (pixel centres at integers) x mirrors to W - 1 - x
    one_px = torch.tensor([1.0, 0.0, 1.0, 0.0])
    original = masks.crop_and_resize(mirrored - one_px, idxs, resolution=M, image_size=size)
    torch.testing.assert_close(got, original.flip(-1), atol=1e-5, rtol=0)


def test_compact_form_round_trips_to_coco():
    masks, (polygon, rle) = _square_polygon_and_rle()
    height, width = masks.height, masks.width
    assert to_coco(masks.segms[0], height=height, width=width) == polygon
    assert to_coco(masks.segms[1], height=height, width=width) == rle
    assert isinstance(masks.segms[0][0], np.ndarray) and masks.segms[0][0].dtype == np.float64
    assert isinstance(masks.segms[1], bytes)
    assert pickle.loads(pickle.dumps(masks)).to_dense().equal(masks.to_dense())  # to workers


def test_box_only_instances_have_no_mask_to_cut():
    masks, _ = _square_polygon_and_rle()
    assert masks.to_dense()[2].sum() == 0
    size = (masks.height, masks.width)
    none = masks.crop_and_resize(
        torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), resolution=M, image_size=size
    )
    assert none.shape == (0, M, M)
    with pytest.raises(ValueError, match=r"instances \[2\] are box-only"):
        masks.crop_and_resize(
            torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.tensor([2]), resolution=M, image_size=size
        )


def test_the_loader_builds_no_full_image_mask(synth_paths, monkeypatch):
    """Structural: nothing is decoded or rasterised while loading a training sample, and every
    tensor of the target grows with the instance count only."""

    def refuse(*args, **kwargs):
        raise AssertionError("a mask was decoded in the loader")

    for name in ("decode", "frPyObjects", "merge"):
        monkeypatch.setattr(mask_utils, name, refuse)
    dataset = CocoInstances(
        json_path=synth_paths["train_json"],
        images_dir=synth_paths["train_images"],
        train=True,
        hflip_prob=0.5,
    )
    for i in range(len(dataset)):
        image, target = dataset[(i, i)]
        n = len(target["boxes"])
        assert "masks" not in target and len(target["compact_masks"]) == n
        for key, value in target.items():
            if isinstance(value, torch.Tensor):
                assert value.numel() <= 4 * max(n, 1), key


def test_training_on_compact_masks_matches_dense_masks(make_model, tiny_cfg, partial_target):
    """The same image and instances as compact and as dense masks: the same losses (the
    square is pixel-aligned, so its targets agree), through a resize (48 -> 64 px)."""
    torch.manual_seed(0)
    model = make_model(tiny_cfg, num_classes=4).train()
    image = interpolate(torch.rand(1, 3, 64, 64), size=(48, 48))[0]
    dense = dict(partial_target, boxes=partial_target["boxes"] * 0.75)
    dense["masks"] = torch.zeros(2, 48, 48, dtype=torch.uint8)
    dense["masks"][0, 6:24, 6:24] = 1  # the 64 px square 8..30 at 48 px (6..22.5: rounded)
    square = [[6.0, 6.0, 24.0, 6.0, 24.0, 24.0, 6.0, 24.0]]
    segms = [compact(square, height=48, width=48), None]
    compact_target = {k: v for k, v in dense.items() if k != "masks"}
    compact_target["compact_masks"] = CompactMasks(segms, height=48, width=48)
    losses = {}
    for name, target in (("dense", dense), ("compact", compact_target)):
        torch.manual_seed(1)  # the RPN and RoI samplers draw random subsets
        losses[name] = {k: v.item() for k, v in model([image], [target]).items()}
    for key in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        assert losses["dense"][key] == losses["compact"][key], key
    assert losses["compact"]["loss_mask"] > 0
    assert math.isclose(losses["dense"]["loss_mask"], losses["compact"]["loss_mask"], rel_tol=0.05)


def test_image_with_only_box_only_instances_trains(make_model, tiny_cfg, partial_target):
    torch.manual_seed(0)
    model = make_model(tiny_cfg, num_classes=4).train()
    target = {k: v for k, v in partial_target.items() if k != "masks"}
    target["has_mask"] = torch.tensor([False, False])
    target["compact_masks"] = CompactMasks([None, None], height=64, width=64)
    losses = model([torch.rand(3, 64, 64)], [target])
    assert losses["loss_mask"].item() == 0.0 and losses["loss_classifier"] > 0
    sum(losses.values()).backward()


def test_mask_head_learns_polygon_masks_that_match_the_ground_truth(make_model, tiny_cfg):
    """test_model's geometry check with targets rasterised from polygons: pasted predictions
    cover the true shapes, so the targets' half-pixel convention is the one pasting expects."""
    torch.manual_seed(0)
    model = make_model(tiny_cfg, num_classes=4).eval()
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    disc = np.stack([18 + 10 * np.cos(angles), 20 + 10 * np.sin(angles)], 1).ravel()
    triangle = np.array([30.0, 36.0, 53.0, 59.0, 30.0, 59.0])
    masks = CompactMasks(
        [compact([p.tolist()], height=64, width=64) for p in (disc, triangle)], height=64, width=64
    )
    truth = masks.to_dense().bool()
    image = torch.full((3, 64, 64), 0.2)
    image[:, truth.any(0)] = 0.9
    boxes = torch.tensor([[8.0, 10.0, 28.0, 30.0], [30.0, 36.0, 53.0, 59.0]])
    labels = torch.tensor([1, 2])
    roi_heads = model.roi_heads
    with torch.no_grad():
        images, _ = model.transform([image])
        features = model.backbone(images.tensors)
    head = roi_heads.mask_head.train()
    optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
    resolution = roi_heads.mask_roi_pool.output_size[0] * 2
    targets = masks.crop_and_resize(
        boxes, torch.tensor([0, 1]), resolution=resolution, image_size=(64, 64)
    )
    roi_features = roi_heads.mask_roi_pool(features, [boxes], [(64, 64)])
    for _ in range(150):
        loss = head.loss(head(roi_features, labels), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probs = head.eval().predict(roi_features, labels)  # (2, 1, M, M)
    pasted = paste_masks_in_image(probs, boxes, (64, 64))[:, 0] > 0.5
    for predicted, true in zip(pasted, truth):
        iou = (predicted & true).sum() / (predicted | true).sum()
        assert iou > 0.8, iou
