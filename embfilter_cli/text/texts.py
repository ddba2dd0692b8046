"""Read texts to embed: plain lines or JSONL records with a `text` field, from a path or stdin.

Format: `auto` picks JSONL for `.jsonl`/`.ndjson` paths, and for other inputs (stdin included) when
the first non-blank line starts with `{`; everything else is one text per line.

Empty texts are SKIPPED with a warning (see `TextInput.skipped`), never embedded: a blank line or a
JSONL record whose `text` is empty or whitespace. A trailing newline at the end of the file is not
a blank line. The output therefore has one row per non-empty text, in input order; the warning
names the skipped line numbers so rows can be matched back to lines.

Not handled: CSV/TSV input, other text fields than `text` (rename it first), encodings other than
UTF-8 (a BOM is accepted), JSON arrays (one object per line only).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from embfilter_cli.errors import InputDataError
from embfilter_cli.jsonable import loads

FORMATS = ("auto", "lines", "jsonl")
TEXT_FIELD = "text"


@dataclass
class TextInput:
    """Texts in input order, the JSONL records they came from, and what was skipped."""

    texts: list[str]
    records: list[dict[str, Any]] | None  # JSONL input: the full objects (same order as texts)
    fmt: str  # "lines" or "jsonl"
    skipped: list[int] = field(default_factory=list)  # 1-based line numbers of empty texts
    source: str = "-"


def read_texts(source: str | Path, fmt: str = "auto", stdin: TextIO | None = None) -> TextInput:
    """Read texts from `source` (a path, or "-" for stdin).

    Args:
        source: file path, or "-" to read standard input.
        fmt: "auto", "lines" or "jsonl" (see module docstring).
        stdin: stream to use for "-" (defaults to sys.stdin; tests pass their own).

    Raises:
        InputDataError: missing or unreadable file, bad JSON (naming the line), a record without a
            string `text`, or no non-empty text at all.
    """
    if fmt not in FORMATS:
        raise InputDataError(f"input format {fmt!r} is not one of {', '.join(FORMATS)}")
    name = str(source)
    if name == "-":
        stream = stdin or sys.stdin
        buffer = getattr(stream, "buffer", None)
        if buffer is None:  # a text stream without bytes underneath (tests): already decoded
            raw = stream.read()
        else:  # decode ourselves, so invalid UTF-8 is one error naming the line, like a file's
            data = buffer.read()
            try:
                raw = data.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                line = data[: exc.start].count(b"\n") + 1
                raise InputDataError(
                    f"stdin line {line} is not valid UTF-8 (byte {exc.start}); convert the input to UTF-8"
                ) from None
        where = "stdin"
    else:
        path = Path(name)
        if not path.exists():
            raise InputDataError(f"input file {path} does not exist; give a text file, a .jsonl file or - for stdin")
        if path.is_dir():
            raise InputDataError(f"{path} is a directory; give a text file, a .jsonl file or - for stdin")
        try:
            raw = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[: exc.start].count(b"\n") + 1
            raise InputDataError(
                f"{path} line {line} is not valid UTF-8 (byte {exc.start}); convert the file to UTF-8"
            ) from exc
        where = str(path)
    raw = raw.lstrip("\ufeff")
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line does not start a blank one
    lines = [line.rstrip("\r") for line in lines]
    if fmt == "auto":
        fmt = _guess_format(name, lines)
    result = _parse_jsonl(lines, where) if fmt == "jsonl" else _parse_lines(lines)
    result.source = where
    if not result.texts:
        raise InputDataError(f"{where} holds no non-empty text ({len(lines)} lines read); nothing to embed")
    return result


def _guess_format(name: str, lines: list[str]) -> str:
    if name != "-" and Path(name).suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    first = next((line for line in lines if line.strip()), "")
    return "jsonl" if first.lstrip().startswith("{") else "lines"


def _parse_lines(lines: list[str]) -> TextInput:
    texts: list[str] = []
    skipped: list[int] = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            texts.append(line)
        else:
            skipped.append(number)
    return TextInput(texts, None, "lines", skipped)


def _parse_jsonl(lines: list[str], where: str) -> TextInput:
    texts: list[str] = []
    records: list[dict[str, Any]] = []
    skipped: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            skipped.append(number)
            continue
        try:
            record = loads(line)
        except json.JSONDecodeError as exc:
            raise InputDataError(
                f"{where} line {number} is not valid JSON ({exc.msg} at column {exc.colno}); "
                "JSONL input needs one object per line"
            ) from exc
        if not isinstance(record, dict):
            raise InputDataError(
                f"{where} line {number} is a JSON {'array' if isinstance(record, list) else type(record).__name__}, not an object with a {TEXT_FIELD!r} field"
            )
        text = record.get(TEXT_FIELD)
        if not isinstance(text, str):
            found = "no" if TEXT_FIELD not in record else f"a {type(text).__name__}"
            raise InputDataError(
                f"{where} line {number} has {found} {TEXT_FIELD!r} field; every record needs "
                f"a string {TEXT_FIELD!r} (fields seen: {', '.join(sorted(record)) or 'none'})"
            )
        if not text.strip():
            skipped.append(number)
            continue
        texts.append(text)
        records.append(record)
    return TextInput(texts, records, "jsonl", skipped)


def describe_skipped(skipped: list[int], limit: int = 8) -> str:
    """'3 empty texts skipped (lines 2, 5, 9)' for the warning the CLI prints."""
    shown = ", ".join(str(n) for n in skipped[:limit]) + (", …" if len(skipped) > limit else "")
    noun = "text" if len(skipped) == 1 else "texts"
    return f"{len(skipped)} empty {noun} skipped (line{'s' if len(skipped) > 1 else ''} {shown}); the output has one row per non-empty text"
