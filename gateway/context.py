"""What the handlers and workers share, built once in `gateway.app.create_app`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import asyncpg
import httpx

from config.models import FileConfig, Funder
from connectors.base import BankConnector
from gateway.metrics import Metrics


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Services:
    cfg: FileConfig
    pool: asyncpg.Pool
    connectors: dict[str, BankConnector]
    metrics: Metrics
    http: httpx.AsyncClient
    clock: Callable[[], datetime] = utcnow
    funders: dict[str, Funder] = field(init=False)

    def __post_init__(self) -> None:
        self.funders = {f.id: f for f in self.cfg.funders}

    def business_day(self, at: datetime | None = None) -> date:
        return (at or self.clock()).astimezone(self.cfg.gateway.zone).date()

    def callback_url(self, funder_id: str) -> str:
        return f"{self.cfg.gateway.public_url.rstrip('/')}/v1/callbacks/{funder_id}"
