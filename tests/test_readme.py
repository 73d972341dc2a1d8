"""The README's Python snippet runs, offline, as written (only its training is sized down)."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).parents[1] / "README.md"
TRAIN_CALL = 'everyseg.train("baseline-tiny", out="runs/tiny", overrides=["train.steps=200"])'


def python_snippet() -> str:
    section = README.read_text().split("\n## Python\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_snippet_runs_offline(make_config, synth_paths, tmp_path, monkeypatch):
    code = python_snippet()
    assert TRAIN_CALL in code
    # the tiny test data and model, trained 2 steps, in place of baseline-tiny's 200
    code = code.replace(TRAIN_CALL, 'everyseg.train(CONFIG, out="runs/tiny", progress=False)')
    (tmp_path / "everyseg-synth").symlink_to(Path(synth_paths["val_images"]).parent)
    monkeypatch.chdir(tmp_path)
    namespace = {"CONFIG": make_config("train.steps=2", preset="baseline-tiny")}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert (tmp_path / "overlay.png").is_file()
    assert len(namespace["batch"]) == 2
    assert namespace["masks"].shape == (1, 64, 64)
    assert np.all(namespace["more"].labels == [1])
    assert (tmp_path / "runs/tiny/overlays").is_dir()
