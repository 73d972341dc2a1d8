"""Masks bounded by what is kept: detect() leaves masks in their boxes, the Predictor pastes only
kept detections, one region at a time, into exactly the pixels of torchvision's full paste."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from everyseg import overlay_draw
from everyseg.engine.coco_results import to_coco_results
from everyseg.instances import BoxMasks, Instances
from everyseg.modeling import paste
from everyseg.modeling.paste import inside_box, pasted_crops
from everyseg.predictor import Predictor, draw_overlay, image_to_tensor

FCOS = "model.backbone.fpn_channels=64"  # FCOS's GroupNorm(32, C) needs C >= 32


def _boxes_in_and_out(height: int, width: int) -> torch.Tensor:
    """Boxes inside, across every edge, tiny, degenerate and outside an (H, W) image."""
    return torch.tensor(
        [
            [5.0, 4.0, 30.5, 22.0],
            [-12.0, -3.0, 9.0, 15.0],
            [40.0, 20.0, width + 9.0, height + 4.0],
            [17.2, 11.9, 17.9, 12.3],
            [20.0, 10.0, 20.0, 10.0],
            [0.0, 0.0, float(width), float(height)],
            [float(width), 3.0, float(width), 9.0],
        ]
    )


def _planes(crops, size) -> torch.Tensor:
    """(region, crop) pairs -> (N, H, W) planes, zero outside each region."""
    crops = list(crops)
    full = torch.zeros(len(crops), *size)
    for plane, ((x0, y0, x1, y1), crop) in zip(full, crops):
        plane[y0:y1, x0:x1] = crop
    return full


def test_pasted_crops_are_torchvisions_paste_pixel_for_pixel():
    torch.manual_seed(0)
    size = (37, 53)
    boxes = _boxes_in_and_out(*size)
    box_masks = torch.rand(len(boxes), 1, 14, 14)
    expected = paste_masks_in_image(box_masks, boxes, size)[:, 0]  # (N, H, W)
    crops = list(pasted_crops(box_masks, boxes, size))
    for (x0, y0, x1, y1), crop in crops:
        assert crop.shape == (y1 - y0, x1 - x0)
    assert torch.equal(_planes(crops, size), expected)
    # outside its region a full paste is zero: the region is all a mask can reach
    assert sum(crop.numel() for _, crop in crops) < expected.numel() / 2
    assert list(pasted_crops(box_masks[:0], boxes[:0], size)) == []
    # a box past the image's edge (torchvision's paste raises): an empty region
    beyond = torch.tensor([[size[1] + 5.0, 3.0, size[1] + 20.0, 9.0]])
    ((region, crop),) = pasted_crops(box_masks[:1], beyond, size)
    assert region[0] == region[2] == size[1] and crop.numel() == 0


def test_box_masks_give_full_masks_one_mask_probabilities_and_rle():
    torch.manual_seed(1)
    size = (37, 53)
    boxes = _boxes_in_and_out(*size)
    box_probs = torch.rand(len(boxes), 1, 14, 14)
    pasted = paste_masks_in_image(box_probs, boxes, size)[:, 0]  # (N, H, W)
    masks = BoxMasks(box_probs, boxes, image_size=size, threshold=0.5)
    full = masks.full()
    assert full.dtype == bool and full.shape == (len(boxes), *size)
    np.testing.assert_array_equal(full, (pasted > 0.5).numpy())
    for i in range(len(boxes)):
        np.testing.assert_array_equal(masks.mask(i), full[i])
    np.testing.assert_array_equal(masks.probabilities(), pasted.numpy())
    decoded = mask_util.decode(masks.rle())  # (H, W, N)
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1), full)


def test_box_masks_cut_to_box_keep_only_pixels_centred_in_the_box():
    torch.manual_seed(2)
    size = (37, 53)
    boxes = torch.tensor([[5.0, 4.0, 30.5, 22.0], [-12.0, -3.0, 9.0, 15.0]])
    box_probs = torch.rand(2, 1, 14, 14) * 0.5 + 0.5  # every pasted pixel inside is > 0.5
    masks = BoxMasks(box_probs, boxes, image_size=size, threshold=0.4, cut_to_box=True)
    ys, xs = torch.meshgrid(torch.arange(37) + 0.5, torch.arange(53) + 0.5, indexing="ij")
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        centred = ((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)).numpy()
        pasted = paste_masks_in_image(box_probs[i : i + 1], boxes[i : i + 1], size)[0, 0]
        np.testing.assert_array_equal(masks.mask(i), centred & (pasted > 0.4).numpy())
        np.testing.assert_array_equal(masks.probabilities()[i], pasted.numpy() * centred)
    assert inside_box(boxes[0], (0, 0, 0, 0)).shape == (0, 0)


@pytest.mark.parametrize("preset", ["maskrcnn-tiny", "deepmac-tiny"])
def test_detect_is_the_eval_forward_before_pasting(make_config, make_model, preset):
    torch.manual_seed(0)
    model = make_model(make_config(FCOS, preset=preset), num_classes=4).eval()
    images = [torch.rand(3, 40, 56), torch.rand(3, 64, 48)]  # resized: boxes go to and fro
    with torch.no_grad():
        forward, detected = model(images), model.detect(images)
    for full, unpasted, image in zip(forward, detected, images):
        assert len(full["boxes"]) > 0
        assert set(unpasted) == {"boxes", "labels", "scores", "box_masks"}
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(full[key], unpasted[key]), key
        m = unpasted["box_masks"].shape[-1]
        assert unpasted["box_masks"].shape == (len(full["boxes"]), 1, m, m) and m < 40
        pasted = paste_masks_in_image(unpasted["box_masks"], unpasted["boxes"], image.shape[1:])
        assert torch.equal(pasted, full["masks"])


def test_masks_for_boxes_unpasted_paste_to_the_pasted_ones(make_model, tiny_cfg):
    torch.manual_seed(0)
    model = make_model(tiny_cfg, num_classes=4).eval()
    image = torch.rand(3, 48, 64)
    boxes = torch.tensor([[4.0, 6.0, 30.0, 20.0], [-3.0, 20.0, 70.0, 48.0]])
    with torch.no_grad():
        (pasted,) = model.masks_for_boxes([image], [boxes])
        (unpasted,) = model.masks_for_boxes([image], [boxes], paste=False)
    assert "masks" not in unpasted and torch.equal(unpasted["boxes"], pasted["boxes"])
    again = paste_masks_in_image(unpasted["box_masks"], unpasted["boxes"], (48, 64))
    assert torch.equal(again, pasted["masks"])


def test_evaluation_rle_from_box_masks_equals_the_full_paste_rle():
    torch.manual_seed(3)
    size = (37, 53)
    boxes = _boxes_in_and_out(*size)
    box_masks = torch.rand(len(boxes), 1, 14, 14)
    common = {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64)}
    common["scores"] = torch.rand(len(boxes))
    full = dict(common, masks=paste_masks_in_image(box_masks, boxes, size))
    kwargs = dict(image_id=3, label_to_cat_id={1: 7}, mask_threshold=0.5)
    expected = to_coco_results(full, **kwargs)
    got = to_coco_results(dict(common, box_masks=box_masks), image_size=size, **kwargs)
    assert got == expected
    with pytest.raises(ValueError, match="image_size"):
        to_coco_results(dict(common, box_masks=box_masks), **kwargs)


@pytest.fixture
def upscaled_image(synth_paths) -> np.ndarray:
    """A val image at 96 x 128: not the model's input size, so masks are scaled back."""
    path = sorted(Path(synth_paths["val_images"]).glob("*.png"))[0]
    array = np.asarray(Image.open(path).convert("RGB"))
    return np.asarray(Image.fromarray(array).resize((128, 96)))


