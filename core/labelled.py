"""The normalised labelled-dataset format (torch-free).

A labelled dataset (``datasets.kind == "labelled"``) is stored as JSON Lines: UTF-8 without a
byte-order mark, one JSON object ``{"text": str, "label": str}`` per line, each line ending in
``"\\n"``. Labels are strings (an upload's numeric labels such as SST-2's ``0``/``1`` are stored
as ``"0"``/``"1"``). ``app.datasets`` writes it (``write_labelled``) from JSONL/CSV/TSV uploads;
the classification worker reads it (``read_labelled``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

__all__ = ["read_labelled", "write_labelled"]


def read_labelled(data: bytes) -> list[tuple[str, str]]:
    """Parse a stored labelled dataset into ``[(text, label), ...]`` in file order.

    Blank lines (only whitespace) are skipped. Raises ``ValueError`` naming the 1-based line
    number for: invalid UTF-8, a line that is not a JSON object, a missing or non-string
    ``text`` or ``label``; and for a file with no examples at all.
    """
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"line {at}: not valid UTF-8 (byte offset {exc.start})") from None
    if decoded.startswith("\ufeff"):
        decoded = decoded[1:]
    examples: list[tuple[str, str]] = []
    # split("\n"), not splitlines(): write_labelled leaves U+2028/U+2029/U+0085 raw inside a
    # JSON string (JSON allows them there); only "\n" ends a record.
    for number, line in enumerate(decoded.split("\n"), start=1):
        if not line.strip():
            continue
        examples.append(_example(line, number))
    if not examples:
        raise ValueError("no examples: the labelled dataset is empty")
    return examples


def _example(line: str, number: int) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {number}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"line {number}: expected a JSON object with \"text\" and "
                         f"\"label\", got {type(record).__name__}")
    for field in ("text", "label"):
        if field not in record:
            raise ValueError(f"line {number}: missing field {field!r}")
        if not isinstance(record[field], str):
            raise ValueError(f"line {number}: field {field!r} must be a string, got "
                             f"{type(record[field]).__name__}")
    return record["text"], record["label"]


def write_labelled(examples: Iterable[tuple[str, str]]) -> bytes:
    """Serialise ``(text, label)`` pairs in the normalised format (the inverse of
    ``read_labelled``). ``ensure_ascii=False`` keeps the text readable; JSON escapes every
    control character, so each record stays on one line."""
    return b"".join(
        json.dumps({"text": text, "label": label}, ensure_ascii=False).encode("utf-8") + b"\n"
        for text, label in examples)
