"""`everyseg synth | train | evaluate | predict | segment | check-data | convert | export |
report | study | demo`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from everyseg import __version__
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
EXAMPLES = {
    "everyseg": """examples:
  everyseg demo                                    # the whole job on synthetic shapes, CPU
  everyseg synth everyseg-synth                    # data for the -tiny presets
  everyseg train baseline-tiny --out runs/a        # train, evaluate, draw overlays
  everyseg evaluate runs/a                         # COCO AP: all / seen / unseen classes
  everyseg predict runs/a img1.png img2.png --out pred
  everyseg VERB --help                             # each verb's options and examples""",
    "synth": """examples:
  everyseg synth everyseg-synth                    # what the -tiny presets read
  everyseg synth data --train 200 --val 50 --size 96 --seed 1
  everyseg synth everyseg-vocab --vocab 1000       # maskx-vg-tiny's 1,000-class stand-in
  everyseg synth everyseg-hard --preset hard       # masks that depend on the class (seen split:
                                                   #   everyseg-hard/seen_classes.txt)""",
    "train": """examples:
  everyseg train baseline-tiny --out runs/a
  everyseg train maskx --out runs/b --set data.train_json=coco/train.json \\
      --set data.train_images=coco/train2017 --set train.lr=1e-3
  everyseg train my.yaml --out runs/a --resume      # continue a stopped run
  torchrun --nproc_per_node=8 -m everyseg train maskrcnn --out runs/c""",
    "evaluate": """examples:
  everyseg evaluate runs/a                         # data.val_json -> runs/a/metrics.json
  everyseg evaluate runs/a --checkpoint best --precision fp32
  everyseg evaluate runs/a --data other.json --images other/  # -> metrics-other.json""",
    "predict": """examples:
  everyseg predict runs/a photo.jpg --out pred
  everyseg predict runs/a imgs/*.png --out pred --score-thresh 0.3 --checkpoint best
  everyseg predict runs/a photos/ 'more/**/*.jpg' --out pred --batch-size 8
  everyseg predict runs/a coco/val2017 --data coco/val.json --out pred  # COCO image ids
  everyseg predict runs/fcn photo.jpg --out pred  # an FCN run: labels/ (class ids), overlays/""",
    "segment": """examples:
  everyseg segment runs/a photo.jpg --box 10 20 60 90 --out seg
  everyseg segment runs/a photo.jpg --box 10 20 60 90 --box 0 0 32 32 --out seg""",
    "check-data": """examples:
  everyseg check-data baseline-tiny                # a config's train and val sets
  everyseg check-data coco/train.json --images coco/train2017 --decode
  everyseg check-data maskx --set data.train_json=t.json --set data.train_images=t/ --json""",
    "convert": """examples:
  everyseg convert vg --objects objects.json --image-data image_data.json \\
      --classes 3000 --out vg3000.json""",
    "vg": """examples:
  everyseg convert vg --objects objects.json --image-data image_data.json \\
      --classes 3000 --out vg3000.json --aliases aliases.yaml""",
    "export": """examples:
  everyseg export runs/a --format onnx --out a.onnx        # NMS and mask paste inside
  everyseg export runs/a --format torchscript --out a.pt --checkpoint best""",
    "report": """examples:
  everyseg report runs/a --out a.html              # curves, per-class AP, PR, gallery
  everyseg report runs/a runs/b runs/c --out compare.html --gallery 2""",
    "study": """examples:
  everyseg study maskx --out studies/maskx          # 3 seeds, each preset's schedule
  everyseg study deepmac --out studies/deepmac --seeds 2 --steps 500 --jobs 2
  everyseg study maskrcnn --out studies/mrcnn --data everyseg-synth --set train.device=cuda
  everyseg study maskx --out studies/maskx          # again: keeps finished runs, resumes""",
    "demo": """examples:
  everyseg demo                                    # everyseg-demo/: data and run
  everyseg demo --out /tmp/demo --steps 200 --train 100 --val 20""",
}


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
    p.set_defaults(func=_synth)

    p = _verb(sub, "train", "train a model; evaluates on val and draws overlays at the end")
    p.add_argument("config", help=f"a YAML file or a preset: {', '.join(preset_names())}")
    p.add_argument("--set", **SET_OPTION)
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoints/last.pt")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation and overlays")
    p.set_defaults(func=_train)

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
    p.set_defaults(func=_evaluate)

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
    p.set_defaults(func=_predict)

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
    p.set_defaults(func=_segment)

    p = _verb(sub, "check-data", "scan a dataset; exit 1 if anything is invalid")
    p.add_argument("source", help="a COCO JSON file, or a config whose train and val sets to check")
    p.add_argument("--images", help="the image folder of a JSON file")
    p.add_argument("--set", **SET_OPTION)
    p.add_argument("--decode", action="store_true", help="decode every image, not just headers")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_check_data)

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
    p.set_defaults(func=_convert_vg)

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
    p.set_defaults(func=_export)

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
    p.set_defaults(func=_report)

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
    p.set_defaults(func=_study)

    p = _verb(sub, "demo", "synth + train baseline-tiny + evaluate + overlays")
    p.add_argument("--out", type=Path, default=Path("everyseg-demo"), help="default everyseg-demo")
    p.add_argument(
        "--steps", type=int_in(1, MAX_STEPS), default=1000, help="training steps (default 1000)"
    )
    p.add_argument("--train", type=images, default=2000, help="synthetic training images")
    p.add_argument("--val", type=images, default=100, help="synthetic validation images")
    p.set_defaults(func=_demo)
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


