"""The bad-input catalogue, part 2: image files, the three policies, `everyseg check-data`, and
prediction on bad files (docs/bad_input.md)."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from everyseg.cli import main
from everyseg.config import DataConfig
from everyseg.data.build import build_dataset
from everyseg.data.coco import CocoInstances, DataError
from everyseg.data.images import load_image
from everyseg.data.report import MAX_CLASS_ROWS, class_table
from everyseg.data.validate import BadSampleWarning
from everyseg.instances import BoxMasks, Instances
from everyseg.predict_files import predict_files

from coco_json import H, W, ann, image_entry


def _truncate(path):
    rng = np.random.default_rng(0)  # noise compresses badly, so there is data to cut
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def _garble_pixels(path):
    """A PNG whose pixel data is corrupt but whose header and end are intact."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 40] = bytes(b ^ 0x55 for b in data[middle : middle + 40])
    path.write_bytes(bytes(data))


def _break(coco_files, path, how):
    if how == "missing":
        path.unlink()
    elif how == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    elif how == "zero-bytes":
        path.write_bytes(b"")
    elif how == "text-file":
        path.write_text("this is not an image")
    elif how == "size-mismatch":
        coco_files.write_image(path, width=W + 1)
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
def test_bad_image_file_is_skipped_with_its_annotations(coco_files, tmp_path, how):
    json_path = coco_files.write_dataset()
    _break(coco_files, tmp_path / "img" / "a.png", how)
    dataset = coco_files.load(json_path)
    key, message = BAD_FILES[how]
    assert coco_files.found(dataset, "skipped_images") == {key: [1]}
    assert coco_files.found(dataset, "skipped_annotations") == {"image_skipped": [10]}
    assert dataset.image_ids == [2] and dataset[0][1]["ann_ids"].tolist() == [20]
    assert str(tmp_path / "img" / "a.png") in dataset.summary()
    with pytest.raises(DataError, match=f"image 1, .*a.png: .*{message}"):
        coco_files.load(json_path, on_bad_sample="error")


@pytest.mark.parametrize(
    ("entry", "detail"),
    [
        ({"id": 1, "file_name": "a.png", "height": H}, "width/height None/30"),
        ({**image_entry(1, "a.png"), "height": 0}, "width/height 40/0"),
        ({"id": 1, "width": W, "height": H}, "no 'file_name'"),
        ({**image_entry(1, "a.png"), "id": "1"}, "id '1' is not an integer"),
        ("a.png", "not a JSON object"),
        ({**image_entry(1, "a.png"), "id": 2**64}, f"id {2**64} is not an integer"),
        ({**image_entry(1, "a.png"), "id": 1.5}, "id 1.5 is not an integer"),
        ({**image_entry(1, "a.png"), "width": 2**70}, f"width/height {2**70}/30"),
        ({**image_entry(1, "a.png"), "height": -30}, "width/height 40/-30"),
        ({**image_entry(1, "a.png"), "width": 40.5}, "width/height 40.5/30"),
    ],
    ids=[
        "no-width",
        "zero-height",
        "no-file-name",
        "string-id",
        "not-an-object",
        "id-beyond-int64",
        "id-1.5",
        "width-beyond-int64",
        "negative-height",
        "fractional-width",
    ],
)
def test_malformed_image_entry(coco_files, entry, detail):
    json_path = coco_files.write_dataset(images=[entry, image_entry(2, "b.png")])
    dataset = coco_files.load(json_path)
    assert list(coco_files.found(dataset, "skipped_images")) == ["malformed_entry"]
    assert dataset.image_ids == [2]
    with pytest.raises(DataError, match=f"images\\[0\\]: {detail}"):
        coco_files.load(json_path, on_bad_sample="error")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_unusual_image_modes_load_as_rgb(coco_files, tmp_path, mode):
    json_path = coco_files.write_dataset()
    gray = np.tile(np.arange(W, dtype=np.uint8) * 6, (H, 1))
    if mode == "I;16":
        Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "img" / "a.png")
    elif mode == "CMYK":
        json_path = coco_files.write_dataset(
            images=[image_entry(1, "a.tiff")], annotations=[ann(10)]
        )
        Image.fromarray(gray).convert("CMYK").save(tmp_path / "img" / "a.tiff")
    else:
        Image.fromarray(gray).convert(mode).save(tmp_path / "img" / "a.png")
    image, target = coco_files.load(json_path, on_bad_sample="error")[0]
    assert image.shape == (3, H, W) and target["compact_masks"].to_dense().shape == (1, H, W)
    expected = torch.from_numpy(gray).float() / 255
    torch.testing.assert_close(image[0], expected, atol=1.5 / 255, rtol=0)


