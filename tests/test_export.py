"""`everyseg export`: the ONNX file (run in onnxruntime) and the TorchScript file give
PyTorch's boxes, labels, scores and full-image masks on images of other sizes than the one
traced, with any number of detections, none included.

Tolerances (float32; the differences seen are ~1e-5 px and ~1e-6): ONNX boxes 1e-3 px,
scores 1e-5, mask probabilities 1e-4; TorchScript (the same kernels) 1e-5 everywhere;
labels equal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from everyseg.cli import main
from everyseg.engine.export import (
    CLASS_NAMES_FILE,
    CLASS_NAMES_KEY,
    example_image,
    export_model,
)
from everyseg.engine.load import load_run

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
# torch 2.14 deprecates TorchScript, which is what a "torchscript" export is for
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

NAMES = ("boxes", "labels", "scores", "masks")
ONNX_ATOL = {"boxes": 1e-3, "labels": 0, "scores": 1e-5, "masks": 1e-4}
TORCHSCRIPT_ATOL = {"boxes": 1e-5, "labels": 0, "scores": 1e-5, "masks": 1e-5}


@pytest.fixture(scope="module")
def images(synth_paths) -> list[torch.Tensor]:
    """(3, H, W) images of four sizes: the 64 px val images, the first resized to 48 x 80 and
    to 100 x 70, noise 90 x 60."""
    paths = sorted(Path(synth_paths["val_images"]).iterdir())
    pictures = [Image.open(path).convert("RGB") for path in paths]
    resized = [pictures[0].resize((80, 48)), pictures[0].resize((70, 100))]
    as_tensor = [
        torch.from_numpy(np.asarray(p, dtype=np.float32) / 255).permute(2, 0, 1)
        for p in [*pictures, *resized]
    ]
    noise = torch.rand(3, 90, 60, generator=torch.Generator().manual_seed(1))
    return [*as_tensor, noise]


def onnx_runner(path: Path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda image: [torch.from_numpy(o) for o in session.run(None, {"image": image.numpy()})]


def torchscript_runner(path: Path):
    module = torch.jit.load(str(path))
    return lambda image: list(module(image))


def onnx_class_names(path: Path) -> list[str]:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props[CLASS_NAMES_KEY])


def torchscript_class_names(path: Path) -> list[str]:
    files = {CLASS_NAMES_FILE: ""}
    torch.jit.load(str(path), _extra_files=files)
    return json.loads(files[CLASS_NAMES_FILE])


CLASS_NAMES_READERS = {"onnx": onnx_class_names, "torchscript": torchscript_class_names}
RUNNERS = {"onnx": (onnx_runner, ONNX_ATOL), "torchscript": (torchscript_runner, TORCHSCRIPT_ATOL)}


def assert_same_detections(model, run_file, images, atol) -> list[int]:
    """The exported file's outputs equal `model`'s on every image; the detection counts."""
    counts = []
    for image in images:
        with torch.no_grad():
            expected = model([image])[0]
        got = dict(zip(NAMES, run_file(image)))
        height, width = image.shape[-2:]
        assert got["masks"].shape == (len(expected["boxes"]), 1, height, width)
        assert got["labels"].dtype == torch.int64
        for name in NAMES:
            torch.testing.assert_close(got[name], expected[name], atol=atol[name], rtol=0)
        counts.append(len(expected["boxes"]))
    return counts


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_run_gives_pytorchs_detections(trained_run, images, tmp_path, fmt, capsys):
    out = tmp_path / "sub" / f"model.{fmt}"
    assert main(["export", str(trained_run.root), "--format", fmt, "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    model = load_run(trained_run.root, device="cpu").model
    make_runner, atol = RUNNERS[fmt]
    counts = assert_same_detections(model, make_runner(out), images, atol)
    assert min(counts) > 0
    assert CLASS_NAMES_READERS[fmt](out) == load_run(trained_run.root).record.class_names


def threshold_with_varied_counts(scores: list[torch.Tensor]) -> float:
    """A threshold leaving the first image no detection and the others at least two different
    nonzero counts, midway in a gap between scores (float rounding in the file cannot move a
    score across it)."""
    ordered = torch.cat(scores).unique()  # ascending
    for low, high in zip(ordered[:-1].tolist(), ordered[1:].tolist()):
        threshold = (low + high) / 2
        counts = [int((s > threshold).sum()) for s in scores]
        if high - low > 1e-4 and counts[0] == 0 and len(set(counts[1:]) - {0}) >= 2:
            return threshold
    raise AssertionError(f"no such threshold for these scores: {scores}")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_detection_count_follows_the_image(trained_run, images, tmp_path, fmt):
    """A score threshold just above the traced image's best score: the trace itself sees no
    detection, yet the file gives the other images theirs, each its own number."""
    model = load_run(trained_run.root, device="cpu").model
    example = example_image((64, 64))
    with torch.no_grad():
        scores = [model([image])[0]["scores"] for image in [example, *images]]
    model.roi_heads.score_thresh = threshold_with_varied_counts(scores)  # kept: scores above
    out = export_model(
        model, fmt=fmt, out=tmp_path / f"m.{fmt}", image_size=(64, 64), class_names=["a"] * 14
    )
    make_runner, atol = RUNNERS[fmt]
    counts = assert_same_detections(model, make_runner(out), [example, *images], atol)
    assert counts[0] == 0 and len(set(counts[1:]) - {0}) >= 2, counts


def test_fcos_run_exports_to_onnx(fcos_run, images, tmp_path):
    out = tmp_path / "fcos.onnx"
    assert main(["export", str(fcos_run.root), "--format", "onnx", "--out", str(out)]) == 0
    model = load_run(fcos_run.root, device="cpu").model
    assert_same_detections(model, onnx_runner(out), images, ONNX_ATOL)


def test_export_refuses_bad_input_plainly(trained_run, tmp_path, capsys):
    run = str(trained_run.root)
    assert main(["export", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "m")]) == 2
    assert f"everyseg export: error: no checkpoint at {tmp_path}" in capsys.readouterr().err

    assert main(["export", run, "--format", "onnx", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder" in capsys.readouterr().err

    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["export", run, "--format", "onnx", "--out", str(a_file / "m.onnx")]) == 2
    assert f"{a_file} is a file, not a folder" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_:
        main(["export", run, "--format", "tflite", "--out", str(tmp_path / "m")])
    assert exit_.value.code == 2
    assert "argument --format: invalid choice: 'tflite'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_onnx_export_without_onnx_says_what_to_install(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    out = tmp_path / "m.onnx"
    assert main(["export", str(trained_run.root), "--format", "onnx", "--out", str(out)]) == 2
    assert 'needs the onnx package: pip install "everyseg[export]"' in capsys.readouterr().err
    assert not out.exists()
