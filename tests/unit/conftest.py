"""Unit tests need no PostgreSQL: asking for a database here is an error."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def server_url() -> None:
    raise AssertionError("unit tests run without PostgreSQL; move this test to integration/")
