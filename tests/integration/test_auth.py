"""Bearer authentication of the lending-core API, in-process with warnings as errors."""

from __future__ import annotations

import hashlib

import pytest
from aiohttp.web_request import BaseRequest

from config.models import Client
from gateway.http import CLIENT_KEY
from tests.integration.conftest import AUTH, StartGateway, make_config

pytestmark = pytest.mark.integration


@pytest.mark.asyncio
async def test_the_first_authenticated_request_of_a_process_succeeds_with_warnings_as_errors(
    start_gateway: StartGateway,
) -> None:
    # aiohttp warns once per process about a str request key; forget that it already did
    BaseRequest._seen_str_keys.discard(CLIENT_KEY)
    h = await start_gateway(role="api")
    resp = await h.client.get("/v1/funders", headers=AUTH)
    assert resp.status == 200, await resp.text()


@pytest.mark.asyncio
async def test_a_request_without_a_valid_token_is_401_and_without_the_scope_403(
    start_gateway: StartGateway,
) -> None:
    base = make_config(None)
    reader = Client(
        name="reader", token_sha256=hashlib.sha256(b"reader-token").hexdigest(), scopes=["read"]
    )
    h = await start_gateway(
        role="api", cfg=base.model_copy(update={"clients": [*base.clients, reader]})
    )
    assert (await h.client.get("/v1/funders")).status == 401
    bad = {"Authorization": "Bearer wrong-token"}
    assert (await h.client.get("/v1/funders", headers=bad)).status == 401
    read_only = {"Authorization": "Bearer reader-token"}
    assert (await h.client.get("/v1/funders", headers=read_only)).status == 200
    resp = await h.client.post("/v1/disbursements", json={}, headers=read_only)
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "forbidden"


@pytest.mark.asyncio
async def test_the_bearer_scheme_is_matched_without_regard_to_case(
    start_gateway: StartGateway,
) -> None:
    # RFC 9110 §11.1: an authentication scheme is case-insensitive
    h = await start_gateway(role="api")
    token = AUTH["Authorization"].split(" ", 1)[1]
    for scheme in ("bearer", "BEARER"):
        resp = await h.client.get("/v1/funders", headers={"Authorization": f"{scheme} {token}"})
        assert resp.status == 200, await resp.text()
    resp = await h.client.get("/v1/funders", headers={"Authorization": f"Basic {token}"})
    assert resp.status == 401
