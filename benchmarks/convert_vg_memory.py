"""Peak memory (RSS) of `everyseg convert vg` on a generated objects.json of VG's size and schema,
against `json.load` of the same file.

Writes, in a temporary folder, an image_data.json and a ~400 MB objects.json (VG 1.4's layout:
~35 objects per image, names drawn from 30,000 with a Zipf-like law, 80% with a synset, 1% of
boxes degenerate or outside their image), then runs in a fresh child process each: convert_vg
with --classes 3000, and json.load of objects.json. Each child reports its RSS after its imports
(the base) and its peak (ru_maxrss); the work's own figure is peak - base. Run with
OMP_NUM_THREADS=1 (set for the children).

    python benchmarks/convert_vg_memory.py [--mb 400] [--classes 3000]

The last line prints both figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NAMES = 30_000
OBJECTS_PER_IMAGE = 35
URL = "https://cs.stanford.edu/people/rak248/VG_100K/{}.jpg"

CHILD = """
import json, resource, sys, time
from pathlib import Path
work, objects, image_data, classes, out = sys.argv[1:6]
if work == "convert":
    from everyseg.data.convert_vg import convert_vg
def rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
base = rss_mb()
start = time.perf_counter()
if work == "convert":
    summary = convert_vg(objects=objects, image_data=image_data, classes=int(classes), out=out)
    what = f"{summary.kept} objects kept of {summary.objects}"
else:
    with open(objects) as f:
        data = json.load(f)
    what = f"{sum(len(e['objects']) for e in data)} objects loaded"
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"base_mb": base, "peak_mb": peak, "seconds": seconds, "what": what}))
"""


def generate(folder: Path, *, megabytes: float, seed: int = 0) -> tuple[Path, Path, int]:
    """Write objects.json of about `megabytes` MB and its image_data.json; (paths, images)."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, NAMES + 1)
    name_p = 1.0 / ranks
    name_p /= name_p.sum()
    objects, image_data = folder / "objects.json", folder / "image_data.json"
    target = megabytes * 1e6
    written, image_id, object_id = 0, 0, 0
    entries = []
    with open(objects, "w") as f:
        f.write("[")
        while written < target:
            image_id += 1
            n = int(rng.poisson(OBJECTS_PER_IMAGE))
            width, height = int(rng.integers(300, 1025)), int(rng.integers(300, 1025))
            names = rng.choice(NAMES, size=n, p=name_p)
            xs, ys = rng.integers(0, width, n), rng.integers(0, height, n)
            ws, hs = rng.integers(0, width // 2, n), rng.integers(0, height // 2, n)
            with_synset = rng.random(n) < 0.8
            objs = []
            for name, x, y, w, h, synset in zip(names, xs, ys, ws, hs, with_synset, strict=True):
                object_id += 1
                synsets = f'"thing_{name}.n.01"' if synset else ""
                objs.append(
                    f'{{"synsets": [{synsets}], "h": {h}, "object_id": {object_id}, '
                    f'"merged_object_ids": [], "names": ["Thing {name} "], "w": {w}, '
                    f'"y": {y}, "x": {x}}}'
                )
            url = URL.format(image_id)
            text = (
                f'{{"image_id": {image_id}, "objects": [{", ".join(objs)}], "image_url": "{url}"}}'
            )
            f.write((", " if image_id > 1 else "") + text)
            written += len(text) + 2
            coco_id = image_id if image_id % 2 else None
            entries.append(
                {"width": width, "height": height, "url": url, "image_id": image_id,
                 "coco_id": coco_id, "flickr_id": None}
            )  # fmt: skip
        f.write("]")
    image_data.write_text(json.dumps(entries))
    return objects, image_data, image_id


def measure(work: str, objects: Path, image_data: Path, classes: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [
        sys.executable,
        "-c",
        CHILD,
        work,
        str(objects),
        str(image_data),
        str(classes),
        str(out),
    ]
    done = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=400.0, help="size of objects.json (MB)")
    parser.add_argument("--classes", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        objects, image_data, images = generate(folder, megabytes=args.mb)
        size = objects.stat().st_size / 1e6
        print(f"generated {objects.name}: {size:.0f} MB, {images} images "
              f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
        figures = {}
        for work in ("convert", "json.load"):
            figures[work] = m = measure(work, objects, image_data, args.classes, folder / "vg.json")
            work_mb = m["peak_mb"] - m["base_mb"]
            print(f"{work}: peak {m['peak_mb']:.0f} MB, base {m['base_mb']:.0f} MB, "
                  f"work {work_mb:.0f} MB, {m['seconds']:.0f} s ({m['what']})")  # fmt: skip
    convert, load = figures["convert"], figures["json.load"]
    print(
        f"convert_vg_memory: objects.json {size:.0f} MB; convert vg peak RSS "
        f"{convert['peak_mb']:.0f} MB (work {convert['peak_mb'] - convert['base_mb']:.0f} MB, "
        f"{convert['seconds']:.0f} s); json.load peak RSS {load['peak_mb']:.0f} MB "
        f"(work {load['peak_mb'] - load['base_mb']:.0f} MB, {load['seconds']:.0f} s)"
    )


if __name__ == "__main__":
    main()
