"""The JSON files one step writes for others to read (manifest.json, evaluation.json) as typed records.

A record is a frozen dataclass whose fields are the file's keys; `parse_record` checks every field of the
file against the dataclass (strictly: "12" is not an int) and `record_json` gives the keys back in field order,
so the file on disk does not change.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import pydantic

Record = TypeVar("Record")


def parse_record(kind: type[Record], text: str | bytes, source: str, error: type[Exception] = ValueError) -> Record:
    """`text` (JSON) as a `kind`; `error` names `source` and every missing or wrongly typed field."""
    try:
        # JSON mode: strict about every value's type, yet objects are read into the dataclasses.
        return pydantic.TypeAdapter(kind).validate_json(text, strict=True)
    except pydantic.ValidationError as invalid:
        problems = "; ".join(_problem(problem) for problem in invalid.errors())
        raise error(f"{source}: {problems}") from None


def _problem(problem: Any) -> str:
    if problem["type"] == "json_invalid":
        return f"not valid JSON ({problem['msg']})"
    field = ".".join(str(part) for part in problem["loc"]) or "the whole file"
    return f"field {field!r}: {problem['msg'].lower()}" if problem["type"] != "missing" else f"field {field!r} missing"


def record_json(record: Any, omit_when_none: tuple[str, ...] = ()) -> dict[str, Any]:
    """The record as the JSON object it is stored as; the keys in `omit_when_none` (at any depth) are left out
    when they are None, as the writers always have."""
    return _without_none(dataclasses.asdict(record), omit_when_none)


def _without_none(value: Any, omit: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {key: _without_none(item, omit) for key, item in value.items() if not (key in omit and item is None)}
    if isinstance(value, list):
        return [_without_none(item, omit) for item in value]
    return value
