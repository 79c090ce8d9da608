"""``POST /orders`` writes an order and enqueues its confirmation email in one transaction.

Run it from ``examples/`` with ``uvicorn --factory fastapi_orders.app:create_app``
(``DATABASE_URL`` set, the worker schema migrated with ``graphile-worker migrate``), and
its worker beside it with ``graphile-worker run --tasks fastapi_orders.tasks``; see
``examples/README.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from sqla_graphile import WorkerUtils

from .models import Base, Order, engine_for, settings
from .tasks import SendOrderEmail


class OrderIn(BaseModel):
    """The request body of ``POST /orders``."""

    email: str
    item: str
    quantity: int = Field(gt=0)
    card_token: str = "tok_visa"


class OrderOut(BaseModel):
    """The created order and its email job."""

    id: int
    job_id: int


class PaymentDeclined(Exception):
    """The payment provider refused the card."""


def charge_card(token: str, order: Order) -> None:
    """A stand-in for the payment provider: ``tok_declined`` is refused."""
    if token == "tok_declined":
        raise PaymentDeclined(f"card declined for order {order.id}")


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, closed after it (rolling back anything uncommitted)."""
    with Session(request.app.state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def create_app(database_url: str | None = None, schema: str | None = None) -> FastAPI:
    """The service, on ``database_url`` and ``schema`` (default: from the environment)."""
    url, worker_schema = settings(database_url, schema)
    engine = engine_for(url)
    Base.metadata.create_all(engine)  # the example's own table; use Alembic in production
    app = FastAPI(title="orders")
    # One long-lived WorkerUtils; each request binds it to its own session.
    app.state.engine = engine
    app.state.jobs = WorkerUtils(engine, worker_schema)

    @app.post("/orders", status_code=201)
    def create_order(body: OrderIn, session: SessionDep, request: Request) -> OrderOut:
        jobs = request.app.state.jobs.using(session)
        try:
            with session.begin():  # commits on success, rolls back on any exception
                order = Order(email=body.email, item=body.item, quantity=body.quantity)
                session.add(order)
                session.flush()  # the order gets its id
                job = jobs.add_job(SendOrderEmail(order_id=order.id, to=order.email))
                charge_card(body.card_token, order)
                created = OrderOut(id=order.id, job_id=job.id)
        except PaymentDeclined as exc:
            # The order and its email job were rolled back together.
            raise HTTPException(status_code=402, detail=str(exc)) from exc
        return created

    return app
