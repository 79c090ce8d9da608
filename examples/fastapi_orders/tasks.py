"""The service's jobs: a typed task whose instance is its payload.

``graphile-worker run --tasks fastapi_orders.tasks`` (from ``examples/``) runs them, as
does ``python -m fastapi_orders.worker``. A handler needs no engine of its own: it writes
through the worker's, ``ctx.utils.bind``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sqlalchemy import func, update
from sqlalchemy.orm import Session

from sqla_graphile import TaskHandler, WorkerContext

from .models import Order


@dataclass
class SendOrderEmail(TaskHandler):
    """Email the customer that their order is confirmed."""

    IDENTIFIER: ClassVar[str] = "send_order_email"

    order_id: int
    to: str

    def run(self, ctx: WorkerContext) -> None:
        """Send the email and note it on the order."""
        # A real service would call its mail provider here; raising fails the job,
        # and the worker retries it with exponential backoff.
        ctx.logger.info("sending the confirmation of order %d to %s", self.order_id, self.to)
        # The worker's own engine, whichever way the worker was started.
        with Session(ctx.utils.bind) as session, session.begin():
            session.execute(
                update(Order)
                .where(Order.id == self.order_id)
                .values(confirmation_sent_at=func.now())
            )


tasks = [SendOrderEmail]
