"""The OpenAPI 3.1 document, generated from the route table and the pydantic models, so the
routes, their validation and their documentation cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import HttpVersion11, web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.schemas import ErrorOut

Handler = Any


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # path | query | header
    schema: dict[str, Any]
    required: bool = False
    description: str = ""


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    scope: str | None = None
    body: type[BaseModel] | None = None
    responses: dict[int, type[BaseModel] | str | None] = field(default_factory=dict)
    params: tuple[Param, ...] = ()
    raw_body: str | None = None  # media type of a body the handler reads itself


async def expect_continue(request: web.Request) -> None:
    """`Expect: 100-continue` is honoured; any other expectation is a 417 in the error shape
    (aiohttp's default answers in plain text, before any middleware)."""
    expect = request.headers.get("EXPECT", "")
    if expect.lower() == "100-continue":
        if request.version == HttpVersion11 and request.writer is not None:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return
    body = b'{"error":{"code":"expectation_failed","message":"only 100-continue is supported",'
    body += b'"details":null}}'
    raise web.HTTPExpectationFailed(body=body, content_type="application/json")


def add_routes(app: web.Application, routes: list[Route]) -> None:
    for r in routes:
        app.router.add_route(r.method, r.path, r.handler, expect_handler=expect_continue)


ERRORS = {
    401: "missing or invalid bearer token",
    403: "the token lacks the scope",
    413: "body larger than 64 KiB",
    422: "invalid request or a business rule refused it",
    503: "overloaded or the database is unavailable; retry after `Retry-After` seconds",
}


def document(routes: list[Route], *, version: str) -> dict[str, Any]:
    models: set[type[BaseModel]] = {ErrorOut}
    for r in routes:
        if r.body is not None:
            models.add(r.body)
        models.update(m for m in r.responses.values() if isinstance(m, type))
    ordered = sorted(models, key=lambda m: m.__name__)
    refs, schema = models_json_schema(
        [(m, "validation" if _is_body(m, routes) else "serialization") for m in ordered],
        ref_template="#/components/schemas/{model}",
    )

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        mode = "validation" if _is_body(model, routes) else "serialization"
        return refs[(model, mode)]  # type: ignore[index]

    paths: dict[str, Any] = {}
    for r in routes:
        op: dict[str, Any] = {"summary": r.summary, "operationId": r.handler.__name__}
        params = [
            {
                "name": p.name,
                "in": p.where,
                "required": p.required or p.where == "path",
                "schema": p.schema,
                **({"description": p.description} if p.description else {}),
            }
            for p in r.params
        ]
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(r.body)}},
            }
        elif r.raw_body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {r.raw_body: {"schema": {"type": "string"}}},
            }
        responses: dict[str, Any] = {}
        for status, model in sorted(r.responses.items()):
            if isinstance(model, type):
                responses[str(status)] = {
                    "description": model.__doc__ or model.__name__,
                    "content": {"application/json": {"schema": ref(model)}},
                }
            elif isinstance(model, str):
                responses[str(status)] = {
                    "description": model,
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            else:
                responses[str(status)] = {"description": "no content"}
        for status, text in ERRORS.items():
            if r.scope is None and status in (401, 403):
                continue
            responses.setdefault(
                str(status),
                {
                    "description": text,
                    "content": {"application/json": {"schema": ref(ErrorOut)}},
                },
            )
        op["responses"] = responses
        if r.scope is not None:
            op["security"] = [{"bearer": [r.scope]}]
            op["description"] = f"Needs scope `{r.scope}`."
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fundgate",
            "version": version,
            "description": "Fund-routing gateway: loan disbursements to licensed funders.",
        },
        "paths": paths,
        "components": {
            "schemas": schema.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _is_body(model: type[BaseModel], routes: list[Route]) -> bool:
    return any(r.body is model for r in routes)
