"""The command line end to end on tiny data: synth -> train -> evaluate -> predict."""

import errno
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from everyseg.cli import main
from everyseg.predictor import Predictor, draw_overlay

METRIC_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}


@pytest.fixture
def val_images(synth_paths) -> list[Path]:
    return sorted(Path(synth_paths["val_images"]).glob("*.png"))


def test_synth_command_writes_a_coco_data_set(tmp_path):
    argv = ["synth", str(tmp_path), "--train", "2", "--val", "1", "--size", "64"]
    assert main(argv) == 0
    for split, count in (("train", 2), ("val", 1)):
        data = json.loads((tmp_path / f"annotations/{split}.json").read_text())
        assert len(data["images"]) == count
        assert all((tmp_path / split / image["file_name"]).is_file() for image in data["images"])


def test_train_writes_the_run_directory_and_metrics(trained_run):
    run = trained_run.root
    for name in ("config.yaml", "checkpoints/last.pt", "log.jsonl", "metrics.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    buckets = {"frequency_buckets", "class_frequency"}  # by the run's training instances
    gt_boxes = {"gt_boxes"}  # mask quality on ground-truth boxes (tests/test_gt_boxes.py)
    keys = {"segm", "bbox", "seen_classes", "unseen_classes", "images"} | buckets | gt_boxes
    assert set(metrics) == keys
    assert metrics["seen_classes"] == ["circle", "star", "ring"]
    assert len(metrics["unseen_classes"]) == 11 and metrics["images"] == 4
    for kind in ("segm", "bbox"):
        assert set(metrics[kind]) == {
            "all",
            "seen",
            "unseen",
            "per_class",
            "by_frequency",
            "pr_curve",
        }
        for subset in ("all", "seen", "unseen"):
            assert set(metrics[kind][subset]) == METRIC_KEYS
        assert len(metrics[kind]["per_class"]) == 14


def test_evaluate_command_rewrites_metrics(trained_run, copy_run, capsys):
    run = copy_run(trained_run).root
    (run / "metrics.json").unlink()
    assert main(["evaluate", str(run)]) == 0
    assert (run / "metrics.json").is_file()
    assert "segm unseen" in capsys.readouterr().out


def test_evaluate_on_other_data_writes_its_own_metrics_file(
    trained_run, copy_run, synth_paths, capsys
):
    run = copy_run(trained_run).root
    before = (run / "metrics.json").read_bytes()
    argv = ["evaluate", str(run), "--data", synth_paths["val_json"]]
    assert main([*argv, "--images", synth_paths["val_images"]]) == 0
    assert (run / "metrics.json").read_bytes() == before  # the run's own numbers stay
    metrics = json.loads((run / "metrics-val.json").read_text())
    assert metrics["data"]["json"] == synth_paths["val_json"]
    assert metrics["seen_classes"] == ["circle", "star", "ring"] and metrics["images"] == 4
    assert "segm unseen" in capsys.readouterr().out


def test_evaluate_prints_the_table_when_the_metrics_cannot_be_written(
    trained_run, copy_run, synth_paths, capsys
):
    run = copy_run(trained_run).root
    blocked = run / "metrics-val.json"
    blocked.mkdir()  # as unwritable as a read-only directory, even for root
    argv = ["evaluate", str(run), "--data", synth_paths["val_json"]]
    assert main([*argv, "--images", synth_paths["val_images"]]) == 2
    out, err = capsys.readouterr()
    assert "segm unseen" in out
    assert f"everyseg evaluate: error: [Errno {errno.EISDIR}] could not write {blocked}" in err


def test_predict_writes_results_and_overlays_and_skips_bad_files(
    trained_run, val_images, tmp_path, capsys
):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "pred"
    argv = ["predict", str(trained_run.root), *map(str, val_images), str(broken)]
    code = main([*argv, "--out", str(out), "--score-thresh", "0.0"])
    assert code == 1  # one file failed; the others were still processed
    assert "broken.png" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results and {r["image_id"] for r in results} <= {1, 2, 3, 4}
    assert all("counts" in r["segmentation"] and len(r["bbox"]) == 4 for r in results)
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [p.name for p in val_images]


def test_predict_cross_class_nms_gives_one_label_per_object(trained_run, val_images, tmp_path):
    counts = {}
    for name, extra in (("all", []), ("one", ["--cross-class-nms", "0.3"])):
        argv = ["predict", str(trained_run.root), *map(str, val_images), "--out"]
        assert main([*argv, str(tmp_path / name), "--score-thresh", "0", *extra]) == 0
        counts[name] = len(json.loads((tmp_path / name / "results.json").read_text()))
    assert 0 < counts["one"] < counts["all"]


def test_predict_never_overwrites_one_inputs_outputs_with_anothers(
    trained_run, val_images, tmp_path
):
    first, second = val_images[:2]
    for folder, source in (("a", first), ("b", second)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "img.png").write_bytes(source.read_bytes())
    inputs = [tmp_path / "a/img.png", tmp_path / "b/img.png", first]
    out = tmp_path / "pred-same-stem"
    argv = ["predict", str(trained_run.root), *map(str, inputs), "--out", str(out)]
    assert main([*argv, "--score-thresh", "0"]) == 0
    overlays = out / "overlays"
    assert sorted(p.name for p in overlays.iterdir()) == sorted(
        ["img-1.png", "img-2.png", first.name]
    )
    assert not np.array_equal(
        np.asarray(Image.open(overlays / "img-1.png")),
        np.asarray(Image.open(overlays / "img-2.png")),
    )
    results = json.loads((out / "results.json").read_text())
    files = {r["image_id"]: r["file_name"] for r in results}
    assert files == {i: str(path) for i, path in enumerate(inputs, start=1)}


def test_predict_keeps_the_results_done_when_an_image_fails_unexpectedly(
    trained_run, val_images, tmp_path, monkeypatch, capsys
):
    calls = []
    original = Predictor.__call__

    def fail_on_second(self, image):
        calls.append(image)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(self, image)

    monkeypatch.setattr(Predictor, "__call__", fail_on_second)
    out = tmp_path / "pred-stopped"
    argv = ["predict", str(trained_run.root), *map(str, val_images), "--out", str(out)]
    with pytest.raises(RuntimeError, match="simulated"):
        main([*argv, "--score-thresh", "0"])
    results = json.loads((out / "results.json").read_text())
    assert results and {r["image_id"] for r in results} == {1}
    assert [p.name for p in (out / "overlays").iterdir()] == [val_images[0].name]
    assert f"stopped at {val_images[1]} (2 of 4)" in capsys.readouterr().err


def test_predict_refuses_to_write_over_an_input(trained_run, val_images, tmp_path, capsys):
    out = tmp_path / "pred-over-input"
    (out / "overlays").mkdir(parents=True)
    victim = out / "overlays/img.png"
    victim.write_bytes(val_images[0].read_bytes())
    before = victim.read_bytes()
    assert main(["predict", str(trained_run.root), str(victim), "--out", str(out)]) == 2
    assert "would overwrite it" in capsys.readouterr().err
    assert victim.read_bytes() == before


def test_predictor_thresholds_are_checked_before_loading(tmp_path):
    for bad in (float("nan"), float("inf"), -0.1, 1.5, True, "0.5", None):
        for make in (Predictor, Predictor.from_run):  # Predictor(path): deprecated
            with pytest.raises(ValueError, match="score_thresh"):
                make(tmp_path / "no-run", score_thresh=bad)
            with pytest.raises(ValueError, match="mask_thresh"):
                make(tmp_path / "no-run", mask_thresh=bad)


def test_bad_config_key_is_a_clean_error(tmp_path, capsys):
    code = main(["train", "maskrcnn-tiny", "--out", str(tmp_path / "x"), "--set", "train.nope=1"])
    assert code == 2
    assert "train.nope" in capsys.readouterr().err


def test_predictor_accepts_path_array_and_pil(trained_run, val_images):
    predictor = Predictor.from_run(trained_run.root, score_thresh=0.0)
    path = val_images[0]
    array = np.asarray(Image.open(path).convert("RGB"))
    by_path, by_array, by_pil = predictor(path), predictor(array), predictor(Image.open(path))
    assert len(by_path) > 0
    for other in (by_array, by_pil):
        np.testing.assert_array_equal(by_path.boxes, other.boxes)
        np.testing.assert_array_equal(by_path.masks, other.masks)
    assert by_path.masks.shape == (len(by_path), *array.shape[:2])
    assert by_path.masks.dtype == bool
    assert all(name in predictor.class_names for name in by_path.class_names)
    overlay = draw_overlay(array, by_path, min_side=1)
    assert overlay.size == (array.shape[1], array.shape[0])
    assert np.any(np.asarray(overlay) != array)  # something was drawn
    enlarged = draw_overlay(array, by_path, min_side=4 * array.shape[1])
    assert enlarged.size == (4 * array.shape[1], 4 * array.shape[0])


@pytest.mark.parametrize("scale", [1, 2])  # 2: the model resizes the image, boxes must follow
def test_segment_masks_lie_in_their_boxes(trained_run, val_images, scale):
    predictor = Predictor.from_run(trained_run.root)
    path = val_images[0]
    image = np.asarray(Image.open(path).convert("RGB")).repeat(scale, 0).repeat(scale, 1)
    boxes = np.array([[4, 6, 30, 20], [33, 40, 63, 64]], dtype=np.float32) * scale
    instances = predictor.segment(image, boxes)
    assert instances.masks.shape == (2, *image.shape[:2])
    assert np.array_equal(instances.boxes, boxes)
    assert all(1 <= lab <= len(predictor.class_names) for lab in instances.labels)
    for (x0, y0, x1, y1), probs in zip(boxes.astype(int), instances.mask_probs):
        inside = np.zeros_like(probs, dtype=bool)
        inside[y0:y1, x0:x1] = True
        # pasting: probabilities are 0 outside the box and positive (a sigmoid) inside it
        assert not probs[~inside].any()
        assert (probs[inside] > 0).all()


def test_segment_command_writes_masks_overlay_and_rle(trained_run, val_images, tmp_path, capsys):
    path = val_images[0]
    out = tmp_path / "segment"
    argv = ["segment", str(trained_run.root), str(path), "--out", str(out)]
    argv += ["--box", "4", "6", "30", "20", "--box", "33", "40", "63", "64"]
    assert main(argv) == 0
    assert (out / "overlay.png").is_file()
    for i in range(2):
        assert np.asarray(Image.open(out / f"mask_{i}.png")).shape == (64, 64)
    results = json.loads((out / "masks.json").read_text())
    assert len(results) == 2 and all("counts" in r["segmentation"] for r in results)
    assert main([*argv[:5], "--box", "5", "5", "5", "9"]) == 2
    assert "X1 > X0" in capsys.readouterr().err
