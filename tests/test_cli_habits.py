"""What users expect of a CLI: `python -m everyseg`, --version, examples under every verb's
help, data paths that survive a change of folder, missing data and offline weights that say
what to do, and a training run that ends by saying where its outputs are."""

import argparse
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import yaml
from torchvision.models import WeightsEnum

import everyseg
from everyseg.cli import _parser, main
from everyseg.config import load_config
from everyseg.config_paths import with_absolute_paths

TINY = ["data.min_size=[64]", "data.test_min_size=64", "data.max_size=64", "data.num_workers=0"]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def verbs(parser: argparse.ArgumentParser, prefix: str = "everyseg"):
    """(name, parser) of every verb, nested ones (convert vg) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from verbs(sub, f"{prefix} {name}")


def test_python_dash_m_everyseg_prints_the_version():
    done = subprocess.run(
        [sys.executable, "-m", "everyseg", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert done.stdout.strip() == f"everyseg {everyseg.__version__}"


def test_every_verb_and_option_has_help_and_every_verb_an_example():
    parser = _parser()
    assert "examples:" in parser.epilog
    found = dict(verbs(parser))
    assert {"everyseg train", "everyseg convert vg", "everyseg demo"} <= set(found)
    for name, sub in found.items():
        assert "examples:" in sub.epilog and f"{name} " in sub.epilog, name
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"


def test_missing_tiny_preset_data_says_which_command_writes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "baseline-tiny", "--out", "run"]) == 2
    err = capsys.readouterr().err
    assert "everyseg train: error: data.train_json: everyseg-synth/" in err
    assert "`everyseg synth everyseg-synth`" in err
    assert main(["train", "maskx-vg-tiny", "--out", "run"]) == 2
    err = capsys.readouterr().err
    assert "data.train_sources[0].json" in err
    assert "`everyseg synth everyseg-vocab --vocab 1000`" in err
    assert "everyseg convert vg --objects everyseg-vocab/vg/objects.json" in err
    assert not (tmp_path / "run").exists()


def test_offline_imagenet_weights_name_the_key_to_change(synth_paths, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    data = [f"data.{key}={value}" for key, value in synth_paths.items()]
    argv = ["train", "maskrcnn", "--out", str(Path(synth_paths["val_images"]).parent / "r")]
    code = main([*argv, *sets(*data, *TINY, "train.amp=off", "train.device=cpu")])
    err = capsys.readouterr().err
    assert code == 2
    assert "everyseg train: error: model.backbone.weights=imagenet: could not load" in err
    assert "--set model.backbone.weights=PATH" in err and "null" in err


def test_relative_data_paths_are_saved_absolute(synth_paths, tmp_path, monkeypatch, capsys):
    root = Path(synth_paths["val_images"]).parent
    monkeypatch.chdir(root.parent)
    relative = [
        f"data.{key}={Path(value).relative_to(root.parent)}" for key, value in synth_paths.items()
    ]
    steps = ["train.steps=1", "model.backbone.fpn_channels=16", "model.mask_head.channels=8"]
    steps += ["train.trunk_pretrain=null"]  # the preset's pretraining takes minutes
    argv = ["train", "maskrcnn-tiny", "--out", str(tmp_path / "run")]
    assert main([*argv, *sets(*relative, *TINY, *steps)]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {tmp_path / 'run'}" in out
    assert "metrics.json" in out and "overlays/" in out
    assert list((tmp_path / "run/overlays").glob("*.png"))
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())["data"]
    assert saved["train_json"] == synth_paths["train_json"]
    assert saved["val_images"] == synth_paths["val_images"]
    monkeypatch.chdir(tmp_path)  # elsewhere: the run still finds its val set
    assert main(["evaluate", str(tmp_path / "run")]) == 0


def test_with_absolute_paths_touches_only_paths(tmp_path):
    (tmp_path / "names.txt").write_text("circle\n")
    cfg = load_config(
        "maskrcnn",
        [
            "data.train_json=null",
            "data.train_images=null",
            "data.mask_classes=all",
            "data.train_sources=[{json: a.json, images: imgs, mask_classes: names.txt}]",
            "data.val_json=/abs/val.json",
            "model.transfer.embedding_file=~/glove.txt",
        ],
    )
    resolved = with_absolute_paths(cfg, base=tmp_path)
    (source,) = resolved.data.train_sources
    assert (source.json, source.images) == (str(tmp_path / "a.json"), str(tmp_path / "imgs"))
    assert source.mask_classes == str(tmp_path / "names.txt")
    assert resolved.data.mask_classes == "all"
    assert resolved.data.val_json == "/abs/val.json"
    assert resolved.model.backbone.weights == "imagenet"  # a name, not a path
    assert resolved.model.transfer.embedding_file == str(Path.home() / "glove.txt")


@pytest.mark.parametrize("given", ["1e-3", "1E-3", "0.001"])
def test_set_takes_exponent_notation_as_a_number(given):
    assert load_config("maskrcnn-tiny", [f"train.lr={given}"]).train.lr == 0.001
