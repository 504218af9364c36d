"""The read-only DLQ web page, served on loopback and loaded in headless Chromium.

Chromium is part of the test setup (`./dev setup` installs Debian's `chromium`); without it these tests
fail rather than skip.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web
from rigs.dlq import letter, put
from rigs.kafka import LoopThread
from rigs.page import chromium, rows

from pipeline.config import Settings
from pipeline.ops.dlq_page import make_app
from pipeline.records import DeadLetter, FieldError


@pytest.fixture
def letters(settings: Settings) -> list[DeadLetter]:
    """Three dead letters; one has field errors and a body that tries to inject a script."""
    made = [
        letter(settings, "segment", "acme", "missing_user_identity", offset=1, index=2),
        letter(
            settings,
            "customerglu",
            "acme",
            "invalid_json",
            "parse",
            offset=2,
            index=None,
            body=b"not json at all",
        ),
    ]
    hostile = b'{"event_name": "<script>alert(1)</script>", "user_id": "u_1"}'
    errors = (FieldError(path="timestamp", message="Input should have timezone info"),)
    made.append(
        letter(
            settings,
            "customerglu",
            "globex",
            "validation_failed",
            "validate",
            offset=3,
            index=None,
            body=hostile,
        ).model_copy(update={"errors": errors})
    )
    put(settings, made)
    return made


@pytest.fixture
def page_url(settings: Settings, loop_thread: LoopThread) -> Iterator[str]:
    """make_app(settings) on an ephemeral loopback port; cleaned up after the test."""

    async def start() -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(make_app(settings))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, runner.addresses[0][1]

    runner, port = loop_thread.run(start())
    yield f"http://127.0.0.1:{port}"
    loop_thread.run(runner.cleanup())


def status_of(url: str) -> int:
    async def get() -> int:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status

    return asyncio.run(get())


def test_the_list_loads_and_a_filter_url_filters(
    page_url: str, letters: list[DeadLetter], tmp_path: Path
) -> None:
    """The list shows every dead letter newest first with a filter form; a filter URL shows only matches."""
    dom = chromium(tmp_path, page_url + "/", "--dump-dom")
    assert "Dead letters on" in dom and '<form method="get" action="/">' in dom
    shown = rows(dom)
    assert [next(d.id for d in letters if d.id in row) for row in shown] == [d.id for d in reversed(letters)]
    filtered = chromium(
        tmp_path,
        page_url + "/?" + urlencode({"source": "customerglu", "reason": "invalid_json"}),
        "--dump-dom",
    )
    assert [letters[1].id in row for row in rows(filtered)] == [True]
    assert '<option value="invalid_json" selected="">' in filtered  # the form keeps the filter
    by_tenant = chromium(tmp_path, page_url + "/?tenant=globex&stage=validate", "--dump-dom")
    assert len(rows(by_tenant)) == 1 and letters[2].id in by_tenant
    nothing = chromium(tmp_path, page_url + "/?tenant=nobody", "--dump-dom")
    assert rows(nothing) == [] and "no dead letters match" in nothing


def test_the_detail_view_shows_reason_errors_headers_and_body_escaped(
    page_url: str, letters: list[DeadLetter], tmp_path: Path
) -> None:
    """The detail page shows the reason, field errors, raw headers and the pretty body, all as text."""
    target = letters[2]
    dom = chromium(tmp_path, f"{page_url}/letters/{target.id}", "--dump-dom")
    for text in (
        target.id,
        "validation_failed",
        "Input should have timezone info",
        "hw-request-id",
        target.headers["hw-request-id"],
        target.origin.ref(),
        '"user_id": "u_1"',
    ):
        assert text in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "<script" not in dom  # the body's markup is text, not an element
    raw = chromium(tmp_path, f"{page_url}/letters/{letters[1].id}", "--dump-dom")
    assert "not json at all" in raw and "not JSON" in raw
    assert status_of(f"{page_url}/letters/dl_{'0' * 24}") == 404
    assert status_of(f"{page_url}/letters/%3Cb%3E") == 404
    assert status_of(f"{page_url}/?since=yesterday-ish") == 400


def test_a_screenshot_of_the_page_is_a_valid_png(
    page_url: str, letters: list[DeadLetter], tmp_path: Path
) -> None:
    """Chromium renders the list into a PNG of the requested size."""
    shot = tmp_path / "dlq.png"
    chromium(tmp_path, page_url + "/", f"--screenshot={shot}", "--window-size=1280,800", "--hide-scrollbars")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    assert data[12:16] == b"IHDR" and struct.unpack(">II", data[16:24]) == (1280, 800)


def test_make_app_is_an_aiohttp_application(settings: Settings) -> None:
    """make_app returns an aiohttp Application with the list and detail routes."""
    app = make_app(settings)
    assert isinstance(app, web.Application)
    assert {r.resource.canonical for r in app.router.routes() if r.resource is not None} >= {
        "/",
        "/letters/{id}",
    }
