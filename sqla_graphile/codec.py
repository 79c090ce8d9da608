"""The payload codec: task payloads to JSON text, and JSON data back to payload objects.

A payload is a JSON value, a dataclass or a pydantic model (a typed task's instance).
:func:`encode_payload` writes it as compact JSON text, as Node's ``JSON.stringify``
does, and refuses before anything is written what PostgreSQL's ``json`` cannot store
(NaN, infinities, NUL characters, lone surrogates); :func:`decode_payload` builds the
typed object from a job's JSON data.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import decimal
import enum
import json
import re
import uuid
from collections.abc import Iterable
from typing import Any, TypeVar

from .errors import PayloadNotSerializable
from .specs import unstorable

__all__ = [
    "decode_payload",
    "encode_json_value",
    "encode_json_values",
    "encode_payload",
    "to_json_value",
    "to_json_values",
]

_T = TypeVar("_T")

_PLAIN = frozenset({dict, list, str, int, float, bool, type(None)})


def to_json_value(value: Any) -> Any:
    """Turn a payload object (dataclass, pydantic model, or JSON value) into JSON data."""
    if type(value) in _PLAIN:  # the common case, without attribute probing
        return value
    dump = getattr(value, "model_dump", None)
    if callable(dump):  # pydantic v2
        return dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def to_json_values(payloads: Iterable[Any]) -> list[Any]:
    """:func:`to_json_value` of each payload, in one pass."""
    plain = _PLAIN
    return [value if type(value) in plain else to_json_value(value) for value in payloads]


def _default(value: Any) -> Any:
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    converted = to_json_value(value)
    if converted is not value:
        return converted
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# Built once: json.dumps with options builds a new encoder on every call.
_ENCODER = json.JSONEncoder(
    default=_default, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
# A NUL character is encoded as \u0000 preceded by an even number of backslashes; with an
# odd number the backslash is a literal one (the text "\\u0000").
_REAL_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def encode_payload(value: Any) -> str:
    """Encode a payload as compact JSON text (as Node's ``JSON.stringify`` does).

    ``None`` becomes ``{}``. Values JSON cannot hold (objects without an encoding, NaN,
    infinities, NUL characters, which PostgreSQL cannot store) raise
    :class:`~sqla_graphile.errors.PayloadNotSerializable` before anything is written.
    """
    return encode_json_value(to_json_value(value))


def encode_json_value(value: Any) -> str:
    """:func:`encode_payload` for a value :func:`to_json_value` has already converted."""
    if value is None:
        return "{}"
    return _encode(value)


def encode_json_values(values: list[Any]) -> str:
    """The JSON array of many converted payloads, each as :func:`encode_json_value` has it.

    One encoder call for them all; the same values are refused, and an element's text
    is exactly its own encoding.
    """
    return _encode([{} if value is None else value for value in values])


def _encode(value: Any) -> str:
    try:
        text = _ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise PayloadNotSerializable(f"the payload cannot be encoded as JSON: {exc}") from exc
    if "\\u0000" in text and _REAL_NUL.search(text):
        raise PayloadNotSerializable("the payload contains a NUL character (\\u0000)")
    if not text.isascii() and (problem := unstorable("the payload", text)) is not None:
        raise PayloadNotSerializable(problem)
    return text


def decode_payload(cls: type[_T], data: Any) -> _T:
    """Build a payload object of ``cls`` from JSON data (dataclass or pydantic model)."""
    validate = getattr(cls, "model_validate", None)
    if callable(validate):
        return validate(data)  # type: ignore[no-any-return]
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} payload must be a JSON object, got {type(data).__name__}")
    return cls(**data)