def _synth(args) -> None:
    from everyseg.data.synthetic import generate
    from everyseg.data.synthetic_hard import generate_hard

    if args.vocab is not None:
        if args.preset != "easy":
            raise ValueError("--vocab has no --preset: leave --preset out")
        return _synth_vocab(args)
    if args.coco is not None or args.mask_classes is not None:
        raise ValueError("--coco and --mask-classes go with --vocab")
    write = generate_hard if args.preset == "hard" else generate
    paths = write(
        args.out,
        # the easy preset's detector learns its classes from 2,000 images, not 1,000
        # (docs/results.md, sixth round); the hard benchmark's figures are of 1,000 or fewer
        num_train=args.train or (1000 if args.preset == "hard" else 2000),
        num_val=args.val or 200,
        size=args.size,
        seed=args.seed,
    )
    print(json.dumps(paths, indent=2))


def _synth_vocab(args) -> None:
    from everyseg.data.synthetic_vg import generate_vocab, usage

    paths = generate_vocab(
        args.out,
        vocab=args.vocab,
        num_vg=args.train,
        num_coco=args.coco,
        num_val=args.val,
        num_mask=args.mask_classes,
        size=args.size,
        seed=args.seed,
    )
    print(usage(paths, vocab=args.vocab))


def _train(args) -> None:
    from everyseg.train_run import train

    train(
        args.config,
        out=args.out,
        overrides=args.overrides,
        resume=args.resume,
        evaluate=not args.no_eval,
    )


def _evaluate(args) -> None:
    from everyseg.engine.distributed import process_group
    from everyseg.engine.evaluate_run import evaluate_run
    from everyseg.engine.load import resolve_device

    if (args.data is None) != (args.images is None):
        raise ValueError("--data and --images go together")
    with process_group(resolve_device("auto")):  # under torchrun the ranks share the images
        evaluate_run(
            args.run,
            data_json=args.data,
            images=args.images,
            checkpoint=args.checkpoint,
            precision=args.precision,
        )


