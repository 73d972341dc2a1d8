"""resolve_mask_classes: every spec form, ordering, reproducibility and error messages."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from everyseg.config import ConfigError
from everyseg.data.splits import VOC_CLASSES, resolve_mask_classes

NAMES = ["person", "bicycle", "giraffe", "cat", "toaster", "dog", "kite"]


def test_voc_classes_are_the_twenty_coco_spellings():
    assert len(VOC_CLASSES) == len(set(VOC_CLASSES)) == 20
    assert {"airplane", "dining table", "motorcycle", "potted plant", "couch", "tv"} <= set(
        VOC_CLASSES
    )


@pytest.mark.parametrize("spec", [None, "all", "ALL", " all "])
def test_all(spec):
    assert resolve_mask_classes(spec, NAMES) == NAMES


def test_none_means_box_only_training():
    assert resolve_mask_classes("none", NAMES) == []


def test_list_is_returned_in_class_order_without_duplicates():
    assert resolve_mask_classes(["dog", "person", "dog"], NAMES) == ["person", "dog"]
    assert resolve_mask_classes(("kite",), NAMES) == ["kite"]
    assert resolve_mask_classes([], NAMES) == []


def test_comma_string_and_single_name():
    assert resolve_mask_classes("dog, person ,cat", NAMES) == ["person", "cat", "dog"]
    assert resolve_mask_classes("toaster", NAMES) == ["toaster"]


def test_text_file_ignores_blank_lines_and_comments(tmp_path):
    path = tmp_path / "seen.txt"
    path.write_text("# classes with masks\n\ndog\n  cat  # indoor pet\n\n# giraffe\n")
    assert resolve_mask_classes(str(path), NAMES) == ["cat", "dog"]
    assert resolve_mask_classes(path, NAMES) == ["cat", "dog"]


def test_text_file_with_unknown_name_is_an_error(tmp_path):
    path = tmp_path / "seen.txt"
    path.write_text("dog\nunicorn\n")
    with pytest.raises(ValueError, match="unicorn"):
        resolve_mask_classes(str(path), NAMES)


def test_missing_txt_file_is_not_read_as_a_class_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        resolve_mask_classes(str(tmp_path / "nope.txt"), NAMES)


def test_voc_and_nonvoc_partition_the_classes():
    voc = resolve_mask_classes("voc", NAMES)
    nonvoc = resolve_mask_classes("nonvoc", NAMES)
    assert voc == ["person", "bicycle", "cat", "dog"]
    assert nonvoc == ["giraffe", "toaster", "kite"]


@pytest.mark.parametrize("spec", ["voc", "nonvoc"])
def test_voc_without_any_voc_class_is_an_error(spec):
    with pytest.raises(ValueError, match="VOC"):
        resolve_mask_classes(spec, ["circle", "square"])


def test_random_is_reproducible_sized_and_ordered():
    first = resolve_mask_classes("random:3:7", NAMES)
    assert first == resolve_mask_classes("random:3:7", NAMES)
    assert len(first) == 3
    assert first == [n for n in NAMES if n in first]
    draws = {tuple(resolve_mask_classes(f"random:3:{seed}", NAMES)) for seed in range(10)}
    assert len(draws) > 1, "the seed must change the draw"
    assert resolve_mask_classes(f"random:{len(NAMES)}:0", NAMES) == NAMES


def test_random_does_not_depend_on_python_hash_seed():
    code = (
        "from everyseg.data.splits import resolve_mask_classes as r;"
        f"print(r('random:3:11', {NAMES!r}))"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": src}
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(run.stdout)
    assert outputs == {f"{resolve_mask_classes('random:3:11', NAMES)}\n"}


@pytest.mark.parametrize("spec", ["random:3", "random:x:1", "random:3:1:2", "random::1"])
def test_random_bad_syntax(spec):
    with pytest.raises(ValueError, match="random:K:SEED"):
        resolve_mask_classes(spec, NAMES)


@pytest.mark.parametrize("k", [0, len(NAMES) + 1, -1])
def test_random_k_out_of_range(k):
    with pytest.raises(ValueError, match="K must be in 1..7"):
        resolve_mask_classes(f"random:{k}:0", NAMES)


def test_unknown_names_are_named_with_suggestion_and_valid_list():
    with pytest.raises(ConfigError) as err:
        resolve_mask_classes(["dgo", "unicorn", "cat"], NAMES)
    message = str(err.value)
    assert message.startswith("data.mask_classes: unknown class name(s)")
    assert "'dgo'" in message and "did you mean 'dog'" in message
    assert "'unicorn'" in message
    assert "valid names: person, bicycle" in message


def test_empty_string_is_an_error():
    with pytest.raises(ValueError, match="none"):
        resolve_mask_classes(" , ", NAMES)
