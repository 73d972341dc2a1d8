"""Read a JSON file's big array one element at a time, in bounded memory.

Visual Genome's objects.json is a ~400 MB array; `json.load` turns it into ~10x that in Python
objects. `iter_json_array` holds one buffered chunk plus the element being decoded, decoded by
the standard library's scanner (`json.JSONDecoder.raw_decode`), so elements are exactly what
`json.load` would give. `read_json_object` and `iter_member_array` do the same for an array
that is a member of a top-level object (a COCO file's 'annotations'), in two passes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from json.decoder import WHITESPACE  # type: ignore[attr-defined]  # the scanner's own pattern
from pathlib import Path
from typing import Any, TextIO

from everyseg.data.validate import DataError, read_coco_json

CHUNK_CHARS = 1 << 20
# far above any real element (a VG image with 1,000 objects is ~200 kB); beyond it the element
# is malformed (an unterminated string would otherwise pull in the whole file)
MAX_ELEMENT_CHARS = 64 << 20
_NUMBER_TAIL = re.compile(r"[0-9.eE+-]*")


def iter_json_array(
    path: str | Path, *, chunk_chars: int = CHUNK_CHARS, max_element_chars: int = MAX_ELEMENT_CHARS
) -> Iterator[Any]:
    """Yield the elements of the JSON array in `path`, in order.

    Raises FileNotFoundError naming the file, and DataError naming the file, the element's
    index and the character offset for anything that is not a JSON array of valid elements.
    """
    path = Path(path)
    try:
        # utf-8-sig: a byte-order mark (written by some Windows tools) is not an error
        with open(path, encoding="utf-8-sig") as f:
            yield from _ArrayReader(f, path, chunk_chars, max_element_chars).elements()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 JSON text ({err})") from None


def read_json_object(path: str | Path, *, streamed: str) -> tuple[dict, int | None]:
    """The top-level object in `path` without its member `streamed` if that is an array, and
    that array's length (None: no such member, or not an array, which is then in the dict).

    Raises DataError for anything that is not a JSON object (with a member named twice: which
    one counts is json.load's rule, not this reader's), UnicodeDecodeError for text that is not
    UTF-8, FileNotFoundError.
    """
    data: dict = {}
    length = None
    with open(path, encoding="utf-8-sig") as f:
        reader = _ArrayReader(f, Path(path), CHUNK_CHARS, MAX_ELEMENT_CHARS)
        for key in reader.members():
            if key in data or (key == streamed and length is not None):
                raise DataError(f"{path}: member {key!r} appears twice")
            if not reader.at_array():
                data[key] = reader.value()
            elif key == streamed:
                length = sum(1 for _ in reader.array())
            else:  # element by element: the buffer never holds the whole array
                data[key] = list(reader.array())
    return data, length


def iter_member_array(path: str | Path, key: str) -> Iterator[Any]:
    """Yield the elements of the array that is member `key` of the top-level object in `path`
    (as `read_json_object` found it: errors as there)."""
    with open(path, encoding="utf-8-sig") as f:
        reader = _ArrayReader(f, Path(path), CHUNK_CHARS, MAX_ELEMENT_CHARS)
        for member in reader.members():
            if member == key:
                yield from reader.array()
            elif reader.at_array():
                for _ in reader.array():  # skipped element by element: bounded memory
                    pass
            else:
                reader.value()


class _ArrayReader:
    def __init__(self, f: TextIO, path: Path, chunk_chars: int, max_element_chars: int):
        self.f, self.path = f, path
        self.chunk_chars, self.max_element_chars = chunk_chars, max_element_chars
        self.buf, self.pos = "", 0
        self.consumed = 0  # characters of the file before buf[0], for error offsets
        self.eof = False
        self.decoder = json.JSONDecoder()

    def elements(self) -> Iterator[Any]:
        if self._next_char() != "[":
            raise self._error("expected a JSON array at the top", index=None)
        yield from self.array()
        if self._next_char() is not None:
            raise self._error("data after the top-level array", index=None)

    def array(self) -> Iterator[Any]:
        """The elements of the array that starts at the next character."""
        self._expect("[", None, None)
        if self._next_char() == "]":
            self.pos += 1
            return
        index = 0
        while True:
            yield self._decode(index)
            if self._expect(",", "]", index) == "]":
                return
            index += 1

    def members(self) -> Iterator[str]:
        """The keys of the top-level object, each yielded with the reader at its value, which
        the caller reads before the next key."""
        if self._next_char() != "{":
            raise self._error("expected a JSON object at the top", index=None)
        self.pos += 1
        if self._next_char() == "}":
            self.pos += 1
        else:
            while True:
                if self._next_char() != '"':
                    raise self._error("expected a member name", index=None)
                key = self.value()
                self._expect(":", None, None)
                yield key
                if self._expect(",", "}", None) == "}":
                    break
        if self._next_char() is not None:
            raise self._error("data after the top-level object", index=None)

    def at_array(self) -> bool:
        return self._next_char() == "["

    def value(self) -> Any:
        """The JSON value that starts at the next character (a member's)."""
        return self._decode(0)

    def _expect(self, char: str, or_char: str | None, index: int | None) -> str:
        """Consume the next character, which must be `char` (or `or_char`); it."""
        found = self._next_char()
        if found is None or found not in (char, or_char):
            what = "the end of the file (truncated?)" if found is None else repr(found)
            either = f"{char!r}" + (f" or {or_char!r}" if or_char else "")
            raise self._error(f"expected {either} after it, found {what}", index)
        self.pos += 1
        return found

    def _decode(self, index: int) -> Any:
        if self._next_char() is None:
            raise self._error("the file ends where an element should be (truncated?)", index)
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise self._error("nested too deeply", index) from None
            except ValueError as err:  # JSONDecodeError, or an integer of > 4300 digits
                if self.eof:
                    at = err.pos if isinstance(err, json.JSONDecodeError) else None
                    reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
                    raise self._error(f"not valid JSON: {reason}", index, at=at) from None
                if len(self.buf) - self.pos > self.max_element_chars:
                    raise self._error(
                        f"not valid JSON, or an element over {self.max_element_chars} characters",
                        index,
                    ) from None
                self._fill()  # most likely the element continues in the next chunk
                continue
            if not self.eof and _NUMBER_TAIL.fullmatch(self.buf, end):
                # a number at the end of the buffer may continue: "12" + "34", "1." + "5"
                self._fill()
                continue
            self.pos = end
            return value

    def _next_char(self) -> str | None:
        """The next character that is not whitespace, not consumed; None at the end of file."""
        while True:
            self.pos = WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if self.eof:
                return None
            self._fill()

    def _fill(self) -> None:
        text = self.f.read(self.chunk_chars)
        if not text:
            self.eof = True
        self.consumed += self.pos
        self.buf = self.buf[self.pos :] + text
        self.pos = 0

    def _error(self, what: str, index: int | None, at: int | None = None) -> DataError:
        offset = self.consumed + (self.pos if at is None else at)
        element = "" if index is None else f"element {index} of the top-level array, "
        return DataError(f"{self.path}: {element}character {offset}: {what}")


class _MemberArray:
    """A top-level member array of a JSON file, read again from the file on each iteration."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key

    def __iter__(self) -> Iterator[Any]:
        return iter_member_array(self.path, self.key)


def read_coco_streamed(path: Path) -> tuple[dict, Iterable, int]:
    """`validate.read_coco_json`'s data, checks and errors, but 'annotations' apart: an
    iterable that reads them one at a time (the rest of the file is small next to them), and
    how many there are."""
    try:
        data, length = read_json_object(path, streamed="annotations")
    except (OSError, ValueError):  # DataError and UnicodeDecodeError are ValueErrors
        data, length = {}, None
    if length is None or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        # whatever is wrong, the whole-file reader says it as it always has (or reads what
        # this reader does not: UTF-16 or UTF-32 text, a member named twice)
        data = read_coco_json(path)
        annotations = data.pop("annotations")
        return data, annotations, len(annotations)
    return data, _MemberArray(path, "annotations"), length
