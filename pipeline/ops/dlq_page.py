"""A read-only web page over events.dlq: recent dead letters, a filter form, one page per dead letter.

Plain server-rendered HTML, no scripts; every value a vendor or a config controls is HTML-escaped.
Each request reads the topic again, bounded (pipeline.ops.dlq_window): the list covers `dlq.page_window`
(default 24 h) and at most `dlq.page_limit` letters (default 100), reading at most `dlq.page_scan_limit`
records; a detail link carries the letter's coordinates (`?at=<partition>-<offset>`), so it reads one
record. Who may see it: pipeline.ops.page_guard. Routes: `/` (query: source, tenant, reason, stage,
since, until, all, limit) and `/letters/{id}`.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from html import escape
from urllib.parse import urlencode

import orjson
from aiohttp import web

from pipeline import reasons
from pipeline.config import DlqSettings, Settings
from pipeline.errors import HeadwaterError
from pipeline.ops import dlq
from pipeline.ops.dlq_window import At, DlqReader, Window
from pipeline.ops.page_guard import guarded, headers_middleware, is_loopback, refusal
from pipeline.ops.times import parse_time
from pipeline.records import DeadLetter, utc_now
from pipeline.sources import SOURCES

__all__ = ["is_loopback", "make_app", "refusal"]
SETTINGS = web.AppKey("settings", Settings)
READER = web.AppKey("reader", DlqReader)
STAGES = ("parse", "normalize", "validate")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.4rem; overflow-wrap: anywhere; }
td.when { white-space: nowrap; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
form { margin: 1rem 0; display: flex; gap: 0.5rem; flex-wrap: wrap; align-items: end; }
label { display: flex; flex-direction: column; font-size: 0.8rem; }
pre { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; }
.reason { color: #a00; font-weight: 600; }
.muted { color: #777; }
"""


def make_app(settings: Settings, serve_page: bool = True) -> web.Application:
    """The DLQ page as an aiohttp application (serve it with web.run_app or an AppRunner).

    `serve_page=False` gives the same application without the page's routes (a worker on a non-loopback
    address without `dlq.page_token` adds only /metrics to it). Every answer has the security headers.
    """
    app = web.Application(middlewares=[headers_middleware(STYLE)])
    app[SETTINGS] = settings
    app[READER] = reader = DlqReader(settings)

    async def start_reader(_: web.Application) -> None:
        warming.append(asyncio.ensure_future(reader.warm()))

    async def stop_reader(_: web.Application) -> None:
        for task in warming:
            task.cancel()
        await reader.stop()

    warming: list[asyncio.Future[None]] = []
    if serve_page:
        app.on_startup.append(start_reader)
    app.on_cleanup.append(stop_reader)
    if serve_page:
        hosts = (settings.worker.web_host,)  # the worker serves the page on its own address
        app.router.add_get("/", guarded(settings.dlq, list_view, hosts))
        app.router.add_get("/letters/{id}", guarded(settings.dlq, detail_view, hosts))
    return app


def _page(title: str, body: str, status: int = 200) -> web.Response:
    html = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )
    return web.Response(text=html, content_type="text/html", status=status)


def _select(name: str, options: tuple[str, ...], chosen: str | None) -> str:
    items = [f'<option value=""{"" if chosen else " selected"}>any</option>']
    items += [
        f'<option value="{escape(o)}"{" selected" if o == chosen else ""}>{escape(o)}</option>'
        for o in options
    ]
    return f'<label>{name}<select name="{name}">{"".join(items)}</select></label>'


def _text(name: str, value: str | None, placeholder: str = "") -> str:
    return (
        f'<label>{name}<input name="{name}" value="{escape(value or "")}" '
        f'placeholder="{escape(placeholder)}"></label>'
    )


