"""The ``graphile-worker`` command line (also ``python -m sqla_graphile``).

Exit status: 0 on success; 1 on a runtime error (one line on stderr, ``--verbose`` adds
the traceback), on a job or worker named that does not exist (nothing is changed then),
and on an internal error (a bug: always with its traceback); 2 on a usage error; 57 when
the database's worker schema is newer than this library. With ``--json`` the output is
JSON and so is an error (one object on stderr). No password of the database URL is ever
printed. The rules, case by case, are in the CLI reference (``docs/cli.md``).

The group and its shared state are in :mod:`.app`, error reporting in :mod:`.errors`,
option types in :mod:`.params`; the commands in :mod:`.jobs`, :mod:`.admin` and
:mod:`.run`, each registering itself on :func:`main` when imported here.
"""

from __future__ import annotations

# Imported for their commands, which they add to ``main``.
from . import admin, dashboard, jobs, run  # noqa: F401
from .app import SUPPORTED_URLS, main
from .errors import EXIT_BREAKING_MIGRATION
from .params import parse_duration, parse_time

__all__ = ["EXIT_BREAKING_MIGRATION", "SUPPORTED_URLS", "main", "parse_duration", "parse_time"]
