"""`headwater dlq ls | show | stats | export | redrive | page`: events.dlq for people and scripts.

Each command parses options, calls pipeline.ops.dlq, renders (rich on a terminal, JSON lines with --json).
An unknown or malformed id prints one line and exits 2; a selection with nothing in it says so and exits 0.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from datetime import datetime
from typing import IO, Any, Protocol, TypeVar

import click
import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.config import Settings
from pipeline.ops import dlq
from pipeline.ops.dlq_listing import narrow_lines, wide_table
from pipeline.printable import printable
from pipeline.records import DeadLetter
from pipeline.sources import SOURCES

NOTHING = "no dead letters match"
F = TypeVar("F", bound=Callable[..., Any])


class _CliContext(Protocol):
    """What `pipeline.cli.main` puts in ctx.obj (not imported: cli.py imports this module)."""

    debug: bool

    def settings(self, **overrides: Any) -> Settings: ...


@click.group("dlq")
def dlq_command() -> None:
    """Dead letters on events.dlq: list, inspect, count, export, redrive, browse."""


def filter_options(func: F) -> F:
    """--source --tenant --reason --stage --since --until --all, shared by every selecting command."""
    options = [
        click.option("--source", type=click.Choice(SOURCES), help="Only this source."),
        click.option("--tenant", help="Only this tenant."),
        click.option("--reason", help="Only this reason code (wrong_type matches wrong_type:<field>)."),
        click.option(
            "--stage", type=click.Choice(["parse", "normalize", "validate"]), help="Only this stage."
        ),
        click.option("--since", help="Failed at or after: ISO-8601 or a duration ago ('2h', '7d')."),
        click.option("--until", help="Failed before: same forms."),
        click.option(
            "--all", "include_redriven", is_flag=True, help="Include dead letters that were already redriven."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def make_filters(
    source: str | None = None,
    tenant: str | None = None,
    reason: str | None = None,
    stage: str | None = None,
    since: str | None = None,
    until: str | None = None,
    include_redriven: bool = False,
    limit: int | None = None,
) -> dlq.Filters:
    from pipeline.ops.times import parse_time

    return dlq.Filters(
        source=source,
        tenant=tenant,
        reason=reason,
        stage=stage,
        since=parse_time(since) if since else None,
        until=parse_time(until) if until else None,
        include_redriven=include_redriven,
        limit=limit,
    )


def _snapshot(settings: Settings, filters: dlq.Filters | None = None) -> dlq.Snapshot:
    return asyncio.run(dlq.read_snapshot(settings, filters.since if filters else None))


def _console() -> Console:
    return Console(highlight=False)


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


# --- ls / show / stats / export --------------------------------------------------------------------------


@dlq_command.command("ls")
@filter_options
@click.option("--limit", type=int, default=50, show_default=True, help="At most this many (newest first).")
@click.option(
    "--wide", is_flag=True, help="Every column: time, tenant, stage, item, redrives, whole message."
)
@click.option("--json", "as_json", is_flag=True, help="One dead letter per line, as stored (for scripts).")
@click.option("-q", "--ids-only", is_flag=True, help="Only the ids, one per line (for $(...) in a shell).")
@click.pass_obj
def ls(obj: _CliContext, /, limit: int, wide: bool, as_json: bool, ids_only: bool, **options: Any) -> None:
    """List dead letters, newest first: id, age, source, reason and the message cut to fit (--wide: all)."""
    filters = make_filters(**options, limit=limit)
    snapshot = _snapshot(obj.settings(), filters)
    letters = filters.apply(snapshot)
    if not letters:
        click.echo(NOTHING, err=as_json or ids_only)
        return
    if as_json or ids_only:
        for letter in letters:
            click.echo(letter.id if ids_only else snapshot.stored[letter.id].decode())
        return
    console = _console()
    if wide:
        console.print(wide_table(letters, set(snapshot.redrives)))
    else:
        for line in narrow_lines(letters, set(snapshot.redrives), console.width):
            console.print(line, no_wrap=True, overflow="ellipsis")
    redriven = sum(1 for d in letters if d.id in snapshot.redrives)
    note = f", {redriven} already redriven (--wide marks them)" if redriven and not wide else ""
    console.print(f"{len(letters)} dead letter(s){note}", markup=False)


@dlq_command.command("show")
@click.argument("letter_id")
@click.option("--json", "as_json", is_flag=True, help="The dead letter as JSON, plus the decoded body.")
@click.option("--body", "body_only", is_flag=True, help="Only the original request body, byte for byte.")
@click.pass_obj
def show(obj: _CliContext, letter_id: str, as_json: bool, body_only: bool) -> None:
    """Print one dead letter in full: reason, field errors, headers and the original body."""
    snapshot = _snapshot(obj.settings()) if dlq.ID_PATTERN.match(letter_id) else dlq.Snapshot()
    [letter] = snapshot.find([letter_id])
    if body_only:  # e.g. to correct it and `dlq redrive --ids ID --body FILE`
        if sys.stdout.isatty():  # a person reads it: the sender's control characters are not obeyed
            click.echo(printable(letter.body.decode("utf-8", "replace"), keep_newlines=True))
        else:  # a file or a pipe gets the exact bytes
            click.get_binary_stream("stdout").write(letter.body)
        return
    redrive = snapshot.redrives.get(letter.id)
    body, is_json = dlq.pretty_body(letter)
    if as_json:
        doc = letter.model_dump(mode="json")
        doc["body"] = orjson.loads(letter.body) if is_json else body
        doc["redriven"] = redrive.model_dump(mode="json") if redrive else None
        click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return
    console = _console()
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    for name, value in [
        ("id", letter.id),
        ("reason", letter.reason),
        ("message", letter.message),
        ("stage", letter.stage),
        ("written by", f"the {letter.worker_stage} stage"),
        ("redrive sends", _redrive_target(letter)),
        ("source", letter.source),
        ("tenant", letter.tenant),
        ("failed at", letter.failed_at.isoformat()),
        ("raw record", letter.origin.ref()),
        ("item", "-" if letter.index is None else str(letter.index)),
        ("redrive count", str(letter.redrive_count)),
        ("redriven", f"{redrive.redriven_at.isoformat()} -> {redrive.raw}" if redrive else "no"),
        ("processor", f"{letter.processor.name} {letter.processor.version}"),
    ]:
        facts.add_row(name, Text(printable(value)))
    console.print(facts)
    if letter.errors:
        errors = Table("field", "error", title="field errors", title_justify="left")
        for error in letter.errors:
            errors.add_row(Text(printable(error.path)), Text(printable(error.message)))
        console.print(errors)
    headers = Table("header", "value", title="raw headers", title_justify="left")
    for name, value in letter.headers.items():
        headers.add_row(Text(printable(name)), Text(printable(value)))
    console.print(headers)
    if letter.element is not None:
        console.print(Text("failed item:", style="bold"))
        console.print(Text(orjson.dumps(letter.element, option=orjson.OPT_INDENT_2).decode()))  # JSON-escaped
    console.print(
        Text(f"original body ({'JSON' if is_json else 'not JSON'}, {len(letter.body)} bytes):", style="bold")
    )
    console.print(Text(printable(body, keep_newlines=True)))


def _redrive_target(letter: DeadLetter) -> str:
    if letter.redrive_to == "keyed":
        return "the canonical event to the keyed topic (the dedup rules decide again)"
    return f"the request to raw.{letter.source} (its adapter runs again)"


@dlq_command.command("stats")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="One {source, reason, count} object per line.")
@click.pass_obj
def stats(obj: _CliContext, /, as_json: bool, **options: Any) -> None:
    """Count dead letters by source and reason, with a bar per row."""
    filters = make_filters(**options)
    counts = dlq.count_by_source_and_reason(filters.apply(_snapshot(obj.settings(), filters)))
    if not counts:
        click.echo(NOTHING, err=as_json)
        return
    rows = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    if as_json:
        for (source, reason), count in rows:
            click.echo(orjson.dumps({"source": source, "reason": reason, "count": count}).decode())
        return
    top = rows[0][1]
    table = Table("source", "reason", "count", "")
    table.columns[2].justify = "right"
    for (source, reason), count in rows:
        table.add_row(source, reason, str(count), Text("█" * max(1, round(count / top * 30)), style="red"))
    console = _console()
    console.print(table)
    console.print(f"{sum(counts.values())} dead letter(s)", markup=False)


@dlq_command.command("export")
@filter_options
@click.option("--output", "-o", type=click.File("wb"), default="-", help="File to write (default stdout).")
@click.pass_obj
def export(obj: _CliContext, /, output: IO[bytes], **options: Any) -> None:
    """Write the selection as JSON lines, each dead letter exactly as stored (original bytes in body_b64,
    once per raw record: the other letters name it in body_ref, and it is exported with them)."""
    filters = make_filters(**options)
    snapshot = _snapshot(obj.settings(), filters)
    letters = filters.apply(snapshot)
    for line in dlq.export_lines(snapshot, letters):
        output.write(line + b"\n")
    output.flush()
    click.echo(f"exported {len(letters)} dead letter(s)" if letters else NOTHING, err=True)


# --- redrive ---------------------------------------------------------------------------------------------


@dlq_command.command("redrive")
@filter_options
@click.option("--ids", "ids", multiple=True, help="Only these ids (repeatable, or comma-separated).")
@click.option("--everything", is_flag=True, help="Redrive every dead letter (when no filter or id is given).")
@click.option("--dry-run", is_flag=True, help="Say what would be republished; write nothing.")
@click.option(
    "--reset-count",
    is_flag=True,
    help="Restart hw-redrive-count at 1 (also redrives letters parked at the redrive limit).",
)
@click.option(
    "--body",
    "body_file",
    type=click.File("rb"),
    help="Send this corrected body instead of the stored request (one request's letters; - for stdin).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_obj
def redrive(
    obj: _CliContext,
    /,
    ids: tuple[str, ...],
    everything: bool,
    dry_run: bool,
    reset_count: bool,
    body_file: IO[bytes] | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Republish the original request of each selected dead letter to raw.<source>, count + 1.

    A bulk payload goes back once per raw record, whole: items that passed before are dropped by dedup.
    With --body, a corrected request goes back instead, under the original tenant and headers.
    """
    wanted = [i for chunk in ids for i in chunk.replace(",", " ").split()]
    if not wanted and not everything and not any(v for k, v in options.items() if k != "include_redriven"):
        raise click.UsageError(
            "give --ids, a filter (--source/--tenant/--reason/--stage/--since/--until), or --everything"
        )
    settings = obj.settings()
    filters = make_filters(**options)
    if wanted:
        snapshot = _snapshot(settings)
        letters = [d for d in snapshot.find(wanted) if filters.matches(d)]
    else:
        letters = filters.apply(_snapshot(settings, filters))
    if not letters:
        click.echo(NOTHING)
        return
    body = body_file.read() if body_file is not None else None
    plan = dlq.plan_redrive(letters, reset_count=reset_count, body=body)
    summary = asyncio.run(dlq.redrive(settings, plan, dry_run=dry_run))
    if as_json:
        click.echo(orjson.dumps(summary.as_dict()).decode())
        return
    verb, count = ("would republish", len(plan.records)) if dry_run else ("republished", summary.republished)
    topics = ", ".join(sorted({settings.topics.raw(d.source) for d, _ in plan.records})) or "-"
    click.echo(
        f"selected {summary.selected} dead letter(s); {verb} {count} raw record(s) to {topics}; "
        f"skipped {summary.skipped}"
    )
    if body is not None:
        click.echo(f"  sent the corrected body ({len(body)} bytes) instead of the stored request")
    if summary.merged:
        click.echo(
            f"  {summary.merged} letter(s) share a raw record with another selected letter (bulk payload): "
            "the body goes back once, dedup drops items already emitted"
        )
    if plan.parked:
        click.echo(
            f"  {len(plan.parked)} parked at the redrive limit "
            f"({settings.dlq.redrive_limit}); fix the cause, then redrive with --reset-count"
        )
    if plan.foreign:
        click.echo(
            f"  {len(plan.foreign)} without Headwater raw headers (invalid_raw_headers): nothing to redrive"
        )


# --- page ------------------------------------------------------------------------------------------------


@dlq_command.command("page")
@click.option("--host", help="Listen address (default dlq.page_host).")
@click.option("--port", type=int, help="Listen port (default dlq.page_port).")
@click.pass_obj
def page(obj: _CliContext, host: str | None, port: int | None) -> None:
    """Serve the read-only DLQ web page until Ctrl-C (beyond loopback only with dlq.page_token set)."""
    from aiohttp import web

    from pipeline.errors import ConfigError
    from pipeline.ops.dlq_page import make_app, refusal

    settings = obj.settings(**{"dlq.page_host": host, "dlq.page_port": port})
    withheld = refusal(settings.dlq.page_host, settings.dlq)
    if withheld is not None:
        raise ConfigError(withheld)
    web.run_app(
        make_app(settings),
        host=settings.dlq.page_host,
        port=settings.dlq.page_port,
        print=lambda text: click.echo(text, err=True),
    )