async def list_view(request: web.Request) -> web.Response:
    """Recent dead letters, newest first, narrowed by the form; bounded by window, limit and scan cap."""
    settings = request.app[SETTINGS]
    page = settings.dlq
    query = request.query
    chosen = {k: (query.get(k) or None) for k in ("source", "tenant", "reason", "stage", "since", "until")}
    try:
        limit = min(page.page_limit, max(1, int(query.get("limit") or page.page_limit)))
        since = parse_time(chosen["since"]) if chosen["since"] else utc_now() - page.page_window
        filters = dlq.Filters(
            source=chosen["source"],
            tenant=chosen["tenant"],
            reason=chosen["reason"],
            stage=chosen["stage"],
            since=since,
            until=parse_time(chosen["until"]) if chosen["until"] else None,
            include_redriven=bool(query.get("all")),
            limit=limit,
        )
    except (ValueError, HeadwaterError) as exc:
        return _page(
            "Dead letters", f"<h1>Dead letters</h1><p class=reason>{escape(str(exc))}</p>", status=400
        )
    try:
        window = await request.app[READER].window(filters, limit, page.page_scan_limit)
    except HeadwaterError as exc:  # Kafka unreachable: say so, like the CLI's one red line
        return _unavailable(exc)
    form = (
        '<form method="get" action="/">'
        + _select("source", SOURCES, chosen["source"])
        + _text("tenant", chosen["tenant"])
        + _select("reason", tuple(reasons.CATALOGUE), chosen["reason"])
        + _select("stage", STAGES, chosen["stage"])
        + _text("since", chosen["since"], f"{_duration(page.page_window)} or ISO-8601")
        + _text("until", chosen["until"], "ISO-8601")
        + _text("limit", query.get("limit"), str(page.page_limit))
        + "<label>include redriven<input type=checkbox name=all value=1"
        + (" checked" if query.get("all") else "")
        + '></label><button type="submit">Filter</button></form>'
    )
    title = f"Dead letters on {settings.topics.dlq}"
    return _page(
        "Dead letters",
        f"<h1>{escape(title)}</h1>{form}{_bounds(window, filters, limit, page)}{_rows(window)}",
    )


def _bounds(window: Window, filters: dlq.Filters, limit: int, page: DlqSettings) -> str:
    """What the list covers, with the defaults stated (a bounded read says where its bounds are)."""
    since = filters.since.strftime("%Y-%m-%d %H:%M:%S") if filters.since else "-"
    until = filters.until.strftime("%Y-%m-%d %H:%M:%S") if filters.until else "now"
    text = (
        f"Showing the newest {limit} dead letters that failed from {since} to {until} UTC "
        f"(defaults: the last {_duration(page.page_window)}, at most {page.page_limit}; "
        f"read {window.scanned} records in {window.elapsed_s * 1000:.0f} ms)."
    )
    if not window.complete:
        text += (
            f" The read stopped at its cap of {page.page_scan_limit} records before the start of the"
            " window: older matches were not searched; narrow the filters or the window."
        )
    return f'<p class=muted id="bounds">{escape(text)}</p>'


def _rows(window: Window) -> str:
    if not window.letters:
        return '<p id="empty">no dead letters match</p>'
    cells = []
    for d, at in window.letters:
        redriven = " (redriven)" if d.id in window.redrives else ""
        link = f"/letters/{d.id}?{urlencode({'at': str(at)})}"
        cells.append(
            f'<tr class="letter"><td><a href="{escape(link)}">{escape(d.id)}</a></td>'
            f"<td class=when>{escape(d.failed_at.strftime('%Y-%m-%d %H:%M:%S'))}</td>"
            f"<td>{escape(d.source)}</td><td>{escape(d.tenant)}</td><td>{escape(d.stage)}</td>"
            f"<td class=reason>{escape(d.reason)}</td>"
            f"<td>{'-' if d.index is None else d.index}</td><td>{d.redrive_count}{redriven}</td>"
            f"<td>{escape(d.message[:160])}</td></tr>"
        )
    return (
        "<table><thead><tr><th>id</th><th>failed at (UTC)</th><th>source</th><th>tenant</th>"
        "<th>stage</th><th>reason</th><th>item</th><th>redrives</th><th>message</th></tr></thead><tbody>"
        + "".join(cells)
        + f"</tbody></table><p class=muted>{len(window.letters)} dead letter(s)</p>"
    )


def _duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


