"""What is wrong with a local data file, found by reading it, with a 1-based line or row.

`datasets` reports a bad file with a traceback from deep inside pyarrow or pandas: a
UnicodeDecodeError without the line, `Instruction "train" corresponds to no data!` for a file of
blank lines, 0-based rows of a block for bad JSON, and a short CSV row is silently filled with
nulls. The checks here read the bytes themselves and say where. Pure functions over lines; the
caller opens the file and raises `ConfigError` naming the spec field.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class TextScan:
    """One pass over a text file's bytes."""

    bad_line: int | None
    """1-based line of the first bytes that are not UTF-8, or None."""
    bad_offset: int | None
    """Byte offset (from the start of the file) of those bytes."""
    rows: int
    """Lines holding more than whitespace (up to the first bad line)."""


def scan_text(lines: Iterable[bytes]) -> TextScan:
    """Find the first line that is not UTF-8 and count the non-blank lines before it.

    `lines` are the file's lines with their line ends, as iterating a file opened in binary
    mode gives them, so the offsets are the file's own."""
    offset, rows = 0, 0
    for number, line in enumerate(lines, 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            return TextScan(number, offset + e.start, rows)
        if text.strip():
            rows += 1
        offset += len(line)
    return TextScan(None, None, rows)


def json_problem(text: str) -> str | None:
    """Where `text` (a JSON Lines file, or one JSON document starting with `[`) stops being the
    rows `datasets` reads: a 1-based line and column and what the parser expected; None when
    every line is a JSON object."""
    if text.lstrip().startswith("["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}, column {e.colno}: {e.msg}"
        bad = next((i for i, row in enumerate(doc, 1) if not isinstance(row, dict)), None)
        return None if bad is None else f"element {bad} of the JSON array is not an object"
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number}, column {e.colno}: {e.msg}"
        if not isinstance(row, dict):
            return f"line {number}: expected one JSON object per line, got {type(row).__name__}"
    return None


def csv_problem(lines: Iterable[str]) -> str | None:
    """The first data row whose cell count differs from the header's, as `row N (line L)`: rows
    count from 1 after the header, blank lines skipped (as pandas reads them); lines count from 1
    in the file (a quoted cell may span lines). None when every row fits."""
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        return None
    row_number = 0
    for row in reader:
        if not row:
            continue
        row_number += 1
        if len(row) != len(header):
            return (
                f"row {row_number} (line {reader.line_num}) has {len(row)} cells but the header has "
                f"{len(header)} ({', '.join(header)})"
            )
    return None
