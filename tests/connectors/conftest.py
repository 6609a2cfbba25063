"""Fixtures shared by the connector suites."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest_asyncio


@pytest_asyncio.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """A plain httpx client, as the gateway hands one to every connector."""
    async with httpx.AsyncClient() as c:
        yield c
