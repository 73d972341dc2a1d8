"""`everyseg convert vg`: Visual Genome's own files (image_data.json, objects.json) -> COCO JSON
with boxes only; the streaming JSON-array reader under it; bad input (docs/bad_input.md, V)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from everyseg.cli import main
from everyseg.data.convert_vg import convert_vg
from everyseg.data.index import CocoIndex
from everyseg.data.json_stream import iter_json_array
from everyseg.data.validate import DataError

URL = "https://cs.stanford.edu/people/rak248/{}/{}.jpg"


def _obj(object_id, x, y, w, h, names, synsets=()):
    # VG 1.4's schema, merged_object_ids included
    return {
        "object_id": object_id,
        "x": x,
        "y": y,
        "w": w,
        "h": h,
        "names": list(names),
        "synsets": list(synsets),
        "merged_object_ids": [],
    }


IMAGE_DATA = [
    {"image_id": 1, "width": 100, "height": 80, "url": URL.format("VG_100K", 1), "coco_id": 139,
     "flickr_id": 2402},
    {"image_id": 2, "width": 50, "height": 50, "url": URL.format("VG_100K_2", 2), "coco_id": None,
     "flickr_id": None},
    {"image_id": 3, "width": 60, "height": 40, "url": None, "coco_id": None},
    {"image_id": 4, "width": 60, "height": 40, "url": URL.format("VG_100K", 4), "coco_id": 7},
]  # fmt: skip
OBJECTS = [
    {"image_id": 1, "objects": [
        _obj(10, 5, 5, 20, 30, ["Man "], ["man.n.01"]),
        _obj(11, 0, 0, 10, 10, ["guy"], ["man.n.01"]),
        _obj(12, 90, 70, 20, 20, ["tennis  racket"], ["tennis_racket.n.01"]),  # clipped
        _obj(13, 1, 1, 0, 5, ["tree"], ["tree.n.01"]),  # degenerate: zero width
        _obj(14, 200, 1, 5, 5, ["tree"]),  # outside the 100 x 80 image
        _obj(15, 1, 1, 5, 5, ["  TREE\t"]),
        _obj(16, 1, 1, 5, 5, []),  # no name
    ]},
    {"image_id": 2, "objects": [
        _obj(20, 1, 1, 5, 5, ["men"], ["man.n.01"]),
        _obj(21, 1.5, 1, 5.5, 5, ["Sky"]),
    ], "image_url": URL.format("VG_100K_2", 2)},
    {"image_id": 3, "objects": [_obj(30, 2, 2, 8, 8, ["sky"]), _obj(31, 0, 0, 9, 9, ["tree"])]},
    {"image_id": 4, "objects": [_obj(40, 2, 2, 8, 8, ["zebra"], ["zebra.n.01"])]},
    {"image_id": 99, "objects": [_obj(90, 2, 2, 8, 8, ["man"])]},  # not in image_data.json
]  # fmt: skip


@pytest.fixture
def vg(tmp_path):
    """Write VG files (the small data set above unless given) -> (objects, image_data) paths."""

    def write(objects=OBJECTS, image_data=IMAGE_DATA, indent=None):
        objects_path, image_data_path = tmp_path / "objects.json", tmp_path / "image_data.json"
        objects_path.write_text(json.dumps(objects, indent=indent))
        image_data_path.write_text(json.dumps(image_data, indent=indent))
        return objects_path, image_data_path

    return write


def test_convert_keeps_the_k_most_frequent_normalised_classes(vg, tmp_path):
    objects, image_data = vg()
    out = tmp_path / "vg.json"
    summary = convert_vg(objects=objects, image_data=image_data, classes=4, out=out)
    data = json.loads(out.read_text())
    # man 3 (synset over names), sky 2 and tree 2 (tie: by name), tennis racket 1 and zebra 1
    assert data["categories"] == [
        {"id": 1, "name": "man"},
        {"id": 2, "name": "sky"},
        {"id": 3, "name": "tree"},
        {"id": 4, "name": "tennis racket"},
    ]
    kept = {a["vg_object_id"]: a for a in data["annotations"]}
    assert sorted(kept) == [10, 11, 12, 15, 20, 21, 30, 31]
    assert [a["id"] for a in data["annotations"]] == list(range(1, 9))
    assert kept[12]["bbox"] == [90, 70, 10, 10] and kept[12]["area"] == 100  # clipped
    assert kept[21]["bbox"] == [1.5, 1, 5.5, 5] and kept[21]["category_id"] == 2
    assert kept[10] == {
        "id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 30], "area": 600,
        "iscrowd": 0, "vg_object_id": 10,
    }  # fmt: skip
    # image 4 holds only zebra, the fifth class: not written
    assert data["images"] == [
        {"id": 1, "width": 100, "height": 80, "file_name": "1.jpg", "coco_id": 139},
        {"id": 2, "width": 50, "height": 50, "file_name": "2.jpg"},
        {"id": 3, "width": 60, "height": 40, "file_name": "3.jpg"},
    ]
    assert (summary.objects, summary.kept, summary.clipped) == (13, 8, 1)
    assert dict(summary.dropped) == {
        "rare_class": 1, "degenerate": 1, "outside": 1, "no_name": 1, "no_image": 1,
    }  # fmt: skip
    assert (summary.names_found, summary.classes, summary.images) == (5, 4, 3)
    assert summary.images_without_objects == 1


def test_cli_prints_the_summary_and_the_output_loads_as_box_only_coco(vg, tmp_path, capsys):
    objects, image_data = vg(indent=2)
    out = tmp_path / "out" / "vg.json"
    argv = ["convert", "vg", "--objects", str(objects), "--image-data", str(image_data)]
    assert main([*argv, "--classes", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "13 objects read" in printed
    assert f"kept 7 objects of 3 classes (of 5 found; 3 asked) in 3 images -> {out}" in printed
    assert "class not among the 3 most frequent: 2" in printed
    assert "degenerate box (width or height under 1 px, or not finite): 1" in printed
    assert "box outside the image (under 1 px wide or tall once clipped to it): 1" in printed
    assert "no name and no synset: 1" in printed
    assert "image not in image_data.json: 1" in printed
    assert "images without a kept object (not written): 1" in printed

    images = tmp_path / "images"
    for entry in json.loads(out.read_text())["images"]:
        (images / entry["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (entry["width"], entry["height"])).save(images / entry["file_name"])
    index = CocoIndex(json_path=out, images_dir=images)
    assert index.findings.num_bad == 0
    assert index.class_names == ["man", "sky", "tree"]
    instances = [inst for insts in index.instances.values() for inst in insts]
    assert len(instances) == 7 and all(inst.segm is None for inst in instances)


def test_output_is_the_same_whatever_the_chunking(vg, tmp_path, monkeypatch):
    objects, image_data = vg(indent=1)
    convert_vg(objects=objects, image_data=image_data, classes=5, out=tmp_path / "a.json")
    monkeypatch.setattr("everyseg.data.json_stream.CHUNK_CHARS", 3)
    convert_vg(objects=objects, image_data=image_data, classes=5, out=tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_aliases_rename_classes_synset_keys_first(vg, tmp_path, suffix):
    objects, image_data = vg()
    aliases = tmp_path / f"aliases{suffix}"
    mapping = {"Man.n.01": "person", "sky": "Clouds", "tree": "plant", "man": "boy"}
    aliases.write_text(json.dumps(mapping))  # JSON is YAML too
    out = tmp_path / "vg.json"
    convert_vg(objects=objects, image_data=image_data, classes=3, out=out, aliases=aliases)
    names = [c["name"] for c in json.loads(out.read_text())["categories"]]
    assert names == ["person", "clouds", "plant"]


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"guy": "man", "man": "person"}, "'man' is itself an alias of 'person'"),
        ({"a": "b", " A ": "c"}, "'a' is mapped to both 'b' and 'c'"),
        ({"a": ""}, "an empty name"),
        ({"a": 3}, "must be strings"),
        (["a", "b"], "expected a mapping"),
    ],
)
def test_bad_aliases_file_is_an_error_naming_it(vg, tmp_path, capsys, mapping, message):
    objects, image_data = vg()
    aliases = tmp_path / "aliases.json"
    aliases.write_text(json.dumps(mapping))
    argv = ["convert", "vg", "--objects", str(objects), "--image-data", str(image_data)]
    code = main(
        [*argv, "--classes", "3", "--out", str(tmp_path / "o.json"), "--aliases", str(aliases)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"everyseg convert: error: {aliases}: ") and message in err
    assert not (tmp_path / "o.json").exists()


def _edit(data, i, key=None, value=None, *, drop=None):
    """A deep copy of `data` with data[i][key] = value (or key `drop` removed)."""
    data = json.loads(json.dumps(data))
    target = data[i]
    if drop is not None:
        del target[drop]
    elif key is not None:
        target[key] = value
    else:
        data[i] = value
    return data


def _edit_object(key, value):
    objects = json.loads(json.dumps(OBJECTS))
    objects[1]["objects"][1][key] = value
    return objects


BAD_OBJECTS = {
    "x a string": (_edit_object("x", "1.5"), "image 2, object 21: 'x' must be a number"),
    "h null": (_edit_object("h", None), "image 2, object 21: 'h' must be a number"),
    "names a string": (_edit_object("names", "sky"), "object 21: 'names' must be a list"),
    "synsets of numbers": (_edit_object("synsets", [1]), "object 21: 'synsets' must be a list"),
    "object_id 0": (_edit_object("object_id", 0), "image 2: object_id must be a positive"),
    "objects missing": (_edit(OBJECTS, 2, drop="objects"), "element 2 (image 3): 'objects'"),
    "image_id a string": (_edit(OBJECTS, 0, "image_id", "1"), "element 0: image_id must be"),
    "element a list": (_edit(OBJECTS, 3, value=[1]), "element 3: expected an object, got list"),
    "top level an object": ({"objects": OBJECTS}, "expected a JSON array at the top"),
}
BAD_IMAGE_DATA = {
    "width 0": (_edit(IMAGE_DATA, 1, "width", 0), "image 2: width must be a positive integer"),
    "height missing": (_edit(IMAGE_DATA, 2, drop="height"), "image 3: height must be"),
    "coco_id a string": (_edit(IMAGE_DATA, 0, "coco_id", "139"), "image 1: coco_id must be"),
    "url a number": (_edit(IMAGE_DATA, 3, "url", 5), "image 4: url must be a string"),
    "url ending in ..": (
        _edit(IMAGE_DATA, 3, "url", "http://x/VG_100K/.."),
        "image 4: url 'http://x/VG_100K/..' does not end in a file name",
    ),
    "duplicate image_id": (_edit(IMAGE_DATA, 1, "image_id", 1), "image 1: image_id appears twice"),
    "entry a string": (_edit(IMAGE_DATA, 2, value="3"), "element 2: expected an object"),
}


@pytest.mark.parametrize("case", list(BAD_OBJECTS) + list(BAD_IMAGE_DATA))
def test_wrong_schema_is_an_error_naming_the_file_and_ids(vg, tmp_path, capsys, case):
    if case in BAD_OBJECTS:
        (data, message), name = BAD_OBJECTS[case], "objects.json"
        objects, image_data = vg(objects=data)
    else:
        (data, message), name = BAD_IMAGE_DATA[case], "image_data.json"
        objects, image_data = vg(image_data=data)
    argv = ["convert", "vg", "--objects", str(objects), "--image-data", str(image_data)]
    assert main([*argv, "--classes", "3", "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"everyseg convert: error: {tmp_path / name}: "), err
    assert message in err
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "character 0: expected a JSON array at the top"),
        ('[{"image_id": 1, "objects": []} {"image_id": 2}]', "element 0 of the top-level array"),
        ('[{"image_id": 1, "objects": [}]', "element 0 of the top-level array, character 29"),
        (
            '[{"image_id": 1, "objects": []},',
            "element 1 of the top-level array, character 32: the file ends",
        ),
        ("[] []", "character 3: data after the top-level array"),
        (b"[\xff]", "not UTF-8 JSON text"),
    ],
)
def test_not_json_is_an_error_naming_the_file_and_where(vg, tmp_path, capsys, text, message):
    objects, image_data = vg()
    if isinstance(text, bytes):
        objects.write_bytes(text)
    else:
        objects.write_text(text)
    argv = ["convert", "vg", "--objects", str(objects), "--image-data", str(image_data)]
    assert main([*argv, "--classes", "3", "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"everyseg convert: error: {objects}: ") and message in err, err


def test_missing_files_and_bad_arguments_exit_2(vg, tmp_path, capsys):
    objects, image_data = vg()
    base = ["convert", "vg", "--image-data", str(image_data), "--classes", "3"]
    assert main([*base, "--objects", str(tmp_path / "nope.json"), "--out", "o.json"]) == 2
    assert f"{tmp_path / 'nope.json'} not found" in capsys.readouterr().err
    assert main([*base, "--objects", str(objects), "--out", str(objects)]) == 2
    assert f"would overwrite the input {objects}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*base[:-1], "0", "--objects", str(objects), "--out", "o.json"])
    assert exit_info.value.code == 2
    assert "--classes: must be in [1, 1000000]" in capsys.readouterr().err


def test_nothing_usable_is_an_error(vg, tmp_path):
    objects, image_data = vg(objects=[{"image_id": 1, "objects": [_obj(1, 0, 0, 0, 0, ["a"])]}])
    with pytest.raises(DataError, match=r"no usable object in 1 \(degenerate box"):
        convert_vg(objects=objects, image_data=image_data, classes=3, out=tmp_path / "o.json")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_stream_reader_gives_what_json_load_gives(tmp_path, chunk):
    values = [
        {"a": 1234567, "b": [1.5e3, "x\u00e9y \\" + '"q"'], "c": {"d": None}},
        12345, -0.25, 1e-7, "s", [], {}, None, True, False, [[1, 2], [3]],
    ]  # fmt: skip
    for indent in (None, 3):
        path = tmp_path / "a.json"
        path.write_text(json.dumps(values, indent=indent))
        assert list(iter_json_array(path, chunk_chars=chunk)) == values
    path.write_text(" \n [ \n ] \n")
    assert list(iter_json_array(path, chunk_chars=chunk)) == []
    path.write_bytes(b"\xef\xbb\xbf[1]")  # a byte-order mark
    assert list(iter_json_array(path, chunk_chars=chunk)) == [1]


def test_stream_reader_bounds_an_unterminated_element(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[1, "' + "a" * 10_000)
    with pytest.raises(DataError, match="element 1 .* or an element over 100 characters"):
        list(iter_json_array(path, chunk_chars=10, max_element_chars=100))


def test_older_releases_id_keys_and_blank_names(vg, tmp_path):
    """VG 1.0 wrote `id` for image_id / object_id and one `name`; blank names are skipped."""
    image_data = [{"id": 5, "width": 30, "height": 30, "url": URL.format("VG_100K", 5)}]
    objects = [{"id": 5, "objects": [
        {"id": 8, "x": 1, "y": 1, "w": 9, "h": 9, "name": "Cat"},
        {"id": 9, "x": 1, "y": 1, "w": 9, "h": 9, "names": [" ", "dog"], "synsets": [""]},
    ]}]  # fmt: skip
    objects_path, image_data_path = vg(objects=objects, image_data=image_data)
    out = tmp_path / "vg.json"
    convert_vg(objects=objects_path, image_data=image_data_path, classes=5, out=out)
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["categories"]] == ["cat", "dog"]
    assert [(a["image_id"], a["vg_object_id"]) for a in data["annotations"]] == [(5, 8), (5, 9)]


def test_non_finite_boxes_are_dropped_as_degenerate(vg, tmp_path):
    """Python's json reads NaN / Infinity tokens: such boxes are counted, never written."""
    nan_w, inf_x = _obj(1, 0, 0, float("nan"), 5, ["a"]), _obj(2, float("inf"), 0, 5, 5, ["a"])
    objects, image_data = vg(
        objects=[{"image_id": 1, "objects": [nan_w, inf_x, _obj(3, 0, 0, 5, 5, ["a"])]}]
    )
    out = tmp_path / "vg.json"
    summary = convert_vg(objects=objects, image_data=image_data, classes=3, out=out)
    assert summary.dropped["degenerate"] == 2 and summary.kept == 1
    assert [a["vg_object_id"] for a in json.loads(out.read_text())["annotations"]] == [3]
