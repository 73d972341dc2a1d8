"""What each `everyseg` verb does once its arguments are parsed (everyseg.cli): each
function takes argparse's namespace and returns an exit status or None (0). Heavy imports
happen inside, so that `everyseg --help` stays fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def synth(args) -> None:
    from everyseg.data.synthetic import generate
    from everyseg.data.synthetic_hard import generate_hard

    if args.vocab is not None:
        if args.preset != "easy":
            raise ValueError("--vocab has no --preset: leave --preset out")
        return synth_vocab(args)
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


def synth_vocab(args) -> None:
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


def train(args) -> None:
    from everyseg.train_run import train

    train(
        args.config,
        out=args.out,
        overrides=args.overrides,
        resume=args.resume,
        evaluate=not args.no_eval,
    )


def evaluate(args) -> None:
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


def predict(args) -> int:
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


def segment(args) -> None:
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


def check_data(args) -> int:
    from everyseg.commands.check_data import run_check_data

    return run_check_data(
        source=args.source,
        images=args.images,
        overrides=args.overrides,
        decode=args.decode,
        as_json=args.json,
    )


def convert_vg(args) -> None:
    from everyseg.data.convert_vg import convert_vg

    summary = convert_vg(
        objects=args.objects,
        image_data=args.image_data,
        classes=args.classes,
        out=args.out,
        aliases=args.aliases,
    )
    print(summary.format(args.objects, args.out))


def export(args) -> None:
    from everyseg.engine.export import export_run

    out = export_run(args.run, fmt=args.fmt, out=args.out, checkpoint=args.checkpoint)
    print(f"{args.run} ({args.checkpoint}) -> {out} ({args.fmt})")


def report(args) -> None:
    from everyseg.report import write_report

    out = write_report(
        args.runs, out=args.out, gallery_images=args.gallery, checkpoint=args.checkpoint
    )
    print(f"{len(args.runs)} run(s) -> {out}")


def study(args) -> int:
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


def demo(args) -> None:
    from everyseg.demo import run_demo

    run_demo(args.out, steps=args.steps, num_train=args.train, num_val=args.val)
