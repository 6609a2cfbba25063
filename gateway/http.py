"""Middlewares: request ids and logging context, error rendering, bearer auth, metrics."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import orjson
import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from config.models import Client
from gateway.errors import ApiError, Forbidden, Unauthorized, Unavailable, Unprocessable

log = structlog.get_logger("fundgate.http")

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# route attribute: the scope a route needs; routes without it are public (ops, callbacks)
SCOPE_KEY = "fundgate_scope"
CLIENT_KEY = web.RequestKey("fundgate_client", Client)


def json_response(
    body: Any,
    status: int = 200,
    headers: dict[str, str] | None = None,
    *,
    sort_keys: bool = False,
) -> web.Response:
    option = orjson.OPT_NON_STR_KEYS | (orjson.OPT_SORT_KEYS if sort_keys else 0)
    return web.Response(
        body=orjson.dumps(body, option=option),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(e: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(e.body(), e.status, headers or e.headers)


def route_of(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


class Authenticator:
    """Bearer tokens checked against the configured sha256 digests in constant time."""

    def __init__(self, clients: list[Client]) -> None:
        self.clients = clients

    def client_for(self, header: str | None) -> Client | None:
        # the scheme is case-insensitive (RFC 9110 §11.1): `bearer` is `Bearer`
        if not header or header[:7].lower() != "bearer ":
            return None
        # header bytes that are not UTF-8 arrive surrogate-escaped: hash them as they came
        digest = hashlib.sha256(header[7:].strip().encode(errors="surrogateescape")).hexdigest()
        found: Client | None = None
        for c in self.clients:  # no early exit: time does not depend on which client matched
            if hmac.compare_digest(digest, c.token_sha256):
                found = c
        return found


def make_middlewares(
    auth: Authenticator, observe: Callable[[str, str, int, float], None]
) -> list[Any]:
    @web.middleware
    async def context(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        rid = rid[:64]
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=rid)
        started = time.perf_counter()
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            route = route_of(request)
            observe(route, request.method, status, time.perf_counter() - started)
        resp.headers["X-Request-Id"] = rid
        return resp

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if any("\x00" in v for v in request.match_info.values()) or any(
                "\x00" in k or "\x00" in v for k, v in request.query.items()
            ):
                raise Unprocessable("invalid_request", "path and query must not contain NUL")
            return await handler(request)
        except ApiError as e:
            return error_response(e)
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                ApiError("payload_too_large", "request body is larger than 64 KiB", status=413)
            )
        except web.HTTPException as e:
            if e.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed"}.get(e.status, "http_error")
            if e.status == 417 and e.content_type == "application/json":
                raise
            allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
            return error_response(ApiError(code, e.reason or "error", status=e.status), allow)
        except asyncpg.exceptions.TooManyConnectionsError:
            return error_response(
                Unavailable("overloaded", "database connections exhausted"), {"Retry-After": "1"}
            )
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as e:
            log.error("http.database_unavailable", error=str(e))
            return error_response(
                Unavailable("unavailable", "the database is unavailable"), {"Retry-After": "1"}
            )
        except Exception:
            log.exception("http.unhandled", path=request.path, method=request.method)
            return error_response(ApiError("internal", "internal error", status=500))

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        scope = getattr(handler, SCOPE_KEY, None)
        if scope is None:
            return await handler(request)
        client = auth.client_for(request.headers.get("Authorization"))
        if client is None:
            raise Unauthorized("unauthorized", "a valid bearer token is required")
        if scope not in client.scopes:
            raise Forbidden("forbidden", f"this token lacks the {scope!r} scope")
        request[CLIENT_KEY] = client
        return await handler(request)

    return [context, errors, authenticate]


def scoped(scope: str) -> Callable[[Handler], Handler]:
    def mark(handler: Handler) -> Handler:
        setattr(handler, SCOPE_KEY, scope)
        return handler

    return mark


async def read_model(request: web.Request, model: type[M]) -> M:
    """Parse and validate a JSON body; every failure is a 422 `invalid_request`, nothing written."""
    raw = await request.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Unprocessable("invalid_request", "body is not valid UTF-8") from e
    try:
        # orjson refuses NaN/Infinity, numbers that overflow a double and unpaired surrogates
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise Unprocessable("invalid_request", f"body is not valid JSON: {e}") from e
    problem = _unstorable(data, MAX_JSON_DEPTH)
    if problem is not None:
        raise Unprocessable("invalid_request", problem)
    if not isinstance(data, dict):
        raise Unprocessable("invalid_request", "body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        details = [
            {
                "field": ".".join(str(p) for p in err["loc"]),
                "message": err["msg"],
                "type": err["type"],
            }
            for err in e.errors(include_url=False, include_input=False)
        ]
        first = details[0]
        raise Unprocessable(
            "invalid_request", f"{first['field'] or 'body'}: {first['message']}", details=details
        ) from e


_SURROGATE = re.compile("[\ud800-\udfff]")
# deeper than any real request; PostgreSQL's jsonb and every client stay comfortable
MAX_JSON_DEPTH = 32


def _unstorable(node: Any, depth: int) -> str | None:
    """Why this JSON cannot be stored as text/jsonb (NUL characters, absurd nesting)."""
    if depth < 0:
        return "body is nested too deeply"
    if isinstance(node, str):
        if "\x00" in node:
            return "strings must not contain NUL characters"
        if _SURROGATE.search(node):
            return "strings must not contain unpaired surrogates (not valid Unicode text)"
        return None
    if isinstance(node, dict):
        for k, v in node.items():
            problem = _unstorable(k, depth) or _unstorable(v, depth - 1)
            if problem:
                return problem
    elif isinstance(node, list):
        for v in node:
            problem = _unstorable(v, depth - 1)
            if problem:
                return problem
    return None
