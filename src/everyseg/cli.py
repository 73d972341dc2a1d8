"""`everyseg synth | train | evaluate | predict | segment | check-data | convert | export |
report | study | demo`."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from everyseg import __version__
from everyseg.commands import verbs
from everyseg.commands.examples import EXAMPLES
from everyseg.config import ConfigError, preset_names
from everyseg.data.synthetic import MIN_SIZE
from everyseg.data.synthetic_vocab import all_classes
from everyseg.engine.distributed import PeerFailed
from everyseg.engine.studies import STUDIES

# Upper bounds that no sensible run reaches, so a typo (an extra zero or three) fails at once
# instead of filling the disk or running for days.
MAX_IMAGES = 1_000_000
MAX_SIDE = 4096
MAX_STEPS = 10_000_000
MAX_SEED = 2**32 - 1
MAX_CLASSES = 1_000_000
MAX_BATCH = 1024


SET_OPTION: dict[str, Any] = dict(
    dest="overrides",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="change a config value (YAML syntax: train.lr=1e-3, data.mask_classes=[a,b]); repeat",
)
CHECKPOINT_OPTION: dict[str, Any] = dict(
    default="last",
    help="last (default), best, model, step_NNNNNNN or a .pt path",
)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (
        PeerFailed,
        ConfigError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
        OSError,
        FloatingPointError,
    ) as err:
        print(f"everyseg {args.command}: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="everyseg",
        description="Partially supervised instance segmentation: boxes for all, masks for some.",
        epilog=EXAMPLES["everyseg"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"everyseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")

    p = _verb(sub, "synth", "write seeded synthetic COCO data (shapes)")
    p.add_argument("out", type=Path, help="the folder to write (annotations/, train/, val/)")
    images = int_in(1, MAX_IMAGES)
    p.add_argument(
        "--train",
        type=images,
        help="training images (default 2000, --preset hard 1000; with --vocab: VG images)",
    )
    p.add_argument("--val", type=images, help="validation images (default 200)")
    p.add_argument(
        "--vocab",
        type=int_in(1, len(all_classes())),
        help="large-vocabulary mode: this many shape classes, written as a Visual Genome "
        "box-only source, a COCO source with masks for a few classes and a val set with masks "
        "for all; image counts default to what every class needs",
    )
    p.add_argument(
        "--preset",
        choices=("easy", "hard"),
        default="easy",
        help="easy (default): solid shapes, the -tiny presets' data; hard: outlines with "
        "see-through cut-outs that are in the mask for some classes and not for others, so the "
        "mask depends on the class (writes OUT/seen_classes.txt, the fixed seen split)",
    )
    p.add_argument("--coco", type=images, help="with --vocab: COCO-source images")
    p.add_argument(
        "--mask-classes",
        type=int_in(1, len(all_classes())),
        help="with --vocab: classes in the COCO source (default vocab/40)",
    )
    p.add_argument(
        "--size", type=int_in(MIN_SIZE, MAX_SIDE), default=128, help="image side (default 128)"
    )
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="random seed (default 0)")
    p.set_defaults(func=verbs.synth)

    p = _verb(sub, "train", "train a model; evaluates on val and draws overlays at the end")
    p.add_argument("config", help=f"a YAML file or a preset: {', '.join(preset_names())}")
    p.add_argument("--set", **SET_OPTION)
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoints/last.pt")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation and overlays")
    p.set_defaults(func=verbs.train)

    p = _verb(sub, "evaluate", "COCO box and mask AP: all, seen and unseen classes")
    p.add_argument("run", type=Path, help="a run directory (everyseg train --out)")
    p.add_argument("--data", type=Path, help="COCO JSON to evaluate on (default: data.val_json)")
    p.add_argument("--images", type=Path, help="images of --data")
    p.add_argument("--checkpoint", **CHECKPOINT_OPTION)
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        help="autocast of the model (default: the run's train.amp where the device runs it)",
    )
    p.set_defaults(func=verbs.evaluate)

    p = _verb(sub, "predict", "COCO results JSON (RLE) and overlays for images")
    p.add_argument("run", type=Path, help="a run directory (everyseg train --out)")
    p.add_argument(
        "images",
        nargs="+",
        help="image files, folders (their image files at any depth) or quoted glob patterns "
        "('imgs/**/*.jpg')",
    )
    p.add_argument("--out", type=Path, required=True, help="writes results.json and overlays/")
    p.add_argument(
        "--batch-size",
        type=int_in(1, MAX_BATCH),
        default=1,
        help="images per forward pass (default 1); a bad file in a batch fails alone",
    )
    p.add_argument(
        "--data",
        type=Path,
        metavar="JSON",
        help="a COCO data set: results take the image ids of its images (matched by "
        "file_name); files it does not list get overlays only",
    )
    p.add_argument(
        "--score-thresh",
        type=float_in(0.0, 1.0),
        default=0.5,
        help="keep detections scoring at least this (default 0.5)",
    )
    p.add_argument(
        "--cross-class-nms",
        type=float_in(0.0, 1.0),
        metavar="IOU",
        help="one label per object: also drop a detection overlapping a better-scoring one of "
        "any class by more than IOU (default: off, per-class NMS only, as COCO AP wants)",
    )
    p.add_argument("--checkpoint", **CHECKPOINT_OPTION)
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        help="autocast of the model (default: the run's train.amp where the device runs it)",
    )
    p.set_defaults(func=verbs.predict)

    p = _verb(sub, "segment", "one mask per given box, any class: PNGs, overlay, RLE")
    p.add_argument("run", type=Path, help="a run directory (everyseg train --out)")
    p.add_argument("image", type=Path, help="an image file")
    p.add_argument(
        "--box",
        nargs=4,
        type=float_in(-math.inf, math.inf),
        action="append",
        required=True,
        metavar=("X0", "Y0", "X1", "Y1"),
        help="a box in image pixels, corners; repeat for more boxes",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="writes mask_N.png, overlay.png, masks.json"
    )
    p.add_argument("--checkpoint", **CHECKPOINT_OPTION)
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        help="autocast of the model (default: the run's train.amp where the device runs it)",
    )
    p.set_defaults(func=verbs.segment)

    p = _verb(sub, "check-data", "scan a dataset; exit 1 if anything is invalid")
    p.add_argument("source", help="a COCO JSON file, or a config whose train and val sets to check")
    p.add_argument("--images", help="the image folder of a JSON file")
    p.add_argument("--set", **SET_OPTION)
    p.add_argument("--decode", action="store_true", help="decode every image, not just headers")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=verbs.check_data)

    p = _verb(sub, "convert", "another dataset's own files -> COCO JSON")
    formats = p.add_subparsers(
        dest="format", required=True, metavar="FORMAT", help="the source format"
    )
    p = _verb(
        formats, "vg", "Visual Genome objects.json + image_data.json -> COCO JSON, boxes only"
    )
    p.add_argument("--objects", type=Path, required=True, help="VG's objects.json")
    p.add_argument("--image-data", type=Path, required=True, help="VG's image_data.json")
    p.add_argument(
        "--classes", type=int_in(1, MAX_CLASSES), required=True, help="keep the K most frequent"
    )
    p.add_argument("--out", type=Path, required=True, help="the COCO JSON to write")
    p.add_argument("--aliases", type=Path, help="YAML / JSON mapping alias -> class name")
    p.set_defaults(func=verbs.convert_vg)

    p = _verb(
        sub,
        "export",
        "the trained detector with masks as one ONNX or TorchScript file: one (3, H, W) image "
        "in; boxes, labels, scores and full-image mask probabilities (N, 1, H, W) out",
    )
    p.add_argument("run", type=Path, help="a run directory (everyseg train --out)")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=["onnx", "torchscript"],
        required=True,
        help="onnx (pip install everyseg[export]; run with onnxruntime) or torchscript",
    )
    p.add_argument("--out", type=Path, required=True, help="the file to write")
    p.add_argument("--checkpoint", **CHECKPOINT_OPTION)
    p.set_defaults(func=verbs.export)

    p = _verb(
        sub,
        "report",
        "one self-contained HTML page on runs: loss and lr curves, per-class mask AP (seen / "
        "unseen), precision-recall curves, ground truth beside predictions, a metrics table",
    )
    p.add_argument("runs", nargs="+", type=Path, help="run directories (everyseg train --out)")
    p.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    p.add_argument(
        "--gallery",
        type=int_in(0, 100),
        default=4,
        help="val images per run predicted for the gallery (default 4; 0: no gallery)",
    )
    p.add_argument("--checkpoint", **CHECKPOINT_OPTION)
    p.set_defaults(func=verbs.report)

    p = _verb(
        sub,
        "study",
        "train a study's grid of runs over seeds (a table of the papers) and write "
        "DIR/study.md: mean +- std per row, paired differences to the reference row with t "
        "intervals; rerun to continue",
    )
    p.add_argument("name", choices=list(STUDIES), help=f"the study: {', '.join(STUDIES)}")
    p.add_argument("--out", type=Path, required=True, help="the study folder (runs, study.md)")
    p.add_argument(
        "--seeds", type=int_in(1, 100), default=3, help="train.seed 0..N-1 per row (default 3)"
    )
    p.add_argument(
        "--steps", type=int_in(1, MAX_STEPS), help="train.steps of every run (default: presets')"
    )
    p.add_argument(
        "--jobs",
        type=int_in(1, 64),
        default=1,
        help="trainings at a time, the CPU threads split between them (default 1)",
    )
    p.add_argument(
        "--data",
        type=Path,
        help="a folder `everyseg synth` wrote (annotations/train.json, ...); default: generate "
        "into DIR/data",
    )
    p.add_argument(
        "--synth",
        choices=["easy", "hard"],
        default="easy",
        help="without --data: the synthetic data to generate (everyseg synth --preset)",
    )
    p.add_argument(
        "--set",
        **{**SET_OPTION, "help": "change a config value of every run, before each row's own"},
    )
    p.set_defaults(func=verbs.study)

    p = _verb(sub, "demo", "synth + train baseline-tiny + evaluate + overlays")
    p.add_argument("--out", type=Path, default=Path("everyseg-demo"), help="default everyseg-demo")
    p.add_argument(
        "--steps", type=int_in(1, MAX_STEPS), default=1000, help="training steps (default 1000)"
    )
    p.add_argument("--train", type=images, default=2000, help="synthetic training images")
    p.add_argument("--val", type=images, default=100, help="synthetic validation images")
    p.set_defaults(func=verbs.demo)
    return parser


def _verb(sub, name: str, summary: str) -> argparse.ArgumentParser:
    """A verb's parser: `summary` in the verb list, EXAMPLES[name] under its --help."""
    return sub.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=EXAMPLES[name],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def int_in(low: int, high: int):
    """An argparse `type`: an integer in [low, high]; argparse names the option on error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {text}")
        return value

    return parse


def float_in(low: float, high: float):
    """An argparse `type`: a finite number in [low, high] (never NaN or infinite)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {text}")
        return value

    return parse


if __name__ == "__main__":
    sys.exit(main())
