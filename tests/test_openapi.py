"""docs/openapi.json: generated from the route table create_app() builds and the models in
agent/api/schema.py; stale or missing a route, it fails here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from agent.api.routes import PUBLIC, RouteSpec
from agent.api.schema import OPERATIONS, document

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import gen_openapi  # noqa: E402


@pytest.fixture(scope="module")
def built() -> dict[str, object]:
    return gen_openapi.build()


def test_committed_document_is_current(built: dict[str, object]) -> None:
    committed = (ROOT / "docs" / "openapi.json").read_text(encoding="utf-8")
    assert committed == json.dumps(built, indent=2, ensure_ascii=False) + "\n", (
        "docs/openapi.json is out of date: run `python docs/gen_openapi.py`")


def test_every_route_of_the_app_is_documented(tmp_path: Path) -> None:
    from agent.api.routes import ROUTE_TABLE
    from agent.app import create_app, shutdown
    from agent.settings import Settings
    from agent.state import STATE

    app = create_app(Settings(home=tmp_path / "home"))
    try:
        table = dict(app[ROUTE_TABLE])
    finally:
        import asyncio

        asyncio.run(shutdown(app[STATE]))
    paths = json.loads((ROOT / "docs" / "openapi.json").read_text(encoding="utf-8"))["paths"]
    documented = {f"{m.upper()} {p}" for p, ops in paths.items() for m in ops}
    assert set(table) == documented
    for key, spec in table.items():
        op = paths[spec.path][spec.method.lower()]
        assert op["x-permission"] == spec.permission
        assert "200" in op["responses"]
        if spec.permission != PUBLIC:  # the error envelope for refusals
            assert op["responses"]["403"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorEnvelope"}, key


def test_a_route_without_an_entry_is_refused() -> None:
    async def handler(request: object) -> object:
        raise AssertionError

    extra = RouteSpec("GET", "/agent/v1/new-thing", handler, "device:read")  # type: ignore[arg-type]
    routes = {"GET /healthz": RouteSpec("GET", "/healthz", handler, PUBLIC),  # type: ignore[arg-type]
              "GET /agent/v1/new-thing": extra}
    assert "GET /agent/v1/new-thing" not in OPERATIONS
    with pytest.raises(ValueError, match="new-thing"):
        document(routes, "0")
