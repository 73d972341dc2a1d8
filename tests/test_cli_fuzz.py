"""Every number given on the command line is checked before use; random argv never crashes.

`everyseg.cli.main(argv)` either returns an exit code or raises SystemExit (argparse), never
another exception. Verbs that would run for minutes on valid input (train with real data,
demo, synth of many images) are kept fast by construction: no data in the working directory,
at least one invalid number for demo, only small image counts for synth.
"""

from __future__ import annotations

import contextlib
import json
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from everyseg.cli import main


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["synth", "out", "--train", "0"], "--train"),
        (["synth", "out", "--train", "-5"], "--train"),
        (["synth", "out", "--train", "nan"], "--train"),
        (["synth", "out", "--val", "2.5"], "--val"),
        (["synth", "out", "--val", "10000000"], "--val"),
        (["synth", "out", "--size", "16"], "--size"),  # too small for the shapes
        (["synth", "out", "--size", "100000"], "--size"),
        (["synth", "out", "--seed", "-1"], "--seed"),
        (["synth", "out", "--seed", ""], "--seed"),
        (["demo", "--steps", "0"], "--steps"),
        (["demo", "--steps", "inf"], "--steps"),
        (["demo", "--train", "-1"], "--train"),
        (["demo", "--val", "1e9"], "--val"),
        (["predict", "run", "a.png", "--out", "o", "--score-thresh", "nan"], "--score-thresh"),
        (["predict", "run", "a.png", "--out", "o", "--score-thresh", "inf"], "--score-thresh"),
        (["predict", "run", "a.png", "--out", "o", "--score-thresh", "-0.1"], "--score-thresh"),
        (["predict", "run", "a.png", "--out", "o", "--score-thresh", "1.5"], "--score-thresh"),
        (["predict", "run", "a.png", "--out", "o", "--cross-class-nms", "2"], "--cross-class-nms"),
        (["segment", "run", "a.png", "--out", "o", "--box", "nan", "0", "9", "9"], "--box"),
        (["segment", "run", "a.png", "--out", "o", "--box", "0", "0", "-inf", "9"], "--box"),
        (["segment", "run", "a.png", "--out", "o", "--box", "0", "0", "x", "9"], "--box"),
    ],
)
def test_bad_numbers_are_refused_naming_the_option(argv, option, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"everyseg {argv[0]}: error: argument {option}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_an_empty_box_is_refused_before_loading_the_run(tmp_path, capsys):
    argv = ["segment", str(tmp_path / "no-run"), "a.png", "--out", str(tmp_path / "o")]
    assert main([*argv, "--box", "5", "5", "5", "9"]) == 2
    err = capsys.readouterr().err
    assert "everyseg segment: error: --box 5 5 5 9: needs X1 > X0 and Y1 > Y0" in err


# --- fuzz ---------------------------------------------------------------------------------

NUMBERS = ["nan", "NaN", "inf", "-inf", "-1", "0", "0.0", "1e308", "1" * 40, "-0", "", "1e-320"]
SAFE_TEXT = st.text(  # no path separators: outputs stay in the working directory
    alphabet=st.characters(blacklist_characters="/\\", blacklist_categories=("Cs",)),
    max_size=6,
).filter(lambda s: s not in (".", ".."))
NO_DIGITS = SAFE_TEXT.filter(lambda s: not any(c.isdigit() for c in s))


def number(*valid: str) -> st.SearchStrategy[str]:
    """A valid value half of the time, else NaN, infinities, huge, negative, empty or text."""
    return st.one_of(
        st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(NUMBERS), NO_DIGITS
    )


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, str]:
    """Tiny things on disk to point verbs at: none of them a usable run or dataset."""
    root = tmp_path_factory.mktemp("fuzz")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "tiny.png")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "garbage.json").write_text('{"images": [1], "annotations": {}, "categories": 3}')
    (root / "empty-run").mkdir()
    (root / "bad-run/checkpoints").mkdir(parents=True)
    (root / "bad-run/checkpoints/last.pt").write_text("garbage\n")
    vg_object = {"object_id": 1, "x": 0, "y": 0, "w": 4, "h": 4, "names": ["a"], "synsets": []}
    (root / "vg-objects.json").write_text(json.dumps([{"image_id": 1, "objects": [vg_object]}]))
    (root / "vg-images.json").write_text('[{"image_id": 1, "width": 8, "height": 8, "url": null}]')
    names = ["tiny.png", "broken.png", "garbage.json", "empty-run", "bad-run", "missing.png"]
    names += ["vg-objects.json", "vg-images.json"]
    return {name: str(root / name) for name in names}


