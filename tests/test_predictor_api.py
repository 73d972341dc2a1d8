"""The Python API: Predictor over an in-memory model or a run, tensors and batches in, an
image's features reused across box prompts (set_image, then segment(boxes=...))."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from everyseg.engine.load import load_run
from everyseg.predictor import Predictor

BOXES = [[4, 6, 30, 20], [33, 40, 63, 64]]


@pytest.fixture(scope="module")
def image(synth_paths) -> np.ndarray:
    """(H, W, 3) uint8: the first val image."""
    path = sorted(Path(synth_paths["val_images"]).glob("*.png"))[0]
    return np.array(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def predictor(trained_run) -> Predictor:
    return Predictor.from_run(trained_run.root, device="cpu", score_thresh=0.0)


def assert_same(a, b):
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-4)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.class_names == b.class_names
    np.testing.assert_allclose(a.mask_probs, b.mask_probs, atol=1e-5)


def test_an_in_memory_model_predicts_as_its_run(trained_run, predictor, image):
    run = load_run(trained_run.root, device="cpu")
    in_memory = Predictor(
        run.model,
        class_names=run.record.class_names,
        label_to_cat_id=run.record.label_to_cat_id,
        score_thresh=0.0,
    )
    expected = predictor(image)
    assert len(expected) > 0
    assert_same(in_memory(image), expected)
    assert in_memory.coco_results(expected, image_id=7) == predictor.coco_results(
        expected, image_id=7
    )


def test_an_in_memory_model_needs_no_class_names(make_config, make_model, image):
    torch.manual_seed(0)
    model = make_model(make_config(), num_classes=4).train()
    predictor = Predictor(model, score_thresh=0.0)
    assert not model.training  # put in eval mode to predict
    assert predictor.class_names == ["class_1", "class_2", "class_3"]
    instances = predictor(image)
    assert set(instances.class_names) <= set(predictor.class_names)
    results = predictor.coco_results(instances, image_id=1)
    assert {r["category_id"] for r in results} <= {1, 2, 3}  # label k is category k
    with pytest.raises(ValueError, match="class_names: the model has 3 classes, got 2"):
        Predictor(model, class_names=["a", "b"])
    with pytest.raises(TypeError, match="checkpoint: only Predictor.from_run"):
        Predictor(model, checkpoint="best")


def test_predictor_of_a_run_dir_still_works_but_is_deprecated(trained_run, predictor, image):
    with pytest.warns(DeprecationWarning, match=r"use Predictor\.from_run"):
        old = Predictor(trained_run.root, device="cpu", score_thresh=0.0)
    assert_same(old(image), predictor(image))


def test_tensors_and_batches_give_the_arrays_results(predictor, image):
    expected = predictor(image)
    as_float = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    as_uint8 = torch.from_numpy(image).permute(2, 0, 1)
    for tensor in (as_float, as_uint8):
        assert_same(predictor(tensor), expected)
    flipped = np.ascontiguousarray(image[:, ::-1])
    expected_flipped = predictor(flipped)
    # a list (mixed kinds) and a (B, 3, H, W) tensor run as one batch, in order
    listed = predictor([image, torch.from_numpy(flipped).permute(2, 0, 1)])
    stacked = predictor(torch.stack([as_uint8, torch.from_numpy(flipped).permute(2, 0, 1)]))
    for batch in (listed, stacked):
        assert isinstance(batch, list) and len(batch) == 2
        assert_same(batch[0], expected)
        assert_same(batch[1], expected_flipped)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        predictor(torch.zeros(2, 8, 8))


def test_set_image_then_segment_reuses_the_features(predictor, image):
    one_shot = predictor.segment(image, BOXES)
    calls = []
    hook = predictor.model.backbone.register_forward_hook(lambda *args: calls.append(1))
    try:
        predictor.set_image(image)
        assert len(calls) == 1
        first = predictor.segment(boxes=BOXES)
        again = predictor.segment(boxes=BOXES[1:], labels=[2])
        assert len(calls) == 1  # the backbone ran once, for set_image
    finally:
        hook.remove()
        predictor.reset_image()
    assert_same(first, one_shot)
    assert_same(again, predictor.segment(image, BOXES[1:], labels=[2]))
    assert again.labels.tolist() == [2]
    with pytest.raises(ValueError, match="needs set_image"):
        predictor.segment(boxes=BOXES)
    with pytest.raises(ValueError, match="needs boxes"):
        predictor.segment(image)


def test_cross_class_nms_keeps_the_best_label_of_each_object(trained_run, predictor, image):
    every = predictor(image)  # per-class NMS only: an object may carry several labels
    # the 2-step model's 20 detections on this image overlap by at most ~0.4
    iou = 0.3
    one_each = Predictor.from_run(
        trained_run.root, device="cpu", score_thresh=0.0, cross_class_nms=iou
    )(image)
    assert 0 < len(one_each) < len(every)
    kept = {tuple(box) for box in one_each.boxes.round(3).tolist()}
    assert kept <= {tuple(box) for box in every.boxes.round(3).tolist()}
    overlaps = box_iou(torch.from_numpy(every.boxes), torch.from_numpy(one_each.boxes))
    for i, box in enumerate(every.boxes.round(3).tolist()):
        better = torch.from_numpy(one_each.scores) > every.scores[i]
        # dropped exactly when a better-scoring kept box of any class covers it
        assert (tuple(box) not in kept) == bool((overlaps[i][better] > iou).any())
    inner = one_each.boxes
    assert (box_iou(torch.from_numpy(inner), torch.from_numpy(inner)).triu(1) <= iou).all()
    with pytest.raises(ValueError, match="cross_class_nms"):
        Predictor.from_run(trained_run.root, device="cpu", cross_class_nms=1.5)
