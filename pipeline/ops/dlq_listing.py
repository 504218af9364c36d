"""How `headwater dlq ls` lays dead letters out: the few columns a person scans, fitted to the terminal, or
every column with --wide."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.table import Table
from rich.text import Text

from pipeline.printable import printable
from pipeline.records import DeadLetter


def age(moment: datetime, now: datetime | None = None) -> str:
    """How long ago, in the largest unit that fits: 45s, 12m, 3h, 9d."""
    seconds = max(0, int(((now or datetime.now(UTC)) - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


GAP = "  "
MIN_INLINE_MESSAGE = 30  # narrower than this, the message goes on its own line under the row


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def narrow_lines(
    letters: list[DeadLetter], redriven: set[str], width: int, now: datetime | None = None
) -> list[Text]:
    """The columns a person scans, fitted to `width`: id, age, source, reason, and the message inline when
    at least MIN_INLINE_MESSAGE columns are left for it, else on its own line under the row. The id is
    never cut (it is what `dlq show` takes); the reason is cut only if nothing else fits; the message is
    cut with an ellipsis."""
    now = now or datetime.now(UTC)
    heads = ("id", "age", "source", "reason")
    rows = [(d.id, age(d.failed_at, now), d.source, d.reason) for d in letters]
    widths = [max(len(head), *(len(row[i]) for row in rows)) for i, head in enumerate(heads)]
    room = width - sum(widths[:3]) - 3 * len(GAP)  # for the reason, and the message if inline
    inline = room - widths[3] - len(GAP) >= MIN_INLINE_MESSAGE
    widths[3] = max(len(heads[3]), min(widths[3], room))

    def cells(values: tuple[str, ...]) -> str:
        ident, ago, source, reason = values
        return GAP.join(
            [
                ident.ljust(widths[0]),
                ago.rjust(widths[1]),
                source.ljust(widths[2]),
                _cut(reason, widths[3]).ljust(widths[3]),
            ]
        )

    out = [Text(cells(heads) + (GAP + "message" if inline else ""), style="bold")]
    if not inline:
        out.append(Text(GAP + "message", style="bold"))
    for d, row in zip(letters, rows, strict=True):
        style = "dim" if d.id in redriven else ""
        if inline:
            out.append(Text(cells(row) + GAP + printable(d.message), style=style))
        else:
            out += [Text(cells(row).rstrip(), style=style), Text(GAP + printable(d.message), style=style)]
    for line in out:
        line.rstrip()
        line.truncate(width, overflow="ellipsis")
    return out


def wide_table(letters: list[DeadLetter], redriven: set[str]) -> Table:
    """Every column, the message whole (wrapped)."""
    table = Table(
        "id", "failed at (UTC)", "source", "tenant", "stage", "reason", "item", "redrives", "message"
    )
    table.columns[0].no_wrap = True
    for d in letters:
        count = str(d.redrive_count) + (" (redriven)" if d.id in redriven else "")
        table.add_row(
            d.id,
            d.failed_at.strftime("%Y-%m-%d %H:%M:%S"),
            d.source,
            printable(d.tenant),
            d.stage,
            d.reason,
            "-" if d.index is None else str(d.index),
            count,
            Text(printable(d.message)),
        )
    return table
