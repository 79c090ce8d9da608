"""Typed tasks: ``TaskHandler``, ``BatchTaskHandler``, ``@task``, and the payload codec.

A typed task is a class whose instances are its payloads — a dataclass or a pydantic
model — with an ``IDENTIFIER`` and a ``run`` method::

    @dataclass
    class SendEmail(TaskHandler):
        IDENTIFIER: ClassVar[str] = "send_email"
        to: str

        def run(self, ctx: WorkerContext) -> None: ...

    utils.add_job(SendEmail(to="a@example.com"))

``run`` may be ``def`` (the worker runs it in a thread) or ``async def`` (on the loop).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import decimal
import enum
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from .errors import InvalidArgument, InvalidArgumentType, PayloadNotSerializable
from .specs import unstorable

if TYPE_CHECKING:
    from .context import WorkerContext

__all__ = [
    "BatchTaskHandler",
    "FunctionTask",
    "TaskHandler",
    "decode_payload",
    "encode_json_value",
    "encode_json_values",
    "encode_payload",
    "task",
    "to_json_value",
    "to_json_values",
]

_T = TypeVar("_T")
_B = TypeVar("_B", bound="BatchTaskHandler")


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


class TaskHandler:
    """Base class of typed tasks; an instance is one job's payload.

    Subclasses set ``IDENTIFIER`` and implement ``run(self, ctx)``, sync or async.
    """

    IDENTIFIER: ClassVar[str]

    def run(self, ctx: WorkerContext) -> Any:
        """Do the job's work; raising fails the job (it is retried with backoff)."""
        raise NotImplementedError

    @classmethod
    def from_payload(cls: type[_T], data: Any) -> _T:
        """Decode a job payload into an instance of this task."""
        return decode_payload(cls, data)


class BatchTaskHandler:
    """Base class of batch tasks: one job carries a JSON array of items of this class.

    ``run_batch(items, ctx)`` returns ``None`` (all done) or a list with one entry per
    item, ``None`` for success or an exception for failure; the job is then retried with
    only the failed items as its payload.
    """

    IDENTIFIER: ClassVar[str]

    @classmethod
    def run_batch(cls: type[_B], items: list[_B], ctx: WorkerContext) -> Any:
        """Process the items; raising fails the whole batch."""
        raise NotImplementedError

    @classmethod
    def from_payload(cls: type[_T], data: Any) -> _T:
        """Decode one item of a batch payload."""
        return decode_payload(cls, data)


TaskFunction = Callable[[Any, "WorkerContext"], "Awaitable[Any] | Any"]


class FunctionTask(Generic[_T]):
    """A plain function ``fn(payload, ctx)`` registered as a task by :func:`task`."""

    def __init__(
        self,
        identifier: str,
        fn: Callable[[_T, WorkerContext], Any],
        payload_type: type[_T] | None = None,
    ) -> None:
        self.IDENTIFIER = identifier
        self.fn = fn
        self.payload_type = payload_type
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", identifier)

    def decode(self, data: Any) -> Any:
        """Decode the payload for the function (typed when ``payload_type`` is given)."""
        return decode_payload(self.payload_type, data) if self.payload_type else data

    def __call__(self, payload: _T, ctx: WorkerContext) -> Any:
        """Call the function (the worker does this with the decoded payload)."""
        return self.fn(payload, ctx)

    def __repr__(self) -> str:
        return f"<task {self.IDENTIFIER!r} {self.__name__}>"


def task(
    identifier: str, *, payload_type: type[Any] | None = None
) -> Callable[[Callable[[Any, WorkerContext], Any]], FunctionTask[Any]]:
    """Register a function ``fn(payload, ctx)`` (sync or async) as the task ``identifier``.

    ``payload_type`` (a dataclass or pydantic model) makes the worker decode the payload
    into that type; otherwise the function receives the JSON value.
    """
    if not isinstance(identifier, str) or not identifier:
        raise InvalidArgument("a task identifier must be a non-empty string")

    def decorate(fn: Callable[[Any, WorkerContext], Any]) -> FunctionTask[Any]:
        return FunctionTask(identifier, fn, payload_type)

    return decorate


def identifier_of(handler: Any) -> str:
    """The task identifier of a handler class, instance or :class:`FunctionTask`."""
    identifier = getattr(handler, "IDENTIFIER", None)
    if not isinstance(identifier, str) or not identifier:
        raise InvalidArgumentType(f"{handler!r} has no IDENTIFIER; typed tasks must define one")
    return identifier


def batch_payload(items: Sequence[Any]) -> list[Any]:
    """The JSON array stored for a batch job (items encoded one by one)."""
    return [to_json_value(item) for item in items]
