"""`everyseg report`: one self-contained HTML page, looked at the way people look at it (a
browser's screenshot), and its parts: per-class bars at thousands of classes, notes for what a
run lacks, errors naming the file."""

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from everyseg.cli import main
from everyseg.report import figures

IMG = re.compile(r'<img alt="[^"]*" src="([^"]*)">')


def report(tmp_path, *runs, extra=()) -> tuple[int, str]:
    page = tmp_path / "report.html"
    code = main(["report", *map(str, runs), "--out", str(page), *extra])
    return code, page.read_text() if page.exists() else ""


@pytest.fixture(scope="module")
def two_runs(trained_run, tmp_path_factory):
    """The page on trained_run and on a copy of it that was never evaluated."""
    root = tmp_path_factory.mktemp("report")
    bare = shutil.copytree(trained_run.root, root / "not-evaluated")
    (bare / "metrics.json").unlink()
    page = root / "report.html"
    assert main(["report", str(trained_run.root), str(bare), "--out", str(page)]) == 0
    return page, trained_run.root, bare


def test_page_is_self_contained_with_every_part(two_runs):
    page, run, bare = two_runs
    text = page.read_text()
    assert "<script" not in text and "<link" not in text and "http" not in text
    sources = IMG.findall(text)
    # comparison loss; run: curves, per-class bars, frequency buckets, PR, gallery; the
    # unevaluated copy: curves and gallery
    assert len(sources) == 8
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        assert image.format == "PNG" and min(image.size) > 100
    assert f"<th>{run}</th><th>{bare}</th>" in text  # the side-by-side table's columns
    assert "<th>gt-box mask AP unseen</th>" in text
    assert "<th>mask AP unseen</th>" in text and "<th>steps trained</th><td>2</td>" in text
    assert "metrics.json is missing: run `everyseg evaluate" in text
    assert text.count("<h3>Ground truth and predictions</h3>") == 2


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does as root)",
)
def test_page_renders_in_headless_chromium_not_blank(two_runs, tmp_path):
    page = two_runs[0]
    shot = tmp_path / "shot.png"
    command = [
        "chromium",
        "--headless",
        "--no-sandbox",  # as root, as CI runs
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1100,2600",
        f"--screenshot={shot}",
        page.as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)  # (H, W, 3)
    assert pixels.shape[:2] == (2600, 1100)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 200  # figures, not a page of text on white
    for band in np.array_split(pixels, 4):  # every quarter of the page has something drawn
        assert band.std() > 20


def test_thousands_of_classes_show_top_and_bottom_bars_coloured_seen_unseen():
    rng = np.random.default_rng(0)
    names = [f"class {i}" for i in range(3000)]
    per_class = {name: float(ap) for name, ap in zip(names, rng.uniform(0, 100, 3000))}
    per_class["class 7"] = None  # no ground truth in val: no bar
    metrics = {"segm": {"per_class": per_class}, "seen_classes": names[:100]}
    fig = figures.per_class_ap(metrics)
    top, bottom = fig.axes
    assert len(top.patches) == len(bottom.patches) == figures.BARS_PER_PANEL
    assert top.get_title() == "top 20 of 2999 classes"
    best = max((ap, name) for name, ap in per_class.items() if ap is not None)
    assert top.get_yticklabels()[-1].get_text() == best[1]  # the best class at the top
    for ax in fig.axes:
        for bar, label in zip(ax.patches, ax.get_yticklabels()):
            seen = label.get_text() in metrics["seen_classes"]
            expected = figures.SEEN if seen else figures.UNSEEN
            assert bar.get_facecolor()[:3] == pytest.approx(_rgb(expected))


def _rgb(hex_colour: str) -> tuple[float, ...]:
    return tuple(int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5))


def test_what_a_run_lacks_becomes_a_note(trained_run, copy_run, tmp_path):
    run = copy_run(trained_run).root
    metrics = json.loads((run / "metrics.json").read_text())
    for iou_type in ("segm", "bbox"):
        del metrics[iou_type]["pr_curve"]  # written before PR curves were added
    (run / "metrics.json").write_text(json.dumps(metrics))
    with (run / "log.jsonl").open("a") as log:
        log.write('{"step": 3, "loss": 0.')  # half a line: a run killed mid-write
    code, text = report(tmp_path, run, extra=["--gallery", "0"])
    assert code == 0
    assert "metrics.json has no PR curves" in text and "<h3>Precision-recall</h3>" not in text
    last = len((run / "log.jsonl").read_text().splitlines())
    assert f"log.jsonl: 1 unreadable line(s) left out: [{last}]" in text
    assert "Ground truth" not in text


def test_gallery_of_moved_data_is_a_note(trained_run, copy_run, tmp_path):
    run = copy_run(trained_run).root
    config = (run / "config.yaml").read_text()
    val_json = re.search(r"val_json: (.*)", config).group(1)
    (run / "config.yaml").write_text(config.replace(val_json, str(tmp_path / "gone.json")))
    code, text = report(tmp_path, run, extra=["--gallery", "1"])
    assert code == 0
    assert "no gallery: " in text and "gone.json" in text
    assert "<h3>Mask AP per class</h3>" in text  # the rest of the page is there


def test_bad_runs_are_errors_naming_the_file(trained_run, copy_run, tmp_path, capsys):
    code, _ = report(tmp_path, tmp_path)
    assert code == 2
    assert f"everyseg report: error: {tmp_path}: not a run directory" in capsys.readouterr().err
    run = copy_run(trained_run).root
    (run / "metrics.json").write_text("{not json")
    code, _ = report(tmp_path, run)
    assert code == 2
    assert f"{run / 'metrics.json'}: not JSON" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()
    assert main(["report", str(trained_run.root), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder" in capsys.readouterr().err


def test_without_matplotlib_the_error_says_what_to_install(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "Figure", None)
    with pytest.raises(ValueError, match=r'pip install "everyseg\[report\]"'):
        figures.require_matplotlib()
    code, _ = report(tmp_path, trained_run.root)
    assert code == 2
