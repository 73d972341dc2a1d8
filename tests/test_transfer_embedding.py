"""benchmarks/transfer_embedding.py: the pieces its correlation is built from."""

import importlib.util
from pathlib import Path

import numpy as np
import torch

from everyseg.data.coco import CocoInstances

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "transfer_embedding.py"
spec = importlib.util.spec_from_file_location("transfer_embedding", SCRIPT)
transfer_embedding = importlib.util.module_from_spec(spec)
spec.loader.exec_module(transfer_embedding)


def test_spearman_is_one_for_monotone_and_minus_one_for_reversed():
    a = np.array([0.1, 0.5, 0.2, 0.9])
    assert transfer_embedding.spearman(a, a**3) == 1.0
    assert transfer_embedding.spearman(a, -a) == -1.0


def test_detection_embeddings_read_each_class_rows_without_background():
    num_classes, dim = 3, 5
    cls = torch.arange((num_classes + 1) * dim, dtype=torch.float).reshape(num_classes + 1, dim)
    box = torch.randn(4 * (num_classes + 1), dim)
    state = {
        "roi_heads.box_predictor.cls_score.weight": cls,
        "roi_heads.box_predictor.bbox_pred.weight": box,
    }
    embeddings = transfer_embedding.detection_embeddings(state, num_classes)
    assert embeddings["cls"].shape == (3, 5) and embeddings["box"].shape == (3, 20)
    np.testing.assert_array_equal(embeddings["cls"][0], cls[1].numpy())
    # class 2 (row 1 here) owns the box regressor's rows 8..11
    np.testing.assert_array_equal(embeddings["box"][1], box[8:12].reshape(-1).numpy())
    np.testing.assert_array_equal(embeddings["cls+box"][2, :5], cls[3].numpy())


def test_mean_class_masks_are_box_crops_in_unit_range(synth_paths):
    dataset = CocoInstances(
        json_path=synth_paths["train_json"],
        images_dir=synth_paths["train_images"],
        mask_classes="all",
    )
    shapes = transfer_embedding.mean_class_masks(dataset, max_images=8, resolution=14)
    assert shapes.shape == (len(dataset.class_names), 14, 14)
    present = ~np.isnan(shapes).any(axis=(1, 2))
    assert present.any()
    # a filled shape cropped to its own box covers its centre and stays within [0, 1]
    assert shapes[present].min() >= 0 and shapes[present].max() <= 1
    assert (shapes[present][:, 7, 7] > 0.5).mean() > 0.5