@st.composite
def command_lines(draw, fixtures: dict[str, str]) -> list[str]:
    """A verb with its required arguments and random options; the values are often wrong."""
    path = st.one_of(st.sampled_from(sorted(fixtures.values())), SAFE_TEXT)
    verb = draw(
        st.sampled_from(
            ["synth", "train", "evaluate", "predict", "segment", "check-data", "demo", "nonsense"]
            + ["convert"]
        )
    )
    argv = [verb]
    optional: dict[str, st.SearchStrategy[str]] = {}
    if verb == "synth":
        # every count given and small (digits only from `number`): no 1000-image default
        argv.append(draw(SAFE_TEXT))
        for name, valid in (("--train", "1"), ("--val", "2"), ("--size", "64"), ("--seed", "7")):
            argv += [name, draw(number(valid))]
    elif verb == "train":
        argv += [
            draw(st.sampled_from(["maskrcnn-tiny", "baseline-tiny"]) | path),
            "--out",
            draw(SAFE_TEXT),
        ]
        sets = ["train.lr=nan", "train.steps=-1", "data.val_json=/nonexistent", "x=1", "=", ""]
        optional = {"--set": st.sampled_from(sets) | SAFE_TEXT}
    elif verb == "evaluate":
        argv.append(draw(path))
        optional = {
            "--data": path,
            "--images": path,
            "--checkpoint": st.sampled_from(["last", "best", "x.pt"]) | path,
        }
    elif verb == "predict":
        argv += [
            draw(path),
            *draw(st.lists(path, min_size=1, max_size=3)),
            "--out",
            draw(SAFE_TEXT),
        ]
        optional = {"--score-thresh": number("0", "0.5", "1"), "--checkpoint": path}
    elif verb == "segment":
        argv += [draw(path), draw(path), "--out", draw(SAFE_TEXT)]
        argv += ["--box", *(draw(number("0", "1", "5", "9")) for _ in range(4))]
        optional = {"--box": number("2", "3"), "--checkpoint": path}
    elif verb == "check-data":
        argv.append(draw(st.sampled_from(["maskrcnn-tiny"]) | path))
        optional = {
            "--images": path,
            "--set": number("data.val_json=x.json"),
            "--json": st.just(None),
        }
    elif verb == "convert":
        argv += ["vg", "--objects", draw(path), "--image-data", draw(path)]
        argv += ["--classes", draw(number("3")), "--out", draw(SAFE_TEXT)]
        optional = {"--aliases": path}
    elif verb == "demo":
        # at least one invalid number, so the demo never starts
        argv += [
            draw(st.sampled_from(["--steps", "--train", "--val"])),
            draw(st.sampled_from(NUMBERS)),
        ]
        optional = {
            "--out": SAFE_TEXT,
            "--steps": number("1"),
            "--train": number("1"),
            "--val": number("1"),
        }
    for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=3)) if optional else []:
        value = draw(optional[name])
        argv += [name] if value is None else [name, value]
    if draw(st.integers(0, 3)) == 0:  # a stray token: unknown option, extra positional, text
        stray = st.sampled_from(["--nope", "-x", "--", "--help"]) | number("1")
        argv.insert(draw(st.integers(0, len(argv))), draw(stray))
    return argv


@settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_command_lines_exit_cleanly(fixtures, data):
    argv = data.draw(command_lines(fixtures), label="argv")
    # a fresh empty working directory each time: relative outputs land there, and presets
    # find no data there, so training fails fast
    with tempfile.TemporaryDirectory() as cwd, contextlib.chdir(cwd):
        with contextlib.suppress(SystemExit):
            code = main(argv)
            assert isinstance(code, int)