def test_exif_rotated_image_with_displayed_size_loads_rotated(coco_files, tmp_path):
    images = [image_entry(1, "r.jpg", width=H, height=W)]
    json_path = coco_files.write_dataset(images=images, annotations=[ann(10)])
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (W, H), (200, 10, 10)).save(tmp_path / "img" / "r.jpg", exif=exif)
    image, _ = coco_files.load(json_path, on_bad_sample="error")[0]
    assert image.shape == (3, W, H)


# --- truncated files: found from the file's end, without decoding -----------------------------


@pytest.mark.parametrize("name", ["a.png", "a.jpg"])
def test_truncated_png_or_jpeg_is_found_by_the_header_scan(coco_files, tmp_path, monkeypatch, name):
    json_path = coco_files.write_dataset(images=[image_entry(1, name), image_entry(2, "b.png")])
    _truncate(tmp_path / "img" / name)
    decoded = []
    load_pixels = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda im: decoded.append(im) or load_pixels(im))
    dataset = coco_files.load(json_path)
    assert coco_files.found(dataset, "skipped_images") == {"unreadable": [1]}
    assert "image file is truncated" in dataset.summary()
    assert len(decoded) == 1  # only the file without its end marker was decoded


def test_png_with_data_after_its_end_is_not_truncated(coco_files, tmp_path):
    json_path = coco_files.write_dataset()
    path = tmp_path / "img" / "a.png"
    path.write_bytes(path.read_bytes() + bytes(3000))  # legal: readers stop at IEND
    assert coco_files.load(json_path, on_bad_sample="error").image_ids == [1, 2]


# --- a file that only fails when decoded ------------------------------------------------------


@pytest.fixture
def corrupt(coco_files, tmp_path):
    json_path = coco_files.write_dataset()
    _garble_pixels(tmp_path / "img" / "a.png")
    return json_path


def test_corrupt_pixels_pass_the_header_check_but_not_decoding(coco_files, corrupt):
    assert coco_files.load(corrupt).image_ids == [1, 2]
    dataset = coco_files.load(corrupt, decode_images=True)  # how evaluation reads its set
    assert coco_files.found(dataset, "skipped_images") == {"unreadable": [1]}
    assert "unrecognized data stream contents" in dataset.summary()


def test_corrupt_image_in_training_is_replaced_and_reported(coco_files, corrupt, capsys):
    dataset = coco_files.load(corrupt, train=True)
    for _ in range(2):
        _, target = dataset[(0, 5)]
        assert target["image_id"].item() == 2  # the next image stands in
    err = capsys.readouterr().err
    assert err.count("a.png") == 1  # reported once per process
    assert "image 1: cannot read image" in err and "the next image stands in" in err


def test_corrupt_image_under_warn_and_error(coco_files, corrupt):
    with pytest.warns(BadSampleWarning, match="a.png.*unrecognized data stream"):
        coco_files.load(corrupt, train=True, on_bad_sample="warn")[(0, 1)]
    for dataset in (
        coco_files.load(corrupt, train=True, on_bad_sample="error"),
        coco_files.load(corrupt),
    ):
        with pytest.raises(DataError, match=r"ann.json: image 1: cannot read image .*a.png"):
            dataset[0]


# --- where an image file may be: inside the images folder unless the user opts in --------------


def _outside(coco_files, how):
    """An entry for image 1 whose file_name leads out of img/, to a valid 40x30 image."""
    outside = coco_files.root / "outside.png"
    coco_files.write_image(outside)
    if how == "absolute":
        return image_entry(1, str(outside))
    if how == "dot-dot":
        return image_entry(1, "../outside.png")
    coco_files.images.mkdir(exist_ok=True)
    (coco_files.images / "link.png").symlink_to(outside)
    return image_entry(1, "link.png")


@pytest.mark.parametrize("how", ["absolute", "dot-dot", "symlink"])
def test_file_name_leading_outside_the_images_folder_is_refused(coco_files, tmp_path, how):
    entry = _outside(coco_files, how)
    json_path = coco_files.write_dataset(images=[entry, image_entry(2, "b.png")])
    dataset = coco_files.load(json_path)
    assert coco_files.found(dataset, "skipped_images") == {"outside_images": [1]}
    assert dataset.image_ids == [2]
    message = f"image 1, .*{entry['file_name']}: file_name leads outside the images folder: "
    message += f"leads to {tmp_path / 'outside.png'}; set data.allow_outside_images=true"
    with pytest.raises(DataError, match=message):
        coco_files.load(json_path, on_bad_sample="error")
    allowed = coco_files.load(json_path, allow_outside_images=True, on_bad_sample="error")
    assert allowed.image_ids == [1, 2] and allowed[0][0].shape == (3, H, W)


