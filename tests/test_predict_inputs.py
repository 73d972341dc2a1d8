"""`everyseg predict` on folders and globs, in batches, with a data set's image ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from everyseg.cli import main
from everyseg.predict_inputs import data_set_ids, image_files


def _touch(root: Path, *names: str) -> list[Path]:
    paths = [root / name for name in names]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return paths


def test_folders_are_walked_for_images_and_globs_expanded(tmp_path):
    a_png, b_jpg, deep_tif = _touch(tmp_path, "in/a.png", "in/sub/b.JPG", "in/sub/deep/c.tif")
    _touch(tmp_path, "in/notes.txt", "in/.hidden/d.png", "in/.e.png", "other/x.png", "other/y.gif")
    assert image_files([tmp_path / "in"]) == [a_png, b_jpg, deep_tif]
    assert image_files([f"{tmp_path}/**/*.png"]) == [a_png, tmp_path / "other/x.png"]
    gone = tmp_path / "gone.png"  # a file that is not there: predict reports it and goes on
    named_twice = [a_png, tmp_path / "in", gone]
    assert image_files(named_twice) == [a_png, b_jpg, deep_tif, gone]


def test_a_folder_without_images_or_a_pattern_matching_nothing_is_an_error(tmp_path):
    _touch(tmp_path, "empty/readme.txt")
    with pytest.raises(ValueError, match=r"empty: no image files in this folder \(.*\.png"):
        image_files([tmp_path / "empty"])
    with pytest.raises(ValueError, match=r"\*\.jpg: no file matches this pattern"):
        image_files([f"{tmp_path}/*.jpg"])


def test_data_set_ids_match_file_names_by_the_end_of_the_path(tmp_path):
    images = [
        {"id": 7, "file_name": "x.png"},
        {"id": 8, "file_name": "b/x.png"},  # longer: wins for b/x.png
        {"id": 9, "file_name": "y.png"},
        {"id": 10, "file_name": "unused.png"},
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    files = [tmp_path / "a/x.png", tmp_path / "b/x.png", tmp_path / "c/y.png", tmp_path / "z.png"]
    assert data_set_ids(data, files) == [7, 8, 9, None]


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (
            [{"id": 1, "file_name": "x.png"}, {"id": 2, "file_name": "x.png"}],
            r"images\[1\] \(id 2\) has the file_name 'x.png' of images\[0\] \(id 1\)",
        ),
        ([{"id": "1", "file_name": "x.png"}], r"images\[0\] needs an integer id"),
        ([{"id": 1}], r"images\[0\] needs an integer id and a string file_name"),
    ],
)
def test_bad_image_entries_of_the_data_set_are_named(tmp_path, images, message):
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"images": images}))
    with pytest.raises(ValueError, match=message):
        data_set_ids(data, [tmp_path / "x.png"])


def test_predict_a_folder_in_batches_with_the_data_sets_image_ids(
    trained_run, synth_paths, tmp_path, capsys
):
    val = Path(synth_paths["val_images"])
    folder = tmp_path / "in"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    for name in ("000001.png", "000002.png"):
        shutil.copy(val / name, folder / "a" / name)
    shutil.copy(val / "000003.png", folder / "b" / "000001.png")  # same stem as a/000001.png
    shutil.copy(val / "000004.png", folder / "b" / "stranger.png")  # not in the data set
    (folder / "b" / "broken.png").write_bytes(b"not a png")
    data = tmp_path / "val.json"
    coco = json.loads(Path(synth_paths["val_json"]).read_text())
    names = {1: "a/000001.png", 2: "a/000002.png", 3: "b/000001.png"}
    coco["images"] = [{**image, "file_name": names[image["id"]]} for image in coco["images"][:3]]
    data.write_text(json.dumps(coco))
    out = tmp_path / "pred"
    argv = ["predict", str(trained_run.root), str(folder), "--out", str(out), "--data", str(data)]
    assert main([*argv, "--batch-size", "3", "--score-thresh", "0"]) == 1  # broken.png failed
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.png" in err
    note = err[err.index("note: 2 of 5 files are not images of") :]
    assert "broken.png" in note and "stranger.png" in note and "(overlays only)" in note
    results = json.loads((out / "results.json").read_text())
    ids = {r["file_name"]: r["image_id"] for r in results}
    assert ids == {str(folder / name): image_id for image_id, name in names.items()}
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == ["000001-1.png", "000001-3.png", "000002.png", "stranger.png"]

    one_by_one = tmp_path / "pred-1"
    argv = ["predict", str(trained_run.root), str(folder), "--out", str(one_by_one)]
    assert main([*argv, "--data", str(data), "--score-thresh", "0"]) == 1
    alone = json.loads((one_by_one / "results.json").read_text())
    assert [(r["image_id"], r["category_id"]) for r in alone] == [
        (r["image_id"], r["category_id"]) for r in results
    ]
    for batched, single in zip(results, alone, strict=True):
        assert batched["bbox"] == pytest.approx(single["bbox"], abs=1e-3)
        assert batched["score"] == pytest.approx(single["score"], abs=1e-5)
