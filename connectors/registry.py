"""Connectors are plugins: entry points in group `fundgate.connectors`."""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import cast

import httpx

from config.loader import CONNECTOR_GROUP
from config.models import FileConfig, Funder
from connectors.base import BankConnector, ConnectorFactory


def available() -> dict[str, ConnectorFactory]:
    return {
        ep.name: cast(ConnectorFactory, ep.load()) for ep in entry_points(group=CONNECTOR_GROUP)
    }


def build(funder: Funder, client: httpx.AsyncClient) -> BankConnector:
    factories = available()
    try:
        factory = factories[funder.connector]
    except KeyError:
        raise ValueError(f"unknown connector {funder.connector!r}") from None
    return factory(funder, client)


def build_all(cfg: FileConfig, client: httpx.AsyncClient) -> dict[str, BankConnector]:
    return {f.id: build(f, client) for f in cfg.funders}


async def check_options(funders: Iterable[tuple[int, Funder]]) -> list[str]:
    """Build each funder's connector once, without I/O, to surface option errors; `funders`
    are the entries with their index in the file's `[[funders]]`."""
    errors: list[str] = []
    factories = available()
    async with httpx.AsyncClient() as client:
        for i, f in funders:
            factory = factories.get(f.connector)
            if factory is None:
                continue
            try:
                factory(f, client)
            except ValueError as e:
                errors.append(f"funders[{i}] ({f.id}).connector_options: {e}")
    return errors