def test_images_folder_may_itself_be_a_symlink(coco_files, tmp_path):
    (tmp_path / "img" / "x").mkdir(parents=True)
    json_path = coco_files.write_dataset(
        images=[image_entry(1, "a.png"), image_entry(2, "x/../b.png")]
    )
    (tmp_path / "linked").symlink_to(tmp_path / "img")
    dataset = CocoInstances(
        json_path=json_path, images_dir=tmp_path / "linked", on_bad_sample="error"
    )
    assert dataset.image_ids == [1, 2]


def test_allow_outside_images_is_a_config_key(coco_files, tmp_path):
    json_path = coco_files.write_dataset(images=[_outside(coco_files, "dot-dot")])
    cfg = DataConfig(val_json=str(json_path), val_images=str(tmp_path / "img"))
    with pytest.raises(DataError, match="no usable images .*outside the images folder"):
        build_dataset(cfg, split="val")
    cfg.allow_outside_images = True
    assert build_dataset(cfg, split="val").image_ids == [1]


# --- images the model's resize would crush ----------------------------------------------------


def test_image_too_thin_for_the_resize_is_skipped_before_training(coco_files, tmp_path):
    images = [image_entry(1, "thin.png", width=2000, height=3), image_entry(2, "b.png")]
    json_path = coco_files.write_dataset(images=images, annotations=[ann(20, 2), ann(21, 1)])
    coco_files.write_image(tmp_path / "img" / "thin.png", width=2000, height=3)
    cfg = DataConfig(train_json=str(json_path), train_images=str(tmp_path / "img"))
    cfg.min_size, cfg.max_size = [800], 1333
    dataset = build_dataset(cfg, split="train")
    assert coco_files.found(dataset, "skipped_images") == {"unusable_size": [1]}
    assert "2000x3 (aspect ratio 667:1) becomes 1333.0x2.0 px with data.min_size=[800]" in (
        dataset.summary()
    )
    cfg.max_size = 100_000  # the short side reaches 800 px: nothing to skip
    assert build_dataset(cfg, split="train").image_ids == [1, 2]
    cfg.max_size, cfg.on_bad_sample = 1333, "error"
    with pytest.raises(DataError, match="image 1, .*thin.png: a side under 8 px once resized"):
        build_dataset(cfg, split="train")


# --- policies ---------------------------------------------------------------------------------


def test_skip_summary_names_every_bad_sample(coco_files):
    bad = [ann(100 + i, bbox=[1, 1, -1, 1]) for i in range(30)]
    dataset = coco_files.load(coco_files.write_dataset(annotations=[ann(10), *bad]))
    line = next(x for x in dataset.summary().splitlines() if "negative box" in x)
    assert line.endswith(", ".join(str(100 + i) for i in range(30)) + ")")


