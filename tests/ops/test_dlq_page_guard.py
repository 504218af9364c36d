"""Who may see the DLQ page, and what every answer carries: real HTTP, real broker.

A worker or `headwater dlq page` on a non-loopback address serves the page only with `dlq.page_token`;
with a token every page request needs it (Bearer, or basic auth with the token as password).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner
from rigs.dlq import letter, put
from rigs.kafka import LoopThread, WorkerProcess, toml_text, wait_for
from rigs.page import chromium, rows

from pipeline.cli import main
from pipeline.config import Settings
from pipeline.kafka.local import free_port
from pipeline.ops.dlq_page import STYLE, is_loopback, make_app, refusal
from pipeline.records import DeadLetter

TOKEN = "page-token-0123456789abcdef"


def get(
    url: str, authorization: str | None = None, host: str | None = None
) -> tuple[int, dict[str, str], str]:
    """GET url -> (status, headers, text); `host` replaces the Host header (a rebound name)."""

    async def run() -> tuple[int, dict[str, str], str]:
        headers = {"Authorization": authorization} if authorization else {}
        if host is not None:
            headers["Host"] = host
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
            return response.status, dict(response.headers), await response.text()

    return asyncio.run(run())


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def stored(settings: Settings) -> DeadLetter:
    made = letter(settings, "segment", "acme", "missing_user_identity", offset=1, index=2)
    put(settings, [made])
    return made


def serve(loop_thread: LoopThread, settings: Settings, host: str = "127.0.0.1") -> int:
    """make_app(settings) on an ephemeral port of `host`; returns the port (stopped with the loop)."""
    from aiohttp import web

    async def start() -> int:
        runner = web.AppRunner(make_app(settings))
        await runner.setup()
        site = web.TCPSite(runner, host, 0)
        await site.start()
        return int(runner.addresses[0][1])

    return int(loop_thread.run(start()))


class TestAddresses:
    @pytest.mark.parametrize(
        ("host", "loopback"),
        [
            ("127.0.0.1", True),
            ("127.0.0.53", True),
            ("::1", True),
            ("[::1]", True),
            ("localhost", True),
            ("0.0.0.0", False),
            ("::", False),
            ("", False),
            ("10.0.0.5", False),
            ("dlq.example.com", False),
        ],
    )
    def test_only_loopback_addresses_count_as_loopback(self, host: str, loopback: bool) -> None:
        """0.0.0.0, ::, the empty host and names other than localhost are not loopback."""
        assert is_loopback(host) is loopback

    def test_a_non_loopback_address_is_refused_only_without_a_token(
        self, make_settings: Callable[..., Settings]
    ) -> None:
        """refusal() gives a one-line reason for 0.0.0.0 without a token, and nothing with one or on
        loopback."""
        bare, with_token = make_settings().dlq, make_settings(dlq={"page_token": TOKEN}).dlq
        reason = refusal("0.0.0.0", bare)
        assert reason is not None and "\n" not in reason and "dlq.page_token" in reason
        assert refusal("0.0.0.0", with_token) is None and refusal("127.0.0.1", bare) is None


def test_dlq_page_on_a_non_loopback_host_without_a_token_refuses_to_start(
    settings: Settings, tmp_path: Path
) -> None:
    """`headwater dlq page --host 0.0.0.0` without dlq.page_token exits 1 with one line naming the setting."""
    config = tmp_path / "headwater.toml"
    config.write_text(toml_text(settings))
    result = CliRunner().invoke(
        main, ["--config", str(config), "dlq", "page", "--host", "0.0.0.0", "--port", str(free_port())]
    )
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "refusing to serve dead letters on 0.0.0.0" in lines[0]


def test_with_a_token_the_page_needs_it_as_bearer_or_basic_password(
    make_settings: Callable[..., Settings], loop_thread: LoopThread, tmp_path: Path
) -> None:
    """No or a wrong credential: 401 with a basic-auth challenge and no dead letter; Bearer <token> or basic
    auth with any user and the token: the page. Chromium logs in with the token in the URL."""
    settings = make_settings(dlq={"page_token": TOKEN})
    made = letter(settings, "segment", "acme", "missing_user_identity", offset=1, index=2)
    put(settings, [made])
    base = f"http://127.0.0.1:{serve(loop_thread, settings)}"
    for authorization in (
        None,
        "Bearer wrong-token-0123456789",
        basic("ops", "wrong"),
        "Token " + TOKEN,
        basic("ops", TOKEN)[:-2],
    ):
        status, headers, text = get(base + "/", authorization)
        assert status == 401 and made.id not in text, authorization
        assert headers["WWW-Authenticate"].startswith("Basic realm=")
    for authorization in (f"Bearer {TOKEN}", basic("ops", TOKEN), basic("", TOKEN)):
        status, _, text = get(base + "/", authorization)
        assert status == 200 and made.id in text, authorization
    assert get(f"{base}/letters/{made.id}")[0] == 401
    dom = chromium(tmp_path, f"http://ops:{TOKEN}@127.0.0.1:{base.rsplit(':', 1)[1]}/", "--dump-dom")
    assert [made.id in row for row in rows(dom)] == [True]


def test_every_answer_carries_the_security_headers_and_the_csp_admits_only_the_pages_style(
    settings: Settings, stored: DeadLetter, loop_thread: LoopThread
) -> None:
    """200, 400 and 404 answers all have a strict CSP (style by hash), X-Frame-Options DENY, no-store and
    nosniff; the CSP hash is that of the page's one inline style."""
    base = f"http://127.0.0.1:{serve(loop_thread, settings)}"
    digest = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
    for url, expected in (
        (base + "/", 200),
        (f"{base}/letters/{stored.id}", 200),
        (base + "/?since=soon", 400),
        (f"{base}/letters/dl_{'0' * 24}", 404),
        (base + "/nothing-here", 404),
    ):
        status, headers, text = get(url)
        assert status == expected, url
        assert headers["Content-Security-Policy"] == (
            f"default-src 'none'; style-src 'sha256-{digest}'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        )
        assert (headers["X-Frame-Options"], headers["Cache-Control"], headers["X-Content-Type-Options"]) == (
            "DENY",
            "no-store",
            "nosniff",
        )
        if expected == 200:
            assert re.findall(r"<style>(.*?)</style>", text, flags=re.S) == [STYLE]


def test_the_list_states_its_window_and_limit_and_links_carry_coordinates(
    settings: Settings, stored: DeadLetter, loop_thread: LoopThread
) -> None:
    """The list says which window and limit it shows, with the defaults; a detail link opens one record."""
    base = f"http://127.0.0.1:{serve(loop_thread, settings)}"
    _, _, text = get(base + "/")
    assert "Showing the newest 100 dead letters" in text and "(defaults: the last 1d, at most 100;" in text
    [link] = re.findall(r'href="(/letters/[^"]+)"', text)
    assert re.fullmatch(rf"/letters/{stored.id}\?at=\d+-0", link.replace("&amp;", "&"))
    assert stored.id in get(base + link)[2]
    wrong = link.replace("-0", "-7")  # no record there: not found, not a scan
    assert get(base + wrong)[0] == 404
    _, _, fewer = get(base + "/?limit=5000")
    assert "Showing the newest 100 dead letters" in fewer  # the form cannot ask more than dlq.page_limit


def test_without_a_token_only_loopback_or_configured_host_names_are_answered(
    loop_thread: LoopThread, make_settings: Callable[..., Settings], stored: DeadLetter
) -> None:
    """DNS rebinding: a page the operator opens points its own name at 127.0.0.1; the browser then sends
    that name as Host. The page answers 421 to it and serves loopback names and dlq.page_host."""
    settings = make_settings(dlq={"page_host": "headwater.internal"})  # the same topics as `stored`'s
    port = serve(loop_thread, settings)
    base = f"http://127.0.0.1:{port}"
    for rebound in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.nip.io:{port}", ""):
        for path in ("/", f"/letters/{stored.id}"):
            status, _, text = get(base + path, host=rebound)
            assert status == 421 and stored.id not in text, (rebound, path, status)
    for named in (
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        "LOCALHOST.",
        f"[::1]:{port}",
        "headwater.internal",
    ):
        status, _, text = get(base + "/", host=named)
        assert status == 200 and stored.id in text, (named, status)


@pytest.fixture
def worker_on(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> Iterator[Callable[..., tuple[Settings, str]]]:
    """Start a worker whose web server listens on 0.0.0.0 (every interface); the test talks to it on
    loopback."""
    started: list[WorkerProcess] = []

    def start(**dlq: str) -> tuple[Settings, str]:
        port = free_port()
        worker = {"web_host": "0.0.0.0", "web_port": port, "data_dir": str(tmp_path / f"data{len(started)}")}
        settings = make_settings(worker=worker, dlq=dlq)  # each worker its own data dir (it locks it)
        started.append(WorkerProcess(settings, tmp_path / f"worker{len(started)}.toml"))
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(base + "/metrics"), timeout=90)
        return settings, base

    yield start
    for worker in started:
        worker.stop()


def _answers(url: str) -> bool:
    try:
        return get(url)[0] == 200
    except aiohttp.ClientError:
        return False


def test_a_worker_on_every_interface_serves_metrics_but_the_page_only_with_a_token(
    worker_on: Callable[..., tuple[Settings, str]],
) -> None:
    """worker.web_host = 0.0.0.0 without a token: /metrics 200, the page 404; with one: 401, then the page."""
    settings, base = worker_on()
    made = letter(settings, "segment", "acme", "missing_user_identity", offset=1, index=2)
    put(settings, [made])
    assert "headwater_worker" in get(base + "/metrics")[2]
    assert get(base + "/metrics", host="attacker.example")[0] == 200  # Prometheus is not a browser
    assert get(base + "/")[0] == 404 and get(f"{base}/letters/{made.id}")[0] == 404
    settings, base = worker_on(page_token=TOKEN)
    put(settings, [made])
    assert get(base + "/metrics")[0] == 200
    assert get(base + "/")[0] == 401
    status, _, text = get(base + "/", f"Bearer {TOKEN}")
    assert status == 200 and made.id in text
