"""The served OpenAPI document holds for the real server: schemathesis generates requests for every REST
operation from ``GET /api/openapi.json`` and checks that none is a server error and every answer
conforms to the documented schema for its status; and the docs page renders the document offline.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from api.auth import Role
from api.openapi import REST_ROUTES
from tests.api.rest_world import World, build_world, sign_in_all, world_server
from tests.servers import Server

EXAMPLES = 12  # per operation: ~20 operations in well under a minute


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 5))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    with world_server(tmp_path_factory.mktemp("rest-openapi"), world) as srv:
        asyncio.run(sign_in_all(srv, world))
        yield srv


def _property(operation: Any, base_url: str, headers: dict[str, str], checks: list[Any]) -> Any:
    @settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy())
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=base_url, headers=headers, checks=checks)
    return check


def test_every_rest_operation_answers_as_documented_for_generated_requests(server: Server, world: World) -> None:
    schema = schemathesis.openapi.from_url(f"{server.http}/api/openapi.json")
    ours = {r.name for r in REST_ROUTES} - {"logout", "change_password"}  # they would end the credential
    headers = {"Authorization": f"Bearer {world.a.keys[Role.ADMIN]}"}
    seen = []
    for result in schema.get_all_operations():
        operation = result.ok()
        op_id = operation.definition.raw.get("operationId")
        if op_id not in ours:
            continue
        seen.append(op_id)

        # With no Telnyx configured (as here) a valid call request answers 503 by design: only its answers'
        # shapes are checked (tests/api/test_voice_calls.py places calls against a fake Telnyx).
        checks = [response_schema_conformance] if op_id == "place_call" else [not_a_server_error,
                                                                             response_schema_conformance]
        _property(operation, server.http, headers, checks)()
    assert sorted(seen) == sorted(ours)
    errors = [r for r in server.logs() if r.get("level") == "error"]
    assert errors == []


def test_the_document_lists_every_route_with_its_permission_and_the_docs_page_is_self_contained(
        server: Server) -> None:
    with urllib.request.urlopen(f"{server.http}/api/openapi.json") as r:
        doc = orjson.loads(r.read())
    assert doc["openapi"].startswith("3.1")
    ops = {(m.upper(), p): op for p, methods in doc["paths"].items() for m, op in methods.items()}
    for must in [("GET", "/api/calls/{call_id}/events"), ("POST", "/api/calls/{call_id}/sse-token"),
                 ("POST", "/api/webrtc/offer"), ("DELETE", "/api/webrtc/sessions/{session_id}"),
                 ("GET", "/api/stats"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/api/media/telnyx")]:
        assert must in ops
    assert ops[("GET", "/api/audit")]["x-roles"] == ["admin", "owner"]
    assert ops[("POST", "/api/auth/login")]["security"] == []
    with urllib.request.urlopen(f"{server.http}/api/docs") as r:
        page = r.read().decode()
        csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "<script>" not in page and "http" not in page.replace("http-equiv", "")
    with urllib.request.urlopen(f"{server.http}/api/docs/static/docs.js") as r:
        assert b"/api/openapi.json" in r.read()


async def test_the_docs_page_renders_every_operation_in_a_browser_offline(server: Server, tmp_path: Path) -> None:
    """Headless Chromium, no network but this server: the page renders under its CSP with no error."""
    from playwright.async_api import async_playwright

    from tests.test_browser_console import CHROMIUM, CHROMIUM_ARGS

    async with async_playwright() as pw:
        ctx = await pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                          headless=True, args=list(CHROMIUM_ARGS))
        try:
            page = ctx.pages[0] if ctx.pages else await ctx.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            outside: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(server.http) else outside.append(r.url))
            await page.goto(f"{server.http}/api/docs")
            await page.wait_for_selector('body[data-state="rendered"]', timeout=15_000)
            sections = await page.locator("section.op").count()
            audit = await page.inner_text("#list_audit")
        finally:
            await ctx.close()
    url = f"{server.http}/api/openapi.json"
    doc = await asyncio.to_thread(lambda: orjson.loads(urllib.request.urlopen(url).read()))
    assert sections == sum(len(methods) for methods in doc["paths"].values())
    assert "roles: admin, owner (audit.read)" in audit and "/api/audit" in audit
    assert problems == [] and outside == []