def test_warn_warns_once_per_bad_sample(coco_files):
    json_path = coco_files.write_dataset(annotations=[ann(10), ann(0), ann(11, category_id=9)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = coco_files.load(json_path, on_bad_sample="warn")
    messages = [str(w.message) for w in caught if w.category is BadSampleWarning]
    assert len(messages) == 2 and "has id 0" in messages[0] and "annotation 11" in messages[1]
    assert dataset.index.findings.num_bad == 2


def test_error_stops_at_the_first_bad_sample(coco_files):
    json_path = coco_files.write_dataset(annotations=[ann(10), ann(11, bbox=None), ann(0)])
    with pytest.raises(DataError, match="annotation 11, image 1: bbox missing"):
        coco_files.load(json_path, on_bad_sample="error")


# --- everyseg check-data ----------------------------------------------------------------------


def test_check_data_clean_json(coco_files, tmp_path, capsys):
    coco_files.write_dataset()
    assert main(["check-data", str(tmp_path / "ann.json"), "--images", str(tmp_path / "img")]) == 0
    out = capsys.readouterr().out
    assert "OK: no bad samples" in out and "* cat" in out
    assert "pixels not decoded; run --decode" in out  # says what it checked, not a bare OK
    argv = ["check-data", str(tmp_path / "ann.json"), "--images", str(tmp_path / "img")]
    assert main([*argv, "--decode"]) == 0
    assert "OK: no bad samples (every image decoded)" in capsys.readouterr().out


def test_check_data_json_report_and_exit_code(coco_files, tmp_path, capsys):
    json_path = coco_files.write_dataset(annotations=[ann(10), ann(11, image_id=9)])
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
        "outside_images": 0,
        "unusable_size": 0,
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


def test_check_data_config_checks_train_and_val(coco_files, tmp_path, capsys):
    # a dog too: a train set whose mask classes have no mask cannot train (test below)
    annotations = [ann(10), ann(20, 2), ann(30, 2, category_id=2)]
    json_path = coco_files.write_dataset(annotations=annotations)
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


def test_check_data_says_when_the_train_set_cannot_train(coco_files, tmp_path, capsys):
    json_path = coco_files.write_dataset()  # cats only
    argv = ["check-data", "maskrcnn-tiny", "--set", "data.mask_classes=dog"]
    for key, value in (("json", json_path), ("images", tmp_path / "img")):
        argv += ["--set", f"data.train_{key}={value}"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "cannot train: " in out and "mask classes (dog) has a usable mask" in out
    assert main([*argv, "--json"]) == 1
    train, _ = json.loads(capsys.readouterr().out)["datasets"]  # the preset has a val set
    assert train["num_bad"] == 0 and "set data.mask_classes=none" in train["cannot_train"]


def test_check_data_unreadable_dataset_is_reported_not_raised(tmp_path, capsys):
    (tmp_path / "ann.json").write_text("{")
    assert main(["check-data", str(tmp_path / "ann.json"), "--images", str(tmp_path)]) == 1
    assert "error: " in capsys.readouterr().out


def test_check_data_json_needs_images(coco_files, capsys):
    assert main(["check-data", str(coco_files.write_dataset())]) == 2
    assert "--images DIR" in capsys.readouterr().err


def test_check_data_reads_headers_not_pixels(coco_files, tmp_path, monkeypatch, capsys):
    coco_files.write_dataset()
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels were decoded"))
    assert main(["check-data", str(tmp_path / "ann.json"), "--images", str(tmp_path / "img")]) == 0


def test_check_data_finds_truncated_files_without_decode(coco_files, tmp_path, capsys):
    json_path = coco_files.write_dataset()
    _truncate(tmp_path / "img" / "a.png")
    assert main(["check-data", str(json_path), "--images", str(tmp_path / "img")]) == 1
    assert "image file is truncated" in capsys.readouterr().out


def test_check_data_decode_finds_corrupt_pixels(tmp_path, corrupt, capsys):
    argv = ["check-data", str(corrupt), "--images", str(tmp_path / "img")]
    assert main(argv) == 0  # the header and the end are intact
    assert "pixels not decoded; run --decode" in capsys.readouterr().out
    assert main([*argv, "--decode"]) == 1
    assert "unrecognized data stream contents" in capsys.readouterr().out


# --- prediction on bad files ------------------------------------------------------------------


class _EmptyPredictor:
    """Reads each image like Predictor does, and detects nothing."""

    def __call__(self, path):
        load_image(path)
        empty = np.zeros((0,), dtype=np.float32)
        masks = BoxMasks(
            torch.zeros(0, 1, 14, 14), torch.zeros(0, 4), image_size=(1, 1), threshold=0.5
        )
        return Instances(empty.reshape(0, 4), empty, empty.astype(np.int64), [], masks)

    def coco_results(self, instances, *, image_id):
        return []


def test_predict_reports_each_bad_file_and_processes_the_rest(coco_files, tmp_path, capsys):
    good = tmp_path / "good.png"
    coco_files.write_image(good)
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
    failures = predict_files(_EmptyPredictor(), paths, overlays=tmp_path / "out" / "overlays")
    assert len(failures) == 5
    assert [f.split(":")[0] for f in failures] == [str(p) for p in paths if p != good]
    assert "truncated" in failures[0] and "No such file" in failures[-1]
    assert [p.name for p in (tmp_path / "out" / "overlays").iterdir()] == ["good.png"]
    assert capsys.readouterr().err.count("skipped ") == 5


def test_class_table_of_a_large_vocabulary_is_truncated_and_says_so():
    classes = [
        {"name": f"c{i}", "category_id": i, "mask_class": i % 50 == 0, "boxes": 1000 - i}
        | {"masks": 0}
        for i in range(1000)
    ]
    lines = class_table(classes, with_ids=True)
    shown = [line[2:].split()[0] for line in lines[1:-2]]
    assert len(shown) == MAX_CLASS_ROWS
    assert shown[:20] == [f"c{i}" for i in range(0, 1000, 50)]  # mask classes, most boxes first
    assert shown[20:30] == [f"c{i}" for i in range(1, 11)]  # then the most frequent others
    assert shown[30:] == [f"c{i}" for i in range(990, 1000)]  # and the least frequent
    assert lines[-2].startswith("... 960 more classes") and "check-data --json" in lines[-2]
    small = class_table(classes[:MAX_CLASS_ROWS])
    assert len(small) == MAX_CLASS_ROWS + 2 and not any(x.startswith("...") for x in small)
