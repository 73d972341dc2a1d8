"""Property: malformed COCO JSON never escapes as KeyError / TypeError / IndexError / a crash.

Generated datasets mix valid entries with garbage in every field. Loading either fails with a
DataError (whose message names the file) or gives a dataset whose every item loads, whose
summary prints, and whose ground truth COCO evaluation accepts; check-data reports instead of
raising.
"""

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from everyseg.commands.check_data import check_data
from everyseg.data.coco import CocoInstances, DataError
from everyseg.engine.evaluate import coco_metrics

W, H = 16, 12
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
)
garbage = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)


# what a broken field becomes: anything, or near misses that get past naive type checks
broken = st.one_of(
    garbage,
    st.integers(-(2**40), 2**40),
    st.floats(-1e15, 1e15),
    st.text(alphabet=[chr(c) for c in range(48, 112)], max_size=12),  # RLE-string digits
    st.lists(st.integers(0, H * W), max_size=6),
)
FILES = ["good.png", "good.png", "wide.png", "cut.png", "nope.png"]
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]


@st.composite
def rle(draw) -> dict:
    mask = np.random.default_rng(draw(st.integers(0, 9))).random((H, W)) < 0.3
    good = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
    # near misses too: pycocotools decodes runs that do not fill the image without a word
    return {"size": [H, W], "counts": draw(st.sampled_from([good, good, good[:-2]]) | broken)}


@st.composite
def annotation(draw, image_ids: list[int]) -> dict:
    x, y = draw(st.floats(-2, W)), draw(st.floats(-2, H))
    points = st.lists(st.floats(-3, W + 3), min_size=6, max_size=10)
    return {
        "id": draw(st.integers(1, 8)),
        "image_id": draw(st.sampled_from(image_ids)),
        "category_id": draw(st.sampled_from([1, 3])),
        "bbox": [x, y, draw(st.floats(1, W)), draw(st.floats(1, H))],
        "segmentation": draw(st.one_of(st.lists(points, max_size=2), rle())),
        "iscrowd": draw(st.sampled_from([0, 0, 0, 1])),
    }


def _containers(node):
    """Every non-empty dict and list inside `node`, itself included."""
    if isinstance(node, (dict, list)) and node:
        yield node
        for child in node.values() if isinstance(node, dict) else node:
            yield from _containers(child)


@st.composite
def coco(draw) -> dict:
    """A valid dataset with a few entries, each field or element of which may be broken."""
    n = draw(st.integers(1, 3))
    images = [
        {"id": i, "file_name": draw(st.sampled_from(FILES)), "width": W, "height": H}
        for i in range(1, n + 1)
    ]
    annotations = draw(st.lists(annotation(list(range(1, n + 1))), max_size=6))
    data = {"images": images, "annotations": annotations, "categories": [*map(dict, CATEGORIES)]}
    for _ in range(draw(st.integers(0, 4))):
        # annotations hold most of the structure: aim there two times in three
        aims = [*_containers(data), *list(_containers(data.get("annotations"))) * 2]
        target = draw(st.sampled_from(aims))
        key = draw(
            st.sampled_from(list(target) if isinstance(target, dict) else range(len(target)))
        )
        if draw(st.booleans()) and isinstance(target, dict):
            del target[key]
        else:
            target[key] = draw(broken)
    return draw(garbage) if draw(st.integers(0, 19)) == 7 else data


FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "good.png")
    Image.fromarray(np.zeros((H, W + 1, 3), dtype=np.uint8)).save(root / "wide.png")
    Image.fromarray(noise).save(root / "cut.png")
    (root / "cut.png").write_bytes((root / "cut.png").read_bytes()[:200])
    return root


def _write(root, data) -> str:
    path = root / "ann.json"
    path.write_text(json.dumps(data))
    return str(path)


@FUZZ
@given(data=coco())
def test_loader_raises_only_data_errors(root, data):
    json_path = _write(root, data)
    for policy in ("skip", "error"):
        try:
            dataset = CocoInstances(
                json_path=json_path,
                images_dir=root,
                train=True,
                hflip_prob=0.5,
                on_bad_sample=policy,
            )
        except DataError as err:
            assert json_path in str(err)
            continue
        assert dataset.summary()
        try:
            for i in range(len(dataset)):
                _, target = dataset[(i, i)]
                assert (
                    target["compact_masks"].to_dense() <= 1
                ).all()  # decoded from runs that fit the image
        except DataError as err:  # a file failing to decode (policy error, or all of them)
            assert json_path in str(err) and "cut.png" in str(err)
        gt = json.loads(json.dumps(dataset.ground_truth(), allow_nan=False))
        cat_ids = [c["id"] for c in gt["categories"]]
        coco_metrics(gt, [], seen_cat_ids=cat_ids[:1])


@FUZZ
@given(data=coco())
def test_check_data_reports_instead_of_raising(root, data):
    (report,) = check_data(source=_write(root, data), images=str(root))
    json.dumps(report, allow_nan=False)
    assert ("error" in report) or report["images"]["usable"] >= 1
