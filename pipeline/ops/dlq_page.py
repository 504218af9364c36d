"""A read-only web page over events.dlq: recent dead letters, a filter form, one page per dead letter.

Plain server-rendered HTML, no scripts; every value a vendor or a config controls is HTML-escaped.
Each request reads the topic again (pipeline.ops.dlq), so the page is as fresh as `headwater dlq ls`.
Routes: `/` (query: source, tenant, reason, stage, since, until, all, limit) and `/letters/{id}`.
"""

from __future__ import annotations

from html import escape
from urllib.parse import urlencode

import orjson
from aiohttp import web

from pipeline import reasons
from pipeline.config import Settings
from pipeline.errors import HeadwaterError
from pipeline.ops import dlq
from pipeline.records import DeadLetter
from pipeline.sources import SOURCES

SETTINGS = web.AppKey("settings", Settings)
STAGES = ("parse", "normalize", "validate")
DEFAULT_LIMIT = 100
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


def make_app(settings: Settings) -> web.Application:
    """The DLQ page as an aiohttp application (serve it with web.run_app or an AppRunner)."""
    app = web.Application()
    app[SETTINGS] = settings
    app.router.add_get("/", list_view)
    app.router.add_get("/letters/{id}", detail_view)
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
    """Recent dead letters, newest first, narrowed by the form's fields."""
    from pipeline.ops.times import parse_time

    query = request.query
    chosen = {k: (query.get(k) or None) for k in ("source", "tenant", "reason", "stage", "since", "until")}
    try:
        limit = max(1, int(query.get("limit") or DEFAULT_LIMIT))
        filters = dlq.Filters(
            source=chosen["source"],
            tenant=chosen["tenant"],
            reason=chosen["reason"],
            stage=chosen["stage"],
            since=parse_time(chosen["since"]) if chosen["since"] else None,
            until=parse_time(chosen["until"]) if chosen["until"] else None,
            include_redriven=bool(query.get("all")),
            limit=limit,
        )
    except (ValueError, HeadwaterError) as exc:
        return _page(
            "Dead letters", f"<h1>Dead letters</h1><p class=reason>{escape(str(exc))}</p>", status=400
        )
    try:
        snapshot = await dlq.read_snapshot(request.app[SETTINGS], filters.since)
    except HeadwaterError as exc:  # Kafka unreachable: say so, like the CLI's one red line
        return _unavailable(exc)
    letters = filters.apply(snapshot)
    form = (
        '<form method="get" action="/">'
        + _select("source", SOURCES, chosen["source"])
        + _text("tenant", chosen["tenant"])
        + _select("reason", tuple(reasons.CATALOGUE), chosen["reason"])
        + _select("stage", STAGES, chosen["stage"])
        + _text("since", chosen["since"], "2h or ISO-8601")
        + _text("until", chosen["until"], "ISO-8601")
        + "<label>include redriven<input type=checkbox name=all value=1"
        + (" checked" if query.get("all") else "")
        + '></label><button type="submit">Filter</button></form>'
    )
    if not letters:
        rows = '<p id="empty">no dead letters match</p>'
    else:
        cells = []
        for d in letters:
            redriven = " (redriven)" if d.id in snapshot.redrives else ""
            cells.append(
                f'<tr class="letter"><td><a href="/letters/{escape(d.id)}">{escape(d.id)}</a></td>'
                f"<td class=when>{escape(d.failed_at.strftime('%Y-%m-%d %H:%M:%S'))}</td>"
                f"<td>{escape(d.source)}</td><td>{escape(d.tenant)}</td><td>{escape(d.stage)}</td>"
                f"<td class=reason>{escape(d.reason)}</td>"
                f"<td>{'-' if d.index is None else d.index}</td><td>{d.redrive_count}{redriven}</td>"
                f"<td>{escape(d.message[:160])}</td></tr>"
            )
        rows = (
            "<table><thead><tr><th>id</th><th>failed at (UTC)</th><th>source</th><th>tenant</th>"
            "<th>stage</th><th>reason</th><th>item</th><th>redrives</th><th>message</th></tr></thead><tbody>"
            + "".join(cells)
            + f"</tbody></table><p class=muted>{len(letters)} dead letter(s)"
            + (f" (showing the newest {limit})" if len(letters) == limit else "")
            + "</p>"
        )
    title = f"Dead letters on {request.app[SETTINGS].topics.dlq}"
    return _page("Dead letters", f"<h1>{escape(title)}</h1>{form}{rows}")


async def detail_view(request: web.Request) -> web.Response:
    """One dead letter in full: reason, field errors, headers, the failed item and the original body."""
    letter_id = request.match_info["id"]
    if not dlq.ID_PATTERN.match(letter_id):
        return _not_found(letter_id)
    try:
        snapshot = await dlq.read_snapshot(request.app[SETTINGS])
    except HeadwaterError as exc:
        return _unavailable(exc)
    letter = next((d for d in snapshot.letters if d.id == letter_id), None)
    if letter is None:
        return _not_found(letter_id)
    return _page(f"Dead letter {letter.id}", _detail(letter, snapshot.redrives.get(letter.id)))


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


def _not_found(letter_id: str) -> web.Response:
    return _page(
        "Not found",
        f'<p><a href="/">&larr; all dead letters</a></p><h1>No dead letter with id {escape(letter_id)}</h1>',
        status=404,
    )


def _unavailable(exc: HeadwaterError) -> web.Response:
    body = f"<h1>Cannot read the DLQ</h1><p class=reason>{escape(str(exc))}</p>"
    return _page("Unavailable", body, status=503)
