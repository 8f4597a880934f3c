"""Fixtures shared by the reliability tests."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from .harness import setup_business


@pytest.fixture
def business(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """The test database with an empty business table (no unique key)."""
    setup_business(conn)
    return conn
