"""What `everyseg predict` reads: files, folders and glob patterns in, a list of image files
out; and, given a COCO data set, the image id of each file (matched by file_name)."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from everyseg.data.json_stream import iter_member_array

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Each input in order: a folder -> its image files (IMAGE_SUFFIXES, any case) at any
    depth, sorted, hidden files and folders left out; a glob pattern (`*`, `?`, `[`, `**`)
    that names no existing path -> the files it matches, sorted; anything else -> itself,
    even if it cannot be read (predict reports it and goes on). A file named twice is
    predicted once. ValueError for a folder without images or a pattern matching no file:
    the argument is wrong, and it is found before any model loads."""
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = _images_in(path)
            if not found:
                raise ValueError(f"{raw}: no image files in this folder ({_suffix_list()})")
        elif not path.exists() and glob.has_magic(str(raw)):
            found = sorted(Path(p) for p in glob.glob(str(raw), recursive=True))
            found = [p for p in found if p.is_file()]
            if not found:
                raise ValueError(f"{raw}: no file matches this pattern")
        else:
            found = [path]
        files.extend(found)
    return _without_repeats(files)


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def _suffix_list() -> str:
    return ", ".join(IMAGE_SUFFIXES)


def _without_repeats(files: list[Path]) -> list[Path]:
    seen: set[Path] = set()
    kept = []
    for path in files:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            kept.append(path)
    return kept


def data_set_ids(data_json: str | Path, files: Sequence[Path]) -> list[int | None]:
    """The id of each file's image in the COCO file `data_json`, None for a file it does not
    list. An image matches a file when its file_name's parts end the file's absolute path
    (`val/1.png` matches `/data/coco/val/1.png`); the longest such file_name wins. The
    `images` array is streamed: any size of data set reads in bounded memory. ValueError for
    an image entry without an integer id or a string file_name, or for a file_name listed
    twice."""
    wanted = {_parts(path)[-1] for path in files}
    by_name: dict[str, tuple[int, int]] = {}  # file_name -> (id, index of its entry)
    for index, image in enumerate(iter_member_array(data_json, "images")):
        image_id, name = _id_and_name(image, data_json, index)
        if name in by_name:
            raise ValueError(
                f"{data_json}: images[{index}] (id {image_id}) has the file_name {name!r} of "
                f"images[{by_name[name][1]}] (id {by_name[name][0]}): which image is the file?"
            )
        # only the names some file can match are kept: memory follows the inputs
        if Path(name).name in wanted:
            by_name[name] = (image_id, index)
    return [_match(path, by_name) for path in files]


def _id_and_name(image, data_json, index: int) -> tuple[int, str]:
    image_id = image.get("id") if isinstance(image, dict) else None
    name = image.get("file_name") if isinstance(image, dict) else None
    if isinstance(image_id, bool) or not isinstance(image_id, int) or not isinstance(name, str):
        raise ValueError(
            f"{data_json}: images[{index}] needs an integer id and a string file_name, got "
            f"{image!r:.200}"
        )
    return image_id, name


def _parts(path: Path) -> tuple[str, ...]:
    # the path as given, made absolute: a symlink's own name is the one a data set lists
    return Path(os.path.abspath(path)).parts


def _match(path: Path, by_name: dict[str, tuple[int, int]]) -> int | None:
    parts = _parts(path)
    best: tuple[int, int] | None = None  # (parts matched, id)
    for name, (image_id, _) in by_name.items():
        want = Path(name).parts
        if want and parts[-len(want) :] == want and (best is None or len(want) > best[0]):
            best = (len(want), image_id)
    return None if best is None else best[1]
