"""`headwater dlq ls` reads well in an 80-column terminal; --wide shows the rest."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from click.testing import CliRunner, Result
from rigs.dlq import config_file, letter, put

from pipeline.cli import main
from pipeline.config import Settings
from pipeline.ops.dlq_listing import age
from pipeline.records import DeadLetter

NARROW_HEADERS = ["id", "age", "source", "reason", "message"]
WIDE_HEADERS = ["id", "failed at (UTC)", "source", "tenant", "stage", "reason", "item", "redrives", "message"]


def ls_at(config: Path, width: int, *args: str) -> Result:
    """`headwater dlq ls` in-process, rendered for a terminal `width` columns wide."""
    return CliRunner().invoke(
        main,
        ["--config", str(config), "dlq", "ls", *args],
        catch_exceptions=False,
        env={"COLUMNS": str(width)},
    )


def wide_letters(settings: Settings) -> list[DeadLetter]:
    """Dead letters with the longest sources, codes and messages Headwater writes."""
    long_message = "the canonical event model rejected the adapter's output: " + "x" * 120
    made = [
        letter(settings, "customerglu", "acme", "validation_failed", "validate", offset=0, index=None),
        letter(settings, "webengage", "globex", "license_code_mismatch", offset=1, index=3),
        letter(settings, "segment", "acme", "wrong_type:properties.amount_in_cents", offset=2, index=0),
    ]
    return [made[0].model_copy(update={"message": long_message}), *made[1:]]


def test_ls_at_80_columns_shows_whole_headers_and_ids_and_cuts_the_message(
    settings: Settings, tmp_path: Path
) -> None:
    """At 80 columns ls shows id, age, source, reason, and the message on its own line: no header cut,
    every id whole (so it can be pasted into `dlq show`), no line wider than 80, a long message cut with an
    ellipsis; with room enough the message is a column of the row."""
    letters = wide_letters(settings)
    put(settings, letters)
    config = config_file(settings, tmp_path)
    result = ls_at(config, 80)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [lines[0].split(), lines[1].split()] == [NARROW_HEADERS[:4], ["message"]], result.stdout
    assert all(len(line) <= 80 for line in lines), result.stdout
    for d in letters:
        [row] = [i for i, line in enumerate(lines) if d.id in line]
        assert lines[row].split()[2] == d.source
        assert lines[row + 1].strip()[:20] == d.message[:20]
    assert any(line.endswith("…") and "the canonical event model" in line for line in lines), result.stdout
    assert any(line.split()[-1] == "license_code_mismatch" for line in lines)
    assert lines[-1] == "3 dead letter(s)"

    roomy = ls_at(config, 140).stdout.splitlines()
    assert roomy[0].split() == NARROW_HEADERS
    assert len(roomy) == 1 + len(letters) + 1 and all(len(line) <= 140 for line in roomy)


def test_ls_wide_has_every_column_and_the_whole_message(settings: Settings, tmp_path: Path) -> None:
    """--wide adds time, tenant, stage, item and redrives, and keeps the message whole."""
    letters = wide_letters(settings)
    put(settings, letters)
    result = ls_at(config_file(settings, tmp_path), 400, "--wide")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "failed at" in line)
    assert [cell.strip() for cell in header.strip("┃│ ").split("┃")] == WIDE_HEADERS
    assert letters[0].message in result.stdout
    assert "globex" in result.stdout and "validate" in result.stdout


def test_age_uses_the_largest_unit_that_fits() -> None:
    """Ages read 45s, 12m, 3h, 9d; a time in the future (clock skew) reads 0s."""
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    assert [age(now - timedelta(seconds=s), now) for s in (45, 12 * 60 + 5, 3 * 3600 + 1, 9 * 86400)] == [
        "45s",
        "12m",
        "3h",
        "9d",
    ]
    assert age(now + timedelta(seconds=5), now) == "0s"


def test_ids_only_prints_one_id_a_line_newest_first(settings: Settings, tmp_path: Path) -> None:
    """`ls -q` prints only the ids, in the order `ls --json` lists them (for `dlq show $(dlq ls -q ...)`)."""
    put(settings, wide_letters(settings))
    config = config_file(settings, tmp_path)
    as_json = [orjson.loads(line)["id"] for line in ls_at(config, 80, "--json").stdout.splitlines()]
    assert ls_at(config, 80, "-q").stdout.splitlines() == as_json
    assert ls_at(config, 80, "--ids-only", "--limit", "1").stdout.splitlines() == as_json[:1]
