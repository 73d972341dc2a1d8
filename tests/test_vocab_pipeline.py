"""The large-vocabulary path end to end: `synth --vocab`, then the `convert vg` and
`train maskx-vg-tiny` commands it prints, then evaluation on its all-class val set."""

from __future__ import annotations

import json
import shlex

from everyseg.cli import main
from everyseg.engine.evaluate_run import evaluate_run
from everyseg.engine.train import train


def test_the_printed_commands_convert_vg_and_train_maskx_vg_tiny(tmp_path, capsys, make_config):
    argv = ["synth", str(tmp_path / "vocab"), "--vocab", "8", "--size", "64", "--train", "16"]
    assert main([*argv, "--coco", "6", "--val", "4", "--mask-classes", "2"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    convert, train_cmd = [shlex.split(line) for line in lines if line.startswith("everyseg ")]
    assert main(convert[1:]) == 0
    assert train_cmd[:3] == ["everyseg", "train", "maskx-vg-tiny"]
    sets = [train_cmd[i + 1] for i, arg in enumerate(train_cmd) if arg == "--set"]
    paths = dict(item.removeprefix("data.").split("=", 1) for item in sets)
    cfg = make_config("train.steps=2", preset="maskx-vg-tiny", paths=paths)
    run = train(cfg, out_dir=tmp_path / "run", progress=False)

    val = json.loads((tmp_path / "vocab/val/annotations.json").read_text())
    coco = json.loads((tmp_path / "vocab/coco/annotations/train.json").read_text())
    metrics = evaluate_run(run.root, progress=False)
    # one vocabulary: every val class is a run class, the COCO source's classes are the seen
    assert sorted(metrics["segm"]["per_class"]) == sorted(c["name"] for c in val["categories"])
    assert sorted(metrics["seen_classes"]) == sorted(c["name"] for c in coco["categories"])
    assert metrics["frequency_buckets"]["by"] == "train_instances"
