"""The bad-input catalogue, part 2: image files, the three policies, `everyseg check-data`, and
prediction on bad files (docs/bad_input.md)."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from everyseg.cli import main, predict_files
from everyseg.data.coco import DataError
from everyseg.data.images import load_image
from everyseg.data.validate import BadSampleWarning
from everyseg.predictor import Instances
from tests.bad_data import H, W, ann, found, image_entry, load, write_dataset, write_image


def _truncate(path):
    rng = np.random.default_rng(0)  # noise compresses badly, so there is data to cut
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def _break(path, how):
    if how == "missing":
        path.unlink()
    elif how == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    elif how == "zero-bytes":
        path.write_bytes(b"")
    elif how == "text-file":
        path.write_text("this is not an image")
    elif how == "size-mismatch":
        write_image(path, width=W + 1)
    elif how == "exif-rotated-json-has-stored-size":
        exif = Image.Exif()
        exif[0x0112] = 6  # displayed rotated 90 degrees: 30x40
        Image.new("RGB", (W, H)).save(path, format="PNG", exif=exif)


BAD_FILES = {
    "missing": ("missing", "image file not found"),
    "corrupt": ("unreadable", "image file unreadable: UnidentifiedImageError: cannot identify"),
    "zero-bytes": ("unreadable", "image file unreadable: UnidentifiedImageError"),
    "text-file": ("unreadable", "image file unreadable: UnidentifiedImageError"),
    "size-mismatch": ("size_mismatch", r"differs from the JSON: file is 41x30 .*JSON says 40x30"),
    "exif-rotated-json-has-stored-size": ("size_mismatch", "file is 30x40 .*before EXIF rotation"),
}


@pytest.mark.parametrize("how", list(BAD_FILES))
def test_bad_image_file_is_skipped_with_its_annotations(tmp_path, how):
    json_path = write_dataset(tmp_path)
    _break(tmp_path / "img" / "a.png", how)
    dataset = load(tmp_path, json_path)
    key, message = BAD_FILES[how]
    assert found(dataset, "skipped_images") == {key: [1]}
    assert found(dataset, "skipped_annotations") == {"image_skipped": [10]}
    assert dataset.image_ids == [2] and dataset[0][1]["ann_ids"].tolist() == [20]
    assert str(tmp_path / "img" / "a.png") in dataset.summary()
    with pytest.raises(DataError, match=f"image 1, .*a.png: .*{message}"):
        load(tmp_path, json_path, on_bad_sample="error")


@pytest.mark.parametrize(
    ("entry", "detail"),
    [
        ({"id": 1, "file_name": "a.png", "height": H}, "width/height None/30"),
        ({**image_entry(1, "a.png"), "height": 0}, "width/height 40/0"),
        ({"id": 1, "width": W, "height": H}, "no 'file_name'"),
        ({**image_entry(1, "a.png"), "id": "1"}, "id '1' is not an integer"),
        ("a.png", "not a JSON object"),
    ],
    ids=["no-width", "zero-height", "no-file-name", "string-id", "not-an-object"],
)
def test_malformed_image_entry(tmp_path, entry, detail):
    json_path = write_dataset(tmp_path, images=[entry, image_entry(2, "b.png")])
    dataset = load(tmp_path, json_path)
    assert list(found(dataset, "skipped_images")) == ["malformed_entry"]
    assert dataset.image_ids == [2]
    with pytest.raises(DataError, match=f"images\\[0\\]: {detail}"):
        load(tmp_path, json_path, on_bad_sample="error")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_unusual_image_modes_load_as_rgb(tmp_path, mode):
    json_path = write_dataset(tmp_path)
    gray = np.tile(np.arange(W, dtype=np.uint8) * 6, (H, 1))
    if mode == "I;16":
        Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "img" / "a.png")
    elif mode == "CMYK":
        json_path = write_dataset(
            tmp_path, images=[image_entry(1, "a.tiff")], annotations=[ann(10)]
        )
        Image.fromarray(gray).convert("CMYK").save(tmp_path / "img" / "a.tiff")
    else:
        Image.fromarray(gray).convert(mode).save(tmp_path / "img" / "a.png")
    image, target = load(tmp_path, json_path, on_bad_sample="error")[0]
    assert image.shape == (3, H, W) and target["masks"].shape == (1, H, W)
    expected = torch.from_numpy(gray).float() / 255
    torch.testing.assert_close(image[0], expected, atol=1.5 / 255, rtol=0)


def test_exif_rotated_image_with_displayed_size_loads_rotated(tmp_path):
    images = [image_entry(1, "r.jpg", width=H, height=W)]
    json_path = write_dataset(tmp_path, images=images, annotations=[ann(10)])
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (W, H), (200, 10, 10)).save(tmp_path / "img" / "r.jpg", exif=exif)
    image, _ = load(tmp_path, json_path, on_bad_sample="error")[0]
    assert image.shape == (3, W, H)


# --- a file that only fails when decoded ------------------------------------------------------


@pytest.fixture
def truncated(tmp_path):
    json_path = write_dataset(tmp_path)
    _truncate(tmp_path / "img" / "a.png")
    return json_path


def test_truncated_image_passes_the_header_check_but_not_decoding(tmp_path, truncated):
    assert load(tmp_path, truncated).image_ids == [1, 2]
    dataset = load(tmp_path, truncated, decode_images=True)  # how evaluation reads its set
    assert found(dataset, "skipped_images") == {"unreadable": [1]}
    assert "image file is truncated" in dataset.summary()


def test_truncated_image_in_training_is_replaced_and_reported(tmp_path, truncated, capsys):
    dataset = load(tmp_path, truncated, train=True)
    for _ in range(2):
        _, target = dataset[(0, 5)]
        assert target["image_id"].item() == 2  # the next image stands in
    err = capsys.readouterr().err
    assert err.count("a.png") == 1  # reported once per process
    assert "image 1: cannot read image" in err and "the next image stands in" in err


def test_truncated_image_under_warn_and_error(tmp_path, truncated):
    with pytest.warns(BadSampleWarning, match="a.png.*truncated"):
        load(tmp_path, truncated, train=True, on_bad_sample="warn")[(0, 1)]
    for dataset in (
        load(tmp_path, truncated, train=True, on_bad_sample="error"),
        load(tmp_path, truncated),
    ):
        with pytest.raises(DataError, match=r"ann.json: image 1: cannot read image .*a.png"):
            dataset[0]


# --- policies ---------------------------------------------------------------------------------


def test_skip_summary_names_every_bad_sample(tmp_path):
    bad = [ann(100 + i, bbox=[1, 1, -1, 1]) for i in range(30)]
    dataset = load(tmp_path, write_dataset(tmp_path, annotations=[ann(10), *bad]))
    line = next(x for x in dataset.summary().splitlines() if "negative box" in x)
    assert line.endswith(", ".join(str(100 + i) for i in range(30)) + ")")


def test_warn_warns_once_per_bad_sample(tmp_path):
    json_path = write_dataset(tmp_path, annotations=[ann(10), ann(0), ann(11, category_id=9)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load(tmp_path, json_path, on_bad_sample="warn")
    messages = [str(w.message) for w in caught if w.category is BadSampleWarning]
    assert len(messages) == 2 and "has id 0" in messages[0] and "annotation 11" in messages[1]
    assert dataset.index.findings.num_bad == 2


def test_error_stops_at_the_first_bad_sample(tmp_path):
    json_path = write_dataset(tmp_path, annotations=[ann(10), ann(11, bbox=None), ann(0)])
    with pytest.raises(DataError, match="annotation 11, image 1: bbox missing"):
        load(tmp_path, json_path, on_bad_sample="error")


# --- everyseg check-data ----------------------------------------------------------------------


def test_check_data_clean_json(tmp_path, capsys):
    write_dataset(tmp_path)
    assert main(["check-data", str(tmp_path / "ann.json"), "--images", str(tmp_path / "img")]) == 0
    out = capsys.readouterr().out
    assert "OK: no bad samples" in out and "* cat" in out


def test_check_data_json_report_and_exit_code(tmp_path, capsys):
    json_path = write_dataset(tmp_path, annotations=[ann(10), ann(11, image_id=9)])
    (tmp_path / "img" / "b.png").unlink()
    argv = ["check-data", str(json_path), "--images", str(tmp_path / "img"), "--json"]
    assert main(argv) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    (rep,) = out["datasets"]
    assert rep["images"] == {
        "total": 2,
        "usable": 1,
        "missing": 1,
        "unreadable": 0,
        "size_mismatch": 0,
        "malformed_entry": 0,
        "found": 1,
        "without_annotations": 0,
    }
    assert rep["skipped_annotations"]["unknown_image"]["items"] == [
        {"ann_id": 11, "detail": "image_id 9"}
    ]
    assert rep["classes"][0] == {
        "name": "cat",
        "category_id": 1,
        "mask_class": True,
        "boxes": 1,
        "masks": 1,
    }


def test_check_data_config_checks_train_and_val(tmp_path, capsys):
    json_path = write_dataset(tmp_path)
    sets = [
        f"data.{s}_{k}={v}"
        for s in ("train", "val")
        for k, v in (("json", json_path), ("images", tmp_path / "img"))
    ]
    argv = ["check-data", "maskrcnn-tiny", "--json", "--set", "data.mask_classes=[dog]"]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 0
    train, val = json.loads(capsys.readouterr().out)["datasets"]
    assert (train["split"], val["split"]) == ("train", "val")
    assert train["classes"][0]["masks"] == 0 and not train["classes"][0]["mask_class"]
    assert val["classes"][0]["masks"] == 2  # evaluation scores every class's masks


def test_check_data_unreadable_dataset_is_reported_not_raised(tmp_path, capsys):
    (tmp_path / "ann.json").write_text("{")
    assert main(["check-data", str(tmp_path / "ann.json"), "--images", str(tmp_path)]) == 1
    assert "error: " in capsys.readouterr().out


def test_check_data_json_needs_images(tmp_path, capsys):
    assert main(["check-data", str(write_dataset(tmp_path))]) == 2
    assert "--images DIR" in capsys.readouterr().err


def test_check_data_reads_headers_not_pixels(tmp_path, monkeypatch, capsys):
    write_dataset(tmp_path)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels were decoded"))
    assert main(["check-data", str(tmp_path / "ann.json"), "--images", str(tmp_path / "img")]) == 0


def test_check_data_decode_finds_truncated_files(tmp_path, truncated, capsys):
    argv = ["check-data", str(truncated), "--images", str(tmp_path / "img")]
    assert main(argv) == 0  # the header is intact
    assert main([*argv, "--decode"]) == 1
    assert "image file is truncated" in capsys.readouterr().out


# --- prediction on bad files ------------------------------------------------------------------


class _EmptyPredictor:
    """Reads each image like Predictor does, and detects nothing."""

    def __call__(self, path):
        load_image(path)
        empty = np.zeros((0,), dtype=np.float32)
        masks = np.zeros((0, 1, 1), dtype=bool)
        return Instances(empty.reshape(0, 4), empty, empty.astype(np.int64), [], masks, masks)

    def coco_results(self, instances, *, image_id):
        return []


def test_predict_reports_each_bad_file_and_processes_the_rest(tmp_path, capsys):
    good = tmp_path / "good.png"
    write_image(good)
    bad = {name: tmp_path / name for name in ("trunc.png", "empty.png", "text.png", "gone.png")}
    _truncate(bad["trunc.png"])
    bad["empty.png"].write_bytes(b"")
    bad["text.png"].write_text("no")
    (tmp_path / "folder.png").mkdir()
    paths = [
        bad["trunc.png"],
        good,
        bad["empty.png"],
        tmp_path / "folder.png",
        bad["text.png"],
        bad["gone.png"],
    ]
    failures = predict_files(_EmptyPredictor(), paths, tmp_path / "out")
    assert len(failures) == 5
    assert [f.split(":")[0] for f in failures] == [str(p) for p in paths if p != good]
    assert "truncated" in failures[0] and "No such file" in failures[-1]
    assert [p.name for p in (tmp_path / "out" / "overlays").iterdir()] == ["good.png"]
    assert capsys.readouterr().err.count("skipped ") == 5
