"""Every ```python block of the documentation runs as written, against a real PostgreSQL.

The blocks of README.md, examples/README.md and docs/**/*.md are run page by page, in
the order they appear, each page on its own fresh database whose default worker schema
is migrated, with ``DATABASE_URL`` (a ``postgresql+psycopg://`` URL) in the environment
and a temporary directory as the working directory.

A block runs in a namespace of its own unless its first line is a comment starting with
``# Continues``: such a block says so to the reader and runs in the page's namespace,
which holds every name the blocks before it on that page defined. A block that cannot
run here is preceded by ``<!-- not-run: reason -->`` (or written in another fence
language such as ``text``); those are counted and reported.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import traceback
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from sqla_graphile import Worker, WorkerUtils, migrate
from sqla_graphile._urls import engine_from_url

ROOT = Path(__file__).resolve().parents[2]
PAGES = [
    ROOT / "README.md",
    ROOT / "examples" / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
]

#: Blocks that may be exempted, at most: exemptions are for what cannot run here at all.
MAX_EXEMPTIONS = 3

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:(?P<reason>.*?)-->\s*$")
CONTINUES = re.compile(r"^# Continues\b")
#: Fence languages a reader takes for Python but that this test would not run.
PYTHON_ALIASES = {"py", "python3", "py3", "pycon", "ipython", "pyi"}


class DocsExemption(UserWarning):
    """A documentation block that is not run, with its reason."""


@dataclass(frozen=True)
class Block:
    """One fenced block of a page."""

    page: Path
    line: int  # the line of the opening fence, counted from 1
    language: str
    code: str
    not_run: str | None  # the reason given in a preceding not-run comment

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}, block at line {self.line}"

    @property
    def continues(self) -> bool:
        first = next((line for line in self.code.splitlines() if line.strip()), "")
        return bool(CONTINUES.match(first))


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of a page, dedented to their fence's indentation."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        info = opening["info"].strip()
        body: list[str] = []
        end = index + 1
        while end < len(lines):
            closing = FENCE.match(lines[end])
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            line = lines[end]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            end += 1
        previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = NOT_RUN.match(previous)
        blocks.append(
            Block(
                page=page,
                line=index + 1,
                language=info.split()[0].lower() if info else "",
                code="\n".join(body) + "\n",
                not_run=marker["reason"].strip() if marker else None,
            )
        )
        index = end + 1
    return blocks


def python_blocks(page: Path) -> list[Block]:
    return [block for block in blocks_of(page) if block.language == "python"]


def runnable_pages() -> list[Path]:
    return [
        page
        for page in PAGES
        if page.exists() and any(b.not_run is None for b in python_blocks(page))
    ]


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.fixture
def page_database_url(server_url: str) -> Iterator[str]:
    """A fresh database with the default worker schema migrated, as a psycopg 3 URL."""
    name = f"sqla_graphile_docs_{os.getpid()}_{secrets.token_hex(3)}"
    admin = engine_from_url(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'create database "{name}"'))
    url = (
        make_url(server_url)
        .set(drivername="postgresql+psycopg", database=name)
        .render_as_string(hide_password=False)
    )
    engine = engine_from_url(url)
    try:
        migrate(engine)
        engine.dispose()
        yield url
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'drop database if exists "{name}" with (force)'))
        admin.dispose()


def _module(name: str) -> types.ModuleType:
    """A module registered in ``sys.modules``: dataclasses and pydantic look classes up there."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    return module


def _release(namespace: dict[str, object]) -> None:
    """Close what a page's blocks left open (engines, utils, workers)."""
    for value in namespace.values():
        if isinstance(value, Engine):
            value.dispose()
        elif isinstance(value, (WorkerUtils, Worker)):
            value.close()


