"""Recurring jobs: Node graphile-worker's crontab, its matcher and its scheduler.

A crontab is text in the format of Node graphile-worker 0.18, one item a line::

    # ┌───────── minute (0-59)
    # │ ┌─────── hour (0-23)
    # │ │ ┌───── day of month (1-31)
    # │ │ │ ┌─── month (1-12)
    # │ │ │ │ ┌─ day of week (0-6, 0 and 7 = Sunday)
      0 4 * * * send_digest ?fill=2d&max=10 {onboarding: false}
      */15 * * * 1-5 poll_feeds ?id=feeds&queue=feeds&priority=-1

Each field is a comma list of numbers, ``a-b`` ranges, ``*`` and ``*/n`` (steps apply to
``*`` only, as in Node); then the task identifier; then optional query-string options
(``id``, ``fill``, ``max``, ``queue``, ``jobKey``, ``jobKeyMode``, ``priority``); then an
optional JSON5 object payload on the same line (comments, unquoted keys, single quotes,
trailing commas, hexadecimal numbers; ``NaN`` and ``Infinity`` are refused since JSON
cannot hold them, and NUL characters since PostgreSQL cannot). Times are UTC. The same
items can be written in Python::

    Cron("0 4 * * *", task="send_digest", fill=timedelta(days=2), max_attempts=10,
         payload={"onboarding": False})

Beyond Node, an item may carry a time zone (``Cron(..., timezone="Europe/Paris")``, or the
``tz=Europe/Paris`` option in text, which Node does not read): its fields are then read on
that zone's wall clock. Jobs are still stamped with UTC instants.

:class:`CronScheduler` schedules the items as Node's cron does, sharing
``_private_known_crontabs`` with any Node or Python process on the same schema, so that
each minute of an item is scheduled once between them all.
"""

from __future__ import annotations

# The package: fields (the time fields, matching a minute), item (Cron, CronInfo),
# crontab (crontab text, its JSON5 payloads, load_crontab), sql (the scheduler's
# statements) and scheduler (CronScheduler and its events).
from ..durations import TIME_UNITS as TIME_UNITS
from ..durations import parse_time_phrase
from ..errors import CrontabError
from .crontab import CrontabSource, load_crontab, parse_crontab, parse_crontab_file
from .fields import ONE_MINUTE as ONE_MINUTE
from .item import CRON_KEY, Cron, CronInfo, format_timestamp
from .scheduler import Clock as Clock
from .scheduler import ConnectionFactory as ConnectionFactory
from .scheduler import CronJobScheduledEvent, CronScheduler, CronTickEvent
from .scheduler import Sleep as Sleep

__all__ = [
    "CRON_KEY",
    "Cron",
    "CronInfo",
    "CronJobScheduledEvent",
    "CronScheduler",
    "CronTickEvent",
    "CrontabError",
    "CrontabSource",
    "format_timestamp",
    "load_crontab",
    "parse_crontab",
    "parse_crontab_file",
    "parse_time_phrase",
]