def test_predictor_pastes_only_kept_detections_never_a_full_image_float(
    trained_run, upscaled_image, monkeypatch
):
    predictor = Predictor.from_run(trained_run.root, device="cpu", mask_thresh=0.5)
    tensor = image_to_tensor(upscaled_image)
    with torch.no_grad():
        (old,) = predictor.model([tensor])  # the old path: every detection pasted full-size
    predictor.score_thresh = float(old["scores"].median())
    keep = old["scores"] >= predictor.score_thresh
    assert 0 < int(keep.sum()) < len(keep)

    pasted_shapes = []
    original = paste.paste_mask_in_image

    def recording(mask, box, height, width):
        pasted_shapes.append((height, width))
        return original(mask, box, height, width)

    def refuse(*args, **kwargs):
        raise AssertionError("the full-image paste ran")

    monkeypatch.setattr(paste, "paste_mask_in_image", recording)
    monkeypatch.setattr("torchvision.models.detection.transform.paste_masks_in_image", refuse)
    instances = predictor(upscaled_image)
    assert len(pasted_shapes) == len(instances) == int(keep.sum())
    assert all(h * w < 96 * 128 for h, w in pasted_shapes)
    for key in ("boxes", "scores", "labels"):
        np.testing.assert_array_equal(getattr(instances, key), old[key][keep].numpy())
    expected = (old["masks"][keep, 0] > 0.5).numpy()
    np.testing.assert_array_equal(instances.masks, expected)
    monkeypatch.undo()
    full = {key: value[keep] for key, value in old.items()}
    expected_results = to_coco_results(
        full, image_id=5, label_to_cat_id=predictor.label_to_cat_id, mask_threshold=0.5
    )
    assert predictor.coco_results(instances, image_id=5) == expected_results


