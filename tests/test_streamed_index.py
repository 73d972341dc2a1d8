"""The annotation file read one annotation at a time and kept as columns (data.json_stream,
data.columns): the same index as reading it whole, in a fraction of the memory."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest

from everyseg.data.compact_masks import to_coco
from everyseg.data.index import CocoIndex
from everyseg.data.json_stream import iter_member_array, read_json_object
from everyseg.data.segmentation import to_rle

from coco_json import SQUARE, H, W, ann


def _rle_ann(ann_id: int, image_id: int = 1, **fields) -> dict:
    counts = to_rle(SQUARE, height=H, width=W)["counts"].decode("ascii")
    return ann(ann_id, image_id, segmentation={"size": [H, W], "counts": counts}, **fields)


def _annotations() -> list[dict]:
    """Images 1 and 2 interleaved, polygons, RLE, a crowd RLE and a box-only annotation."""
    return [
        ann(10, image_id=2),
        _rle_ann(11),
        ann(12, image_id=2, bbox=[2.25, 3.5, 9.75, 8.125]),
        _rle_ann(13, iscrowd=1),
        ann(14, category_id=2, segmentation=[[2, 3, 12, 3, 12, 11], [1, 1, 5, 1, 5, 4, 1, 4]]),
        ann(15, segmentation=None),
    ]


def _index(coco_files, path=None) -> CocoIndex:
    path = path or coco_files.write_dataset(annotations=_annotations())
    return CocoIndex(json_path=path, images_dir=coco_files.images)


def _contents(index: CocoIndex) -> dict:
    def segm(i):  # arrays compare element-wise: COCO's lists instead
        return None if i.segm is None else to_coco(i.segm, height=H, width=W)

    instances = {
        image_id: [(i.ann_id, i.label, i.box, segm(i)) for i in found]
        for image_id, found in index.instances.items()
    }
    return {"instances": instances, "ground_truth": index.ground_truth()}


def test_member_arrays_read_as_json_load_reads_them(tmp_path, monkeypatch):
    data = {
        "annotations": [{"id": 1, "x": [1.5, -2e-3, 12345678901234]}, [], "ü€😀", None, 7],
        "info": {"nested": {"a": [1, {"b": "}]"}]}},
        "images": [{"id": 1}, {"id": 2, "name": 'a "quoted", [name]'}],
        "empty": [],
        "categories": [],
    }
    path = tmp_path / "f.json"
    path.write_text(json.dumps(data, indent=3, ensure_ascii=False), encoding="utf-8")
    monkeypatch.setattr("everyseg.data.json_stream.CHUNK_CHARS", 3)  # values cut everywhere
    rest, length = read_json_object(path, streamed="annotations")
    assert length == 5
    assert rest == {k: v for k, v in data.items() if k != "annotations"}
    assert list(iter_member_array(path, "annotations")) == data["annotations"]


def test_the_index_never_parses_the_file_whole_yet_matches_reading_it_whole(
    coco_files, tmp_path, monkeypatch
):
    path = coco_files.write_dataset(annotations=_annotations())
    # UTF-16 text, which json.loads reads and the streaming reader does not: read whole
    whole = tmp_path / "utf16.json"
    whole.write_text(path.read_text(), encoding="utf-16")
    expected = _contents(_index(coco_files, whole))

    def whole_file(text, **kwargs):
        raise AssertionError(f"parsed whole: {text[:20]!r}...")

    monkeypatch.setattr(json, "loads", whole_file)
    index = _index(coco_files, path)
    assert index.num_json_annotations == 6
    assert _contents(index) == expected
    assert [a["id"] for a in expected["ground_truth"]["annotations"]] == [10, 11, 12, 13, 14, 15]


def test_instances_are_grouped_by_image_in_file_order_and_read_only(coco_files):
    index = _index(coco_files)
    assert list(index.instances) == [2, 1]  # first seen first, as a dict filled in file order
    assert [i.ann_id for i in index.instances[1]] == [11, 14, 15]  # 13 is crowd
    assert [i.ann_id for i in index.instances[2]] == [10, 12]
    assert index.instances[2][1].box == (2.25, 3.5, 12.0, 11.625)
    assert index.instances.get(3) is None and len(index.instances) == 2
    with pytest.raises(KeyError):
        index.instances[3]
    polygons = index.instances[1][1].segm
    assert isinstance(polygons, tuple) and [len(p) for p in polygons] == [6, 8]
    assert not polygons[0].flags.writeable  # shared by forked workers: nothing may write it
    assert index.instances[1][2].segm is None
    assert isinstance(index.instances[1][0].segm, bytes)
    assert index.instances.labels.tolist() == [1, 2, 1, 1, 1]  # image 1's rows, then 2's
    assert index.instances.has_mask.tolist() == [True, True, False, True, True]


def test_a_member_named_twice_counts_as_json_load_counts_it(coco_files):
    path = coco_files.write_dataset(annotations=[])
    text = path.read_text().replace('"annotations": []', '"annotations": [], "annotations": [1]')
    path.write_text(text.replace("[1]", json.dumps([ann(10)])))
    assert [i.ann_id for i in _index(coco_files, path).instances[1]] == [10]


def test_the_index_keeps_no_python_object_per_annotation(coco_files):
    annotations = [ann(i, image_id=1 + i % 2) for i in range(1, 301)]
    annotations += [_rle_ann(i, image_id=1 + i % 2) for i in range(301, 601)]
    path = coco_files.write_dataset(annotations=annotations)
    _index(coco_files, path)  # caches and imports filled once
    gc.collect()
    before = len(gc.get_objects())
    index = _index(coco_files, path)
    gc.collect()
    assert sum(len(found) for found in index.instances.values()) == 600
    # objects per image (metadata, paths) and per index, none per annotation
    assert len(gc.get_objects()) - before < 150
    assert np.array_equal(np.bincount(index.instances.labels), [0, 600])
