"""`headwater rewards`: run the webhook dispatcher, sign a body, list/show/redeliver rewards.dlq.

`headwater rewards` without a subcommand runs the dispatcher, like `headwater rewards run`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import click
import orjson
from rich.console import Console
from rich.table import Table

from pipeline.config import Settings
from pipeline.errors import NotFound
from pipeline.kafka.clients import broker_errors, ensure_topics, make_producer
from pipeline.kafka.reading import read_topic
from pipeline.records import RawHeaders, new_request_id, utc_now
from pipeline.rewards.records import RewardDeadLetter
from pipeline.signing import canonical_body, cg_signature


class _CliContext(Protocol):
    """What `pipeline.cli.main` puts in ctx.obj (not imported: cli.py imports this module)."""

    debug: bool

    def settings(self, **overrides: Any) -> Settings: ...


@click.group("rewards", invoke_without_command=True)
@click.pass_context
def rewards_command(ctx: click.Context) -> None:
    """Reward webhooks: without a subcommand, run the dispatcher (same as `rewards run`)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@rewards_command.command("run")
@click.option("--exit-after", type=float, help="Stop by itself after this many seconds (tests, batch runs).")
@click.pass_obj
def run(obj: _CliContext, exit_after: float | None) -> None:
    """Deliver rewards.outbound to each tenant's rewards_webhook until Ctrl-C (a Faust worker)."""
    from pipeline.rewards.dispatcher import run_dispatcher

    run_dispatcher(obj.settings(), exit_after_s=exit_after, debug=obj.debug)


@rewards_command.command("sign")
@click.option(
    "--token",
    required=True,
    envvar="HEADWATER_REWARDS_TOKEN",
    show_envvar=True,
    help="The tenant's rewards_webhook token.",
)
@click.option(
    "--canonical",
    is_flag=True,
    help="Sign the body as the dispatcher would send it (re-serialized), not the bytes as given.",
)
def sign(token: str, canonical: bool) -> None:
    """Print the X-CG-SIGNATURE value of the body on stdin (exact bytes: mind a trailing newline)."""
    body = click.get_binary_stream("stdin").read()
    if canonical:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise click.BadParameter(f"stdin is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise click.BadParameter("stdin is not one JSON object")
        body = canonical_body(doc)
    elif body.endswith(b"\n"):
        click.echo(
            "note: the body ends with a newline, which is signed too (use printf '%s', or --canonical)",
            err=True,
        )
    click.echo(cg_signature(body, token))


# --- dead letters ----------------------------------------------------------------------------------------


@rewards_command.group("dlq")
def dlq() -> None:
    """Rewards that were not delivered (topics.rewards_dlq)."""


def dead_letters(settings: Settings) -> list[RewardDeadLetter]:
    """Every dead letter on rewards.dlq, oldest first."""
    records = asyncio.run(read_topic(settings, settings.topics.rewards_dlq))
    letters = [RewardDeadLetter.from_json(r.value) for r in records if r.value]
    return sorted(letters, key=lambda letter: letter.failed_at)


def select(letters: list[RewardDeadLetter], tenant: str | None, reason: str | None) -> list[RewardDeadLetter]:
    return [
        d
        for d in letters
        if (tenant is None or d.tenant == tenant)
        and (reason is None or d.reason == reason or d.reason.startswith(reason + ":"))
    ]


def redeliver(settings: Settings, letters: list[RewardDeadLetter]) -> int:
    """Write each reward back to rewards.outbound (hw-redrive-count + 1); the dispatcher still dedups."""

    async def send() -> int:
        await ensure_topics(settings, [settings.topics.rewards])
        producer = make_producer(settings)
        async with broker_errors("redelivering rewards", access=settings.kafka):
            await producer.start()
            try:
                acks = []
                for letter in letters:
                    assert letter.tenant is not None
                    headers = RawHeaders(
                        tenant=letter.tenant,
                        source="rewards",
                        received_at=utc_now(),
                        request_id=new_request_id(),
                        content_type="application/json",
                        redrive_count=letter.redelivery_count + 1,
                        replay_of=letter.origin,
                    )
                    acks.append(
                        await producer.send(settings.topics.rewards, letter.body, headers=headers.to_kafka())
                    )
                await asyncio.gather(*acks)
                return len(acks)
            finally:
                await producer.stop()

    return asyncio.run(send())


@dlq.command("ls")
@click.option("--tenant", help="Only this tenant.")
@click.option("--reason", help="Only this reason code (a prefix before ':' matches, e.g. missing_field).")
@click.option("--json", "as_json", is_flag=True, help="One JSON dead letter per line.")
@click.pass_obj
def dlq_ls(obj: _CliContext, tenant: str | None, reason: str | None, as_json: bool) -> None:
    """List dead-lettered rewards."""
    letters = select(dead_letters(obj.settings()), tenant, reason)
    if as_json:
        for letter in letters:
            click.echo(letter.to_json().decode())
        return
    table = Table("id", "failed at", "tenant", "rewardId", "reason", "attempts", "last error")
    for d in letters:
        last = d.attempts[-1].error if d.attempts else d.message
        table.add_row(
            d.id,
            d.failed_at.strftime("%Y-%m-%d %H:%M:%S"),
            d.tenant or "-",
            d.reward_id or "-",
            d.reason,
            str(len(d.attempts)),
            (last or "")[:60],
        )
    Console().print(table)
    click.echo(f"{len(letters)} dead letter(s)")


@dlq.command("show")
@click.argument("letter_id")
@click.pass_obj
def dlq_show(obj: _CliContext, letter_id: str) -> None:
    """Show one dead letter as JSON, with its body decoded."""
    letter = _find(dead_letters(obj.settings()), [letter_id])[0]
    doc = letter.model_dump(mode="json")
    doc["body"] = letter.body.decode("utf-8", "replace")
    click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())


@dlq.command("redeliver")
@click.argument("letter_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every dead letter (narrowed by --tenant/--reason).")
@click.option("--tenant", help="Only this tenant.")
@click.option("--reason", help="Only this reason code.")
@click.pass_obj
def dlq_redeliver(
    obj: _CliContext, letter_ids: tuple[str, ...], everything: bool, tenant: str | None, reason: str | None
) -> None:
    """Send dead-lettered rewards through the dispatcher again (a delivered rewardId is still not resent)."""
    if not letter_ids and not everything:
        raise click.UsageError("give dead letter ids, or --all")
    settings = obj.settings()
    letters = select(dead_letters(settings), tenant, reason)
    chosen = letters if everything and not letter_ids else _find(letters, list(letter_ids))
    without_tenant = [d.id for d in chosen if d.tenant is None]
    if without_tenant:
        click.echo(f"skipping {len(without_tenant)} without a tenant: {', '.join(without_tenant)}", err=True)
    cut = [d.id for d in chosen if d.original_bytes is not None]  # only the first bytes are stored
    if cut:
        click.echo(f"skipping {len(cut)} too large to redeliver (kept cut): {', '.join(cut)}", err=True)
    count = redeliver(settings, [d for d in chosen if d.tenant is not None and d.original_bytes is None])
    click.echo(f"redelivered {count} reward(s) to {settings.topics.rewards}")


def _find(letters: list[RewardDeadLetter], ids: list[str]) -> list[RewardDeadLetter]:
    by_id = {d.id: d for d in letters}  # a reprocessed record can be dead-lettered twice with the same id
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise NotFound(f"no dead letter with id {', '.join(missing)} in the rewards DLQ")
    return [by_id[i] for i in ids]