async def detail_view(request: web.Request) -> web.Response:
    """One dead letter in full: reason, field errors, headers, the failed item and the original body.

    With `?at=<partition>-<offset>` (the list's links) one record is read; without it (an id from the
    CLI) the default window is searched, within the scan cap.
    """
    settings = request.app[SETTINGS]
    letter_id = request.match_info["id"]
    if not dlq.ID_PATTERN.match(letter_id):
        return _not_found(letter_id)
    at = At.parse(request.query.get("at", "")) if "at" in request.query else None
    if "at" in request.query and at is None:
        return _not_found(letter_id)
    try:
        if at is not None:
            letter, redrive = await request.app[READER].letter(at)
        else:
            filters = dlq.Filters(since=utc_now() - settings.dlq.page_window, include_redriven=True)
            window = await request.app[READER].window(filters, 1, settings.dlq.page_scan_limit, letter_id)
            letter = window.letters[0][0] if window.letters else None
            redrive = window.redrives.get(letter_id)
    except HeadwaterError as exc:
        return _unavailable(exc)
    if letter is None or letter.id != letter_id:
        return _not_found(letter_id, searched=at is None)
    return _page(f"Dead letter {letter.id}", _detail(letter, redrive))


def _detail(letter: DeadLetter, redrive: dlq.Redrive | None) -> str:
    facts = [
        (
            "reason",
            f"<span class=reason>{escape(letter.reason)}</span> "
            f"<span class=muted>{escape(reasons.lookup(letter.reason).summary)}</span>",
        ),
        ("message", escape(letter.message)),
        ("stage", escape(letter.stage)),
        ("source", escape(letter.source)),
        ("tenant", escape(letter.tenant)),
        ("failed at", escape(letter.failed_at.isoformat())),
        ("raw record", escape(letter.origin.ref())),
        ("item", "-" if letter.index is None else str(letter.index)),
        ("redrive count", str(letter.redrive_count)),
        ("redriven", escape(f"{redrive.redriven_at.isoformat()} -> {redrive.raw}") if redrive else "no"),
        ("processor", escape(f"{letter.processor.name} {letter.processor.version}")),
    ]
    html = [
        f'<p><a href="/">&larr; all dead letters</a></p><h1>Dead letter {escape(letter.id)}</h1>',
        "<table id=facts>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts) + "</table>",
    ]
    if letter.errors:
        html.append(
            "<h2>Field errors</h2><table id=errors><tr><th>field</th><th>error</th></tr>"
            + "".join(
                f"<tr><td>{escape(e.path)}</td><td>{escape(e.message)}</td></tr>" for e in letter.errors
            )
            + "</table>"
        )
    html.append(
        "<h2>Raw headers</h2><table id=headers>"
        + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in letter.headers.items())
        + "</table>"
    )
    if letter.element is not None:
        element = orjson.dumps(letter.element, option=orjson.OPT_INDENT_2).decode()
        html.append(f"<h2>Failed item</h2><pre id=element>{escape(element)}</pre>")
    body, is_json = dlq.pretty_body(letter)
    html.append(
        f"<h2>Original body <span class=muted>({'JSON' if is_json else 'not JSON'}, "
        f"{len(letter.body)} bytes)</span></h2><pre id=body>{escape(body)}</pre>"
    )
    html.append(
        f"<p class=muted>redrive: <code>headwater dlq redrive --ids {escape(letter.id)}</code> · "
        f'<a href="/?{escape(urlencode({"source": letter.source, "reason": letter.reason}))}">'
        "similar dead letters</a></p>"
    )
    return "".join(html)


def _not_found(letter_id: str, searched: bool = False) -> web.Response:
    where = " in the default window (follow a link from the list to open an older one)" if searched else ""
    return _page(
        "Not found",
        f'<p><a href="/">&larr; all dead letters</a></p><h1>No dead letter with id {escape(letter_id)}'
        f"{escape(where)}</h1>",
        status=404,
    )


def _unavailable(exc: HeadwaterError) -> web.Response:
    body = f"<h1>Cannot read the DLQ</h1><p class=reason>{escape(str(exc))}</p>"
    return _page("Unavailable", body, status=503)
