"""A trained run's detector, masks included, as one ONNX or TorchScript file.

The exported graph reads one (3, H, W) float32 RGB image in [0, 1] of any size and returns
the eval forward's detections in that image's pixels, NMS and the mask paste inside:
  boxes (N, 4) float32 xyxy, labels (N,) int64 in 1..K, scores (N,) float32,
  masks (N, 1, H, W) float32 foreground probabilities (threshold at 0.5 for binary masks).

Both formats are traced: torchvision's detection code takes its tracing branches (image
sizes, the mask paste loop) there, so the file keeps the image size and the number of
detections dynamic. ONNX uses torch's TorchScript-based exporter (`dynamo=False`): the
default torch.export-based one stops at torchvision's batched NMS, whose branch on the number
of boxes is data-dependent. tests/test_export.py runs both files against PyTorch.
"""

from __future__ import annotations

import io
import json
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor, nn

from everyseg.engine.files import atomic_write_bytes
from everyseg.engine.load import load_run
from everyseg.modeling.detector import Detector
from everyseg.modeling.fcn import FCN

ONNX_OPSET = 17
# the run's class names as a JSON list, label k's at k - 1: an ONNX metadata property and
# a TorchScript extra file (torch.jit.load(path, _extra_files={CLASS_NAMES_FILE: ""}))
CLASS_NAMES_KEY = "class_names"
CLASS_NAMES_FILE = "class_names.json"
OUTPUT_NAMES = ["boxes", "labels", "scores", "masks"]


class SingleImageDetector(nn.Module):
    """A detector in eval mode as a function of one image: (3, H, W) -> boxes, labels,
    scores, masks (the module docstring's shapes); tracing needs tensors in and out."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector
        # the ONNX exporter puts the module back in the mode it found it in, recursively
        self.eval()

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        found = self.detector([image])[0]
        return found["boxes"], found["labels"], found["scores"], found["masks"]


def _onnx_bytes(module: SingleImageDetector, example: Tensor, class_names: list[str]) -> bytes:
    import onnx  # the export extra's; export_run checked it is there

    detections = {0: "detections"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module,
            (example,),
            path,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["image"],
            output_names=OUTPUT_NAMES,
            dynamic_axes={
                "image": {1: "height", 2: "width"},
                "boxes": detections,
                "labels": detections,
                "scores": detections,
                "masks": {**detections, 2: "height", 3: "width"},
            },
        )
        model = onnx.load(path)
    onnx.helper.set_model_props(model, {CLASS_NAMES_KEY: json.dumps(class_names)})
    return model.SerializeToString()


def _torchscript_bytes(
    module: SingleImageDetector, example: Tensor, class_names: list[str]
) -> bytes:
    # the check re-runs the trace and compares outputs; tests/test_export.py does that on
    # other image sizes and detection counts, which is what matters
    traced = torch.jit.trace(module, (example,), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={CLASS_NAMES_FILE: json.dumps(class_names)})
    return buffer.getvalue()


# --format -> the exporter writing that file's bytes
EXPORTERS: dict[str, Callable[[SingleImageDetector, Tensor, list[str]], bytes]] = {
    "onnx": _onnx_bytes,
    "torchscript": _torchscript_bytes,
}


def example_image(size: tuple[int, int]) -> Tensor:
    """The (3, H, W) image exports trace: plain grey. What it detects, even nothing, does not
    shape the file (torchvision scripts the branches that depend on it)."""
    return torch.full((3, *size), 0.5)


def export_model(
    detector: Detector,
    *,
    fmt: str,
    out: Path,
    image_size: tuple[int, int],
    class_names: Sequence[str],
) -> Path:
    """Write `detector` (on the CPU) as a `fmt` file at `out`, atomically; `out`.

    It is traced on example_image(image_size); the file takes any size.
    `class_names` (K, label k's at k - 1) go into the file: see CLASS_NAMES_KEY.
    """
    if fmt not in EXPORTERS:
        raise ValueError(f"export format {fmt!r}: choose one of {', '.join(EXPORTERS)}")
    example = example_image(image_size)
    module = SingleImageDetector(detector)
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about every Python number it records; torchvision's tracing
        # branches keep those that matter dynamic (tests/test_export.py checks it)
        warnings.simplefilter("ignore")
        data = EXPORTERS[fmt](module, example, list(class_names))

    def write(f: BinaryIO) -> None:
        f.write(data)

    atomic_write_bytes(out, write)
    return out


def export_run(run_dir: Path, *, fmt: str, out: Path, checkpoint: str = "last") -> Path:
    """Export `run_dir`'s checkpoint `checkpoint` (see load_run) as a `fmt` file at `out`."""
    if fmt not in EXPORTERS:  # before loading anything
        raise ValueError(f"export format {fmt!r}: choose one of {', '.join(EXPORTERS)}")
    if fmt == "onnx":
        _require_onnx()
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give the path of the file to write")
    if out.parent.exists() and not out.parent.is_dir():
        raise NotADirectoryError(f"--out {out}: {out.parent} is a file, not a folder")
    loaded = load_run(run_dir, checkpoint=checkpoint, device="cpu")
    if isinstance(loaded.model, FCN):
        raise ValueError(
            f"{run_dir}: exporting a semantic segmentation run (model.kind=fcn) is not supported"
        )
    side = loaded.config.data.test_min_size
    return export_model(
        loaded.model,
        fmt=fmt,
        out=out,
        image_size=(side, side),
        class_names=loaded.record.class_names,
    )


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401  (torch's exporter needs it, and so does the metadata)
    except ImportError:
        raise ValueError(
            'export --format onnx needs the onnx package: pip install "everyseg[export]"'
        ) from None
