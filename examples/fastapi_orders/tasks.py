"""The service's jobs: a typed task whose instance is its payload."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sqlalchemy import func, update
from sqlalchemy.orm import Session, sessionmaker

from sqla_graphile import TaskHandler, WorkerContext

from .models import Order

# Bound to the database by the worker's entry point (see worker.py).
Sessions: sessionmaker[Session] = sessionmaker()


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
        with Sessions.begin() as session:
            session.execute(
                update(Order)
                .where(Order.id == self.order_id)
                .values(confirmation_sent_at=func.now())
            )


tasks = [SendOrderEmail]
