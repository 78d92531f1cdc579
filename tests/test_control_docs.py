"""The controller's /docs page works offline: Swagger UI's files come from the controller."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("swagger_ui_bundle")

from fastapi.testclient import TestClient  # noqa: E402

from kvcore.control.server import create_app  # noqa: E402
from kvcore.control.settings import ControllerSettings  # noqa: E402


def test_docs_page_loads_its_assets_from_the_controller() -> None:
    client = TestClient(create_app(ControllerSettings(token="t")))
    page = client.get("/docs")
    assert page.status_code == 200
    sources = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assets = [s for s in sources if s.endswith((".js", ".css"))]
    assert len(assets) >= 2, page.text
    for url in assets:
        assert url.startswith("/docs/assets/"), f"{url} is not served locally"
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 10_000, url
    assert "/openapi.json" in page.text
    spec = client.get("/openapi.json").json()
    assert spec["info"]["title"] == "kvcore controller"
    assert "/docs" not in spec["paths"] and not any("/docs/assets" in p for p in spec["paths"])
