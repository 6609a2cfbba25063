"""Plumbing shared by the simulated banks (sandbox, signed_json, iso20022): the background
settle/callback tasks, the HTTP session for callbacks, the faults every protocol plays alike
(latency before each answer; a result callback lost, held back or sent twice), an orderly
shutdown, and serving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import aiohttp
import structlog
from aiohttp import web


class SimulatedBank:
    """Base of a simulated bank's state. `closing` releases requests the bank never answers
    (the timeout fault) when the server shuts down."""

    def __init__(
        self, name: str, callback_timeout: float, *, latency_ms: int = 0, callback_delay_ms: int = 0
    ) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None
        self._callback_timeout = callback_timeout
        self._latency_ms = latency_ms
        self._callback_delay_ms = callback_delay_ms
        self._log = structlog.get_logger(f"fundgate.{name}")
        self._name = name

    async def _latency(self) -> None:
        """The latency fault: a delay before every answer of the bank's API."""
        if self._latency_ms:
            await asyncio.sleep(self._latency_ms / 1000)

    async def _call_back(self, order: Any, order_no: str, *, lost: bool, duplicated: bool) -> None:
        """A settled order's result callback with the callback faults drawn for it: none
        (lost), or held back by the callback delay and sent once, or twice (duplicated)."""
        if lost:
            self._log.info(f"{self._name}.fault.callback_lost", order_no=order_no)
            return
        await asyncio.sleep(self._callback_delay_ms / 1000)
        for _ in range(2 if duplicated else 1):
            await self._deliver(order)

    async def _deliver(self, order: Any) -> None:
        """Send `order`'s result callback (each protocol its own)."""
        raise NotImplementedError

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._callback_timeout)
        self.session = aiohttp.ClientSession(timeout=timeout)

    async def stop(self) -> None:
        self.closing.set()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
            self.session = None


def mount(app: web.Application, bank: SimulatedBank) -> None:
    """Start and stop `bank` with `app`; release never-answered requests first on shutdown
    (before the server waits for open handlers)."""

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await bank.start()
        yield
        await bank.stop()

    async def on_shutdown(_app: web.Application) -> None:
        bank.closing.set()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(on_shutdown)


async def serve(app: web.Application, *, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve `app` until `stop` is set."""
    # handlers finish quickly once `closing` is set: no need for aiohttp's default 60 s
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await stop.wait()
    finally:
        await runner.cleanup()
