"""Read a JSON file whose top level is an array one element at a time, in bounded memory.

Visual Genome's objects.json is a ~400 MB array; `json.load` turns it into ~10x that in Python
objects. `iter_json_array` holds one buffered chunk plus the element being decoded, decoded by
the standard library's scanner (`json.JSONDecoder.raw_decode`), so elements are exactly what
`json.load` would give.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from json.decoder import WHITESPACE  # type: ignore[attr-defined]  # the scanner's own pattern
from pathlib import Path
from typing import Any, TextIO

from everyseg.data.validate import DataError

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
        self.pos += 1
        if self._next_char() == "]":
            self.pos += 1
        else:
            index = 0
            while True:
                yield self._decode(index)
                char = self._next_char()
                self.pos += 1
                if char == "]":
                    break
                if char != ",":
                    found = "the end of the file (truncated?)" if char is None else repr(char)
                    raise self._error(f"expected ',' or ']' after it, found {found}", index)
                index += 1
        if self._next_char() is not None:
            raise self._error("data after the top-level array", index=None)

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