@pytest.mark.timeout(300)  # a block that starts a worker must end it
@pytest.mark.parametrize("page", runnable_pages(), ids=page_id)
def test_python_blocks_run(
    page: Path, page_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", page_database_url)
    monkeypatch.delenv("GRAPHILE_WORKER_SCHEMA", raising=False)
    monkeypatch.chdir(tmp_path)
    # The page's namespace: what every block so far defined. A block that continues runs
    # in it; any other runs in a fresh module (so it cannot lean on names silently) whose
    # names are then added to it.
    page_module = _module("docs_page")
    modules = [page_module]
    ran = 0
    try:
        for block in python_blocks(page):
            if block.not_run is not None:
                continue
            if block.continues:
                assert ran, f"{block.where} continues, but no block ran before it"
                module = page_module
            else:
                module = _module(f"docs_block_{block.line}")
                modules.append(module)
            # Padded so that tracebacks give the markdown file's own line numbers.
            source = "\n" * (block.line) + block.code
            try:
                code = compile(source, str(page), "exec", dont_inherit=True)
                exec(code, module.__dict__)
            except Exception:
                pytest.fail(f"{block.where} failed:\n{traceback.format_exc()}")
            if module is not page_module:
                page_module.__dict__.update(
                    (name, value)
                    for name, value in module.__dict__.items()
                    if not name.startswith("__")
                )
            ran += 1
    finally:
        for each in modules:
            _release(each.__dict__)
            sys.modules.pop(each.__name__, None)
    assert ran > 0


def test_exemptions_are_marked_with_a_reason_and_few() -> None:
    exempt = [b for page in PAGES if page.exists() for b in python_blocks(page) if b.not_run]
    for block in exempt:
        assert block.not_run, f"{block.where}: a not-run comment needs a reason"
    assert len(exempt) <= MAX_EXEMPTIONS, "\n".join(f"{b.where}: {b.not_run}" for b in exempt)
    runnable = sum(
        1 for page in PAGES if page.exists() for b in python_blocks(page) if b.not_run is None
    )
    warnings.warn(
        DocsExemption(
            f"{runnable} Python blocks run, {len(exempt)} exempted: "
            + "; ".join(f"{b.where} ({b.not_run})" for b in exempt)
        ),
        stacklevel=1,
    )


def test_not_run_comments_precede_python_blocks() -> None:
    # A not-run comment before anything but a Python block would exempt nothing, silently.
    for page in PAGES:
        if not page.exists():
            continue
        lines = page.read_text(encoding="utf-8").splitlines()
        marked = {i + 1 for i, line in enumerate(lines) if NOT_RUN.match(line)}
        for block in blocks_of(page):
            if block.not_run is not None:
                before = max(n for n in marked if n < block.line)
                marked.discard(before)
                assert block.language == "python", f"{block.where}: not-run before non-Python"
        assert not marked, f"{page_id(page)}: not-run comments before no block: lines {marked}"


def test_python_blocks_are_fenced_as_python() -> None:
    for page in PAGES:
        if not page.exists():
            continue
        for block in blocks_of(page):
            assert block.language not in PYTHON_ALIASES, (
                f"{block.where}: fenced as {block.language!r}; use python (run by this test)"
                " or text"
            )


def test_the_pages_are_found() -> None:
    # The parametrization above would silently shrink if pages moved.
    names = {page_id(page) for page in runnable_pages()}
    assert {"README.md", "docs/quickstart.md", "docs/testing.md"} <= names


# -- the configuration reference -----------------------------------------------------------

CONFIGURATION = ROOT / "docs" / "configuration.md"
ENV_READ = re.compile(
    r"""environ\.get\(\s*["']([A-Z][A-Z0-9_]*)["']"""
    r"""|environ\[\s*["']([A-Z][A-Z0-9_]*)["']\s*\]"""
    r"""|getenv\(\s*["']([A-Z][A-Z0-9_]*)["']"""
    r"""|envvar\s*=\s*["']([A-Z][A-Z0-9_]*)["']"""
)
ENV_LIST = re.compile(r"envvar\s*=\s*\[([^\]]*)\]")


def table_names(heading: str) -> set[str]:
    """The names in the first column (`name`) of the table under a ``## heading``."""
    text_ = CONFIGURATION.read_text(encoding="utf-8")
    start = text_.index(f"\n## {heading}\n")
    end = text_.find("\n## ", start + 1)
    section = text_[start : end if end != -1 else len(text_)]
    return set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE))


def test_configuration_lists_every_worker_option() -> None:
    import inspect

    parameters = set(inspect.signature(Worker.__init__).parameters) - {"self"}
    assert parameters - table_names("`Worker`") == set()


def test_configuration_lists_every_recovery_field() -> None:
    import dataclasses

    from sqla_graphile import WorkerRecoveryConfig

    fields = {f.name for f in dataclasses.fields(WorkerRecoveryConfig)}
    assert fields - table_names("`WorkerRecoveryConfig`") == set()


def test_configuration_lists_every_utils_option() -> None:
    import inspect

    parameters = {
        name
        for name in inspect.signature(WorkerUtils.__init__).parameters
        if name != "self" and not name.startswith("_")
    }
    assert parameters - table_names("`WorkerUtils` and `AsyncWorkerUtils`") == set()


def test_configuration_lists_every_environment_variable() -> None:
    read: set[str] = set()
    for source in (ROOT / "sqla_graphile").rglob("*.py"):
        code = source.read_text(encoding="utf-8")
        for match in ENV_READ.finditer(code):
            read.update(name for name in match.groups() if name)
        for listed in ENV_LIST.finditer(code):
            read.update(re.findall(r"""["']([A-Z][A-Z0-9_]*)["']""", listed[1]))
    assert {"DATABASE_URL", "GRAPHILE_WORKER_SCHEMA"} <= read  # the scan itself works
    assert read - table_names("Environment variables") == set()