def test_segment_masks_are_the_old_cut_pasted_masks(trained_run, upscaled_image):
    predictor = Predictor.from_run(trained_run.root, device="cpu")
    boxes = np.array([[4, 6, 60, 40], [-8, 50, 100, 200], [66.5, 10.2, 70.1, 13.9]], np.float32)
    instances = predictor.segment(upscaled_image, boxes)
    tensor = image_to_tensor(upscaled_image)
    with torch.no_grad():
        (old,) = predictor.model.masks_for_boxes([tensor], [torch.from_numpy(boxes)])
    ys, xs = torch.meshgrid(torch.arange(96) + 0.5, torch.arange(128) + 0.5, indexing="ij")
    for i, (x0, y0, x1, y1) in enumerate(old["boxes"].tolist()):
        centred = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
        probs = old["masks"][i, 0] * centred
        np.testing.assert_array_equal(instances.mask(i), (probs > 0.5).numpy())
        np.testing.assert_array_equal(instances.mask_probs[i], probs.numpy())


@pytest.mark.parametrize("min_side", [1, 128])  # scale 1, and small images enlarged 3x
def test_overlay_paints_each_mask_in_its_region_as_torchvision_draws_full_masks(
    min_side, monkeypatch
):
    torch.manual_seed(2)
    size = (37, 53)
    boxes = _boxes_in_and_out(*size)
    masks = BoxMasks(torch.rand(len(boxes), 1, 14, 14), boxes, image_size=size, threshold=0.5)
    instances = Instances(
        boxes=boxes.numpy(),
        scores=np.linspace(0.9, 0.5, len(boxes), dtype=np.float32),
        labels=np.arange(1, len(boxes) + 1),
        class_names=[f"c{i}" for i in range(len(boxes))],
        box_masks=masks,
    )
    image = torch.rand(3, *size)
    ours = np.asarray(draw_overlay(image, instances, min_side=min_side))

    def full_planes(_):  # the overlay must not ask for (N, H, W) masks
        raise AssertionError("full-image masks built for an overlay")

    monkeypatch.setattr(BoxMasks, "full", full_planes)
    assert np.array_equal(np.asarray(draw_overlay(image, instances, min_side=min_side)), ours)
    monkeypatch.undo()
    scale = max(1, -(-min_side // max(size)))
    canvas = (image * 255).round().to(torch.uint8)
    canvas = canvas.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    planes = torch.from_numpy(masks.full()).repeat_interleave(scale, 1)
    planes = planes.repeat_interleave(scale, 2)
    colors = [overlay_draw._color(int(label)) for label in instances.labels]
    reference = draw_segmentation_masks(canvas, planes, alpha=0.45, colors=colors)
    boxes = torch.from_numpy(instances.boxes) * scale
    reference = draw_bounding_boxes(reference, boxes, colors=colors, width=2)
    reference = Image.fromarray(reference.permute(1, 2, 0).numpy())
    captions = [f"{n} {s:.2f}" for n, s in zip(instances.class_names, instances.scores)]
    overlay_draw._draw_captions(reference, boxes.tolist(), captions, colors)
    difference = np.abs(ours.astype(int) - np.asarray(reference).astype(int))
    assert difference.max() <= 1  # float blending rounds either way by one level


def test_overlay_captions_sit_on_a_tag_of_the_class_colour():
    size = (128, 128)
    boxes = torch.tensor([[40.0, 60.0, 100.0, 120.0], [10.0, 0.0, 30.0, 20.0]])
    instances = Instances(
        boxes=boxes.numpy(),
        scores=np.array([0.9, 0.8], dtype=np.float32),
        labels=np.array([1, 2]),
        class_names=["circle", "square"],
        box_masks=BoxMasks(torch.zeros(2, 1, 14, 14), boxes, image_size=size, threshold=0.5),
    )
    overlay = np.asarray(draw_overlay(torch.zeros(3, *size), instances, min_side=512))
    boxes = boxes.numpy()
    for (x0, y0, _, _), label in zip((boxes * 4).astype(int).tolist(), (1, 2)):
        # on a black image with empty masks: above the box where there is room, else inside
        # it at the top, a patch largely of the class colour with the caption's text on it
        rows = slice(y0 - 8, y0) if y0 > 40 else slice(y0 + 2, y0 + 10)
        patch = overlay[rows, x0 + 2 : x0 + 40].reshape(-1, 3)
        tag = (patch == overlay_draw._color(label)).all(1)
        assert tag.mean() > 0.3 and not tag.all()
