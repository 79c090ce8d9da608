"""The public surface: what ``sqla_graphile`` exports, documents, and promises alike.

* every name of ``sqla_graphile.__all__`` imports and is documented in the API reference
  (``docs/reference/*.md``), as a mkdocstrings ``:::`` target or as a member of one;
* every type a public method takes or returns (and every field of those types) is
  importable from ``sqla_graphile``;
* ``WorkerUtils`` and ``AsyncWorkerUtils`` have the same methods with the same
  signatures, the async ones returning awaitables;
* the exceptions form one hierarchy under ``GraphileWorkerError``.
"""

from __future__ import annotations

import collections.abc
import inspect
import re
import sys
import types
import typing
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest

import sqla_graphile
from sqla_graphile import errors

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference"
PUBLIC = {name: getattr(sqla_graphile, name) for name in sqla_graphile.__all__}


# -- exports and the API reference ----------------------------------------------------------


@dataclass
class Target:
    """One ``::: path`` block of a reference page, with its ``members:`` list if any."""

    page: str
    path: str
    members: list[str] | None


def reference_targets() -> list[Target]:
    targets = []
    for page in sorted(REFERENCE.glob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            match = re.match(r"^:::\s+(\S+)\s*$", line)
            if not match:
                continue
            members: list[str] | None = None
            for option in lines[i + 1 :]:
                if option.strip() and not option.startswith(" "):
                    break  # the block's indented options end here
                if re.match(r"^\s+members:\s*$", option):
                    members = []
                elif members is not None and re.match(r"^\s+- \S", option):
                    members.append(option.strip()[2:].strip())
            targets.append(Target(page.name, match.group(1), members))
    return targets


def resolve(path: str) -> tuple[Any, str]:
    """The object a dotted path names (a module, or an attribute of one), and its name."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj, parts[-1]
    raise ImportError(path)


def documented() -> set[tuple[str, int]]:
    """``(name, id(object))`` of everything the reference pages render."""
    found: set[tuple[str, int]] = set()
    for target in reference_targets():
        obj, name = resolve(target.path)
        found.add((name, id(obj)))
        if not isinstance(obj, types.ModuleType):
            continue
        if target.members is not None:
            names = target.members
        elif hasattr(obj, "__all__"):
            names = list(obj.__all__)
        else:
            names = [n for n in vars(obj) if not n.startswith("_")]
        found.update((member, id(getattr(obj, member))) for member in names)
    return found


def test_the_reference_targets_all_resolve() -> None:
    targets = reference_targets()
    assert any(t.path == "sqla_graphile.errors" for t in targets)
    for target in targets:
        obj, _ = resolve(target.path)
        for member in target.members or []:
            assert hasattr(obj, member), f"{target.page}: {target.path} has no {member}"


@pytest.mark.parametrize("name", sqla_graphile.__all__)
def test_every_export_imports_and_is_in_the_api_reference(name: str) -> None:
    obj = getattr(sqla_graphile, name)  # imports
    exec(f"from sqla_graphile import {name}", {})
    if name.startswith("__"):
        # Dunders (the version) are described in the package's page, not rendered.
        assert f"sqla_graphile.{name}" in (REFERENCE / "index.md").read_text(encoding="utf-8")
        return
    assert (name, id(obj)) in documented(), f"{name} is not in docs/reference/*.md"


def test_the_errors_page_draws_every_exception_in_the_hierarchy() -> None:
    page = (REFERENCE / "errors.md").read_text(encoding="utf-8")
    assert "::: sqla_graphile.errors" in page
    drawing = errors.__doc__ or ""  # rendered at the top of the page
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert re.search(rf"\b{name}\b", drawing), f"{name} is missing from the drawing"


# -- types of the public methods ------------------------------------------------------------

_NAMESPACE = {**vars(collections.abc), **vars(typing), **PUBLIC}


def _ours(obj: object) -> bool:
    return (getattr(obj, "__module__", None) or "").startswith("sqla_graphile")


def _evaluate(annotation: Any, module: str) -> Any:
    if isinstance(annotation, str):
        return eval(annotation, {**_NAMESPACE, **vars(sys.modules[module])})
    return annotation


def _classes_in(annotation: Any, into: set[type]) -> None:
    for candidate in (annotation, typing.get_origin(annotation)):
        if isinstance(candidate, type) and _ours(candidate):
            into.add(candidate)
    for argument in typing.get_args(annotation):
        _classes_in(argument, into)


def public_annotations() -> list[tuple[str, Any]]:
    """Every annotation of a public method, function or field, with where it is."""
    found: list[tuple[str, Any]] = []
    for name, obj in PUBLIC.items():
        if inspect.isfunction(obj) and _ours(obj):
            for param, annotation in obj.__annotations__.items():
                found.append((f"{name}:{param}", _evaluate(annotation, obj.__module__)))
        if not inspect.isclass(obj):
            continue
        for base in obj.__mro__:
            if not _ours(base):
                continue
            for field, annotation in vars(base).get("__annotations__", {}).items():
                if not field.startswith("_"):
                    found.append((f"{name}.{field}", _evaluate(annotation, base.__module__)))
            for attr, member in vars(base).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                function = member.fget if isinstance(member, property) else member
                function = getattr(function, "__func__", function)
                if not (inspect.isfunction(function) and _ours(function)):
                    continue
                for param, annotation in function.__annotations__.items():
                    if not param.startswith("_"):
                        label = f"{name}.{attr}:{param}"
                        found.append((label, _evaluate(annotation, function.__module__)))
    return found


def test_every_type_of_the_public_methods_is_importable_from_the_package() -> None:
    exported = {id(obj) for obj in PUBLIC.values()}
    seen: set[type] = set()
    missing: dict[str, list[str]] = {}
    for where, annotation in public_annotations():
        classes: set[type] = set()
        _classes_in(annotation, classes)
        seen |= classes
        for cls in classes:
            if id(cls) not in exported:
                missing.setdefault(f"{cls.__module__}.{cls.__qualname__}", []).append(where)
    assert missing == {}
    # The walk reaches what it must: the operator types, through methods and fields.
    for cls in ("JobState", "WorkerStats", "QueueStats", "LockHolder", "Job", "JobSpec"):
        assert PUBLIC[cls] in seen, cls


# -- the two utils twins ----------------------------------------------------------------------


def _public_methods(cls: type) -> dict[str, Any]:
    return {
        name: member
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def test_the_utils_twins_have_the_same_methods_and_signatures() -> None:
    sync = _public_methods(sqla_graphile.WorkerUtils)
    async_ = _public_methods(sqla_graphile.AsyncWorkerUtils)
    assert sorted(sync) == sorted(async_)
    assert {"add_job", "add_raw_job", "reschedule_jobs", "stats", "migrate"} <= set(sync)
    for name, method in sync.items():
        twin = async_[name]
        ours, theirs = inspect.signature(method), inspect.signature(twin)
        assert [(p.name, p.kind, p.default, p.annotation) for p in ours.parameters.values()] == [
            (p.name, p.kind, p.default, p.annotation) for p in theirs.parameters.values()
        ], name
        if twin is method:  # shared, answered without the database (``using``)
            continue
        assert inspect.iscoroutinefunction(twin), f"AsyncWorkerUtils.{name} is not async"
        assert not inspect.iscoroutinefunction(method), f"WorkerUtils.{name} is async"
        assert ours.return_annotation == theirs.return_annotation, name


def test_the_worker_has_a_blocking_and_an_async_form_of_each_run() -> None:
    worker = sqla_graphile.Worker
    for blocking, awaited in (("run", "run_async"), ("run_once", "run_once_async")):
        assert not inspect.iscoroutinefunction(getattr(worker, blocking))
        assert inspect.iscoroutinefunction(getattr(worker, awaited))
        assert inspect.signature(getattr(worker, blocking)) == inspect.signature(
            getattr(worker, awaited)
        )


# -- one exception hierarchy -------------------------------------------------------------------


def _exception_names() -> list[str]:
    return [
        name
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, BaseException)
    ]


def test_every_exception_is_exported_and_derives_from_the_base() -> None:
    names = [n for n in _exception_names() if getattr(errors, n).__module__ == errors.__name__]
    assert {"CrontabError", "BatchJobError", "JobKeyLocked", "UsageError"} <= set(names)
    for name in names:
        assert name in sqla_graphile.__all__, name
        assert name in errors.__all__, name
        cls = getattr(sqla_graphile, name)
        assert cls is getattr(errors, name)
        assert issubclass(cls, errors.GraphileWorkerError), name


def test_moved_exceptions_stay_importable_from_their_old_modules() -> None:
    from sqla_graphile.cron import CrontabError
    from sqla_graphile.worker.tasks import BatchJobError

    assert CrontabError is sqla_graphile.CrontabError
    assert BatchJobError is sqla_graphile.BatchJobError
    assert issubclass(BatchJobError, sqla_graphile.GraphileWorkerError)
    with pytest.raises(sqla_graphile.CrontabError) as raised:
        sqla_graphile.parse_crontab("* * * *  task")
    assert isinstance(raised.value, ValueError)


def test_usage_errors_are_also_the_builtins_python_code_catches() -> None:
    assert issubclass(errors.InvalidArgument, ValueError)
    assert issubclass(errors.InvalidArgumentType, TypeError)
    assert issubclass(errors.InvalidHookResult, TypeError)
    assert issubclass(errors.EventLoopAlreadyRunning, RuntimeError)
    assert issubclass(errors.InvalidSchemaName, errors.InvalidArgument)
    for cls in (errors.InvalidArgument, errors.InvalidArgumentType, errors.EventLoopAlreadyRunning):
        assert issubclass(cls, errors.UsageError)
    # A hook refusing a job is not misuse: it stays apart from the usage errors.
    assert not issubclass(errors.JobScheduleFailed, errors.UsageError)


@pytest.mark.parametrize(
    "name", ["JobState", "WorkerStats", "LockHolder", "QueueStats", "JobSpecType"]
)
def test_the_types_methods_return_are_public(name: str) -> None:
    cls = getattr(sqla_graphile, name)
    assert not any(part.startswith("_") for part in cls.__module__.split(".")), cls.__module__
    assert cls.__doc__
    from sqla_graphile import _admin

    if hasattr(_admin, name):  # kept importable for older imports
        assert getattr(_admin, name) is cls