def _predict(args) -> int:
    from everyseg.predict_files import predict_files
    from everyseg.predict_inputs import data_set_ids, image_files
    from everyseg.predictor import Predictor
    from everyseg.semantic_predict import is_semantic_run, predict_semantic_files

    paths = image_files(args.images)  # before the model loads: a wrong argument fails fast
    if is_semantic_run(args.run, checkpoint=args.checkpoint):  # model.kind=fcn
        failures = predict_semantic_files(
            args.run,
            paths,
            overlays=args.out / "overlays",
            labels=args.out / "labels",
            checkpoint=args.checkpoint,
        )
        print(f"{len(paths) - len(failures)} of {len(paths)} images -> {args.out}/labels, overlays")
        return 1 if failures else 0
    image_ids = None if args.data is None else data_set_ids(args.data, paths)
    predictor = Predictor.from_run(
        args.run,
        checkpoint=args.checkpoint,
        score_thresh=args.score_thresh,
        cross_class_nms=args.cross_class_nms,
        precision=args.precision,
    )
    results = args.out / "results.json"
    failures = predict_files(
        predictor,
        paths,
        overlays=args.out / "overlays",
        results=results,
        batch_size=args.batch_size,
        image_ids=image_ids,
    )
    print(
        f"{len(paths) - len(failures)} of {len(paths)} images -> {results}, {args.out / 'overlays'}"
    )
    if image_ids is not None:
        unknown = [path for path, image_id in zip(paths, image_ids) if image_id is None]
        _note_files_not_in_data(args.data, unknown, of=len(paths))
    return 1 if failures else 0


def _note_files_not_in_data(data: Path, unknown: list[Path], *, of: int, shown: int = 5) -> None:
    if unknown:
        names = ", ".join(map(str, unknown[:shown])) + (", ..." if len(unknown) > shown else "")
        print(
            f"note: {len(unknown)} of {of} files are not images of {data} (no file_name "
            f"matches): {names}; results.json has no entries for them (overlays only)",
            file=sys.stderr,
        )


def _segment(args) -> None:
    from PIL import Image

    from everyseg.engine.files import write_json
    from everyseg.predictor import Predictor, draw_overlay

    for x0, y0, x1, y1 in args.box:  # before loading anything
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"--box {x0:g} {y0:g} {x1:g} {y1:g}: needs X1 > X0 and Y1 > Y0")
    predictor = Predictor.from_run(args.run, checkpoint=args.checkpoint, precision=args.precision)
    instances = predictor.segment(args.image, args.box)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, mask in enumerate(instances.masks):
        Image.fromarray(mask.astype("uint8") * 255).save(args.out / f"mask_{i}.png")
    draw_overlay(args.image, instances).save(args.out / "overlay.png")
    write_json(predictor.coco_results(instances, image_id=1), args.out / "masks.json", indent=None)
    print(f"{len(instances)} masks -> {args.out}: mask_*.png, overlay.png, masks.json (RLE)")


def _check_data(args) -> int:
    from everyseg.commands.check_data import run_check_data

    return run_check_data(
        source=args.source,
        images=args.images,
        overrides=args.overrides,
        decode=args.decode,
        as_json=args.json,
    )


def _convert_vg(args) -> None:
    from everyseg.data.convert_vg import convert_vg

    summary = convert_vg(
        objects=args.objects,
        image_data=args.image_data,
        classes=args.classes,
        out=args.out,
        aliases=args.aliases,
    )
    print(summary.format(args.objects, args.out))


def _export(args) -> None:
    from everyseg.engine.export import export_run

    out = export_run(args.run, fmt=args.fmt, out=args.out, checkpoint=args.checkpoint)
    print(f"{args.run} ({args.checkpoint}) -> {out} ({args.fmt})")


def _report(args) -> None:
    from everyseg.report import write_report

    out = write_report(
        args.runs, out=args.out, gallery_images=args.gallery, checkpoint=args.checkpoint
    )
    print(f"{len(args.runs)} run(s) -> {out}")


def _study(args) -> int:
    from everyseg.engine.study import run_study

    if args.data is not None and args.synth != "easy":
        raise ValueError("--synth chooses data to generate; --data gives the data")
    outcomes = run_study(
        args.name,
        out=args.out,
        seeds=args.seeds,
        steps=args.steps,
        jobs=args.jobs,
        data=args.data,
        synth=args.synth,
        overrides=args.overrides,
    )
    failed = [name for name, outcome in outcomes.items() if outcome.status == "failed"]
    if failed:
        print(f"{len(failed)} run(s) failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _demo(args) -> None:
    from everyseg.demo import run_demo

    run_demo(args.out, steps=args.steps, num_train=args.train, num_val=args.val)


if __name__ == "__main__":
    sys.exit(main())
