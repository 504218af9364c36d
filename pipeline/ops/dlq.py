"""Reading, filtering and redriving events.dlq (docs/architecture.md, "The dead-letter record").

Plain functions over a `Snapshot` of the topic, so `headwater dlq`, the DLQ web page and tests share them:

    read_snapshot(settings, since) -> Snapshot      every dead letter (unique by id) + the redrive log
    Filters.apply(snapshot) -> [DeadLetter]          newest first
    plan_redrive(letters, ...) -> RedrivePlan        one raw record per raw origin; parked ones skipped
    redrive(settings, plan) -> RedriveSummary        raw.<source> (count + 1), then the redrive log

A redrive republishes the *whole* original body of each selected raw record, once, with its original raw
headers and `hw-redrive-count` + 1. For a bulk payload where only some items failed, the items that passed
the first time pass again and the dedup stage drops them (their ids were marked seen when emitted); the
items that were dead-lettered either pass now or come back as new dead letters (new origin, so new ids)
with the higher count. Every redriven dead letter is recorded on `<topics.dlq>.redrives`, so listings hide
it from then on (`--all` shows it): its fate is now that of the republished record.

A letter of the dedup stage (`redrive_to == "keyed"`, e.g. output_refused) holds a canonical event, not a
request: its redrive sends that event to the keyed topic, in the partition its (tenant, event_id) belongs
to, so the dedup rules decide again; the event was never marked seen, so it comes out once, and a second
redrive of the same letter is dropped as a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline import reasons
from pipeline.config import Settings
from pipeline.errors import HeadwaterError, NotFound
from pipeline.kafka.clients import broker_errors, ensure_topics, make_producer
from pipeline.kafka.partitioning import key_partition
from pipeline.kafka.reading import offsets_at, read_topic
from pipeline.records import CanonicalEvent, DeadLetter, KeyedBatch, UtcDatetime, utc_now

ID_PATTERN = re.compile(r"^dl_[0-9a-f]{24}$")


def redrive_log_topic(settings: Settings) -> str:
    """Where redrives are recorded: the DLQ topic's name + '.redrives' (keyed by dead-letter id)."""
    return f"{settings.topics.dlq}.redrives"


class Redrive(BaseModel):
    """One line of the redrive log: which dead letter went back to which raw record, when."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    redriven_at: UtcDatetime
    redrive_count: int
    raw: str  # "topic:partition:offset" of the republished raw record
    edited: bool = False  # the operator sent a corrected body instead of the original request


@dataclass
class Snapshot:
    """The DLQ as read at one moment: dead letters oldest first (one per id), their stored bytes, redrives."""

    letters: list[DeadLetter] = field(default_factory=list)
    stored: dict[str, bytes] = field(default_factory=dict)
    redrives: dict[str, Redrive] = field(default_factory=dict)
    unreadable: int = 0  # records on the topic that are not dead letters (another version? a tombstone?)

    def find(self, ids: Iterable[str]) -> list[DeadLetter]:
        """The dead letters with these ids, in the order given; NotFound (exit 2) names the bad ones."""
        wanted = list(ids)
        malformed = [i for i in wanted if not ID_PATTERN.match(i)]
        if malformed:
            raise NotFound(
                f"not a dead-letter id: {', '.join(malformed)} (ids look like dl_ + 24 hex digits)"
            )
        by_id = {d.id: d for d in self.letters}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise NotFound(f"no dead letter with id {', '.join(missing)}")
        return [by_id[i] for i in wanted]


@dataclass(frozen=True)
class Filters:
    """A selection of dead letters; None means "any". `reason` also matches a prefix before ':'."""

    source: str | None = None
    tenant: str | None = None
    reason: str | None = None
    stage: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    include_redriven: bool = False
    limit: int | None = None

    def matches(self, letter: DeadLetter, redriven: bool = False) -> bool:
        return (
            (self.source is None or letter.source == self.source)
            and (self.tenant is None or letter.tenant == self.tenant)
            and (
                self.reason is None
                or letter.reason == self.reason
                or letter.reason.partition(":")[0] == self.reason
            )
            and (self.stage is None or letter.stage == self.stage)
            and (self.since is None or letter.failed_at >= self.since)
            and (self.until is None or letter.failed_at < self.until)
            and (self.include_redriven or not redriven)
        )

    def apply(self, snapshot: Snapshot) -> list[DeadLetter]:
        """The matching dead letters, newest first, at most `limit`."""
        chosen = [d for d in snapshot.letters if self.matches(d, d.id in snapshot.redrives)]
        chosen.sort(key=lambda d: d.failed_at, reverse=True)
        return chosen[: self.limit] if self.limit is not None else chosen


# --- reading ---------------------------------------------------------------------------------------------


async def read_snapshot(settings: Settings, since: datetime | None = None) -> Snapshot:
    """Read events.dlq (from `since` on, by Kafka timestamp) and the redrive log; a missing topic is empty.

    A dead letter is written after it failed, so its record's timestamp is never before `failed_at`:
    starting at the first offset at or after `since` misses nothing that `Filters(since=...)` keeps.
    Letters that point to their raw record's body (body_ref) are returned with the body filled in (the
    string is shared, not copied), so show, redrive and the page see every letter whole; `stored` keeps
    each record as written, so an export stays proportional and holds the carrier its refs name.
    """
    topic = settings.topics.dlq
    start = await offsets_at(settings, topic, int(since.timestamp() * 1000)) if since is not None else None
    records, log = await asyncio.gather(
        read_topic(settings, topic, start=start), read_topic(settings, redrive_log_topic(settings))
    )
    snapshot = Snapshot()
    by_id: dict[str, DeadLetter] = {}
    carriers: dict[str, DeadLetter] = {}
    for record in records:
        try:
            letter = DeadLetter.from_json(record.value or b"")
        except ValueError:
            snapshot.unreadable += 1
            continue
        by_id.pop(letter.id, None)  # a record processed twice (crash) is dead-lettered twice with one id
        by_id[letter.id] = letter
        snapshot.stored[letter.id] = record.value or b""
    unresolved = {d.body_ref for d in by_id.values() if d.body_ref is not None and d.body_ref not in by_id}
    if unresolved and start is not None:  # a carrier written just before `since`: look for it everywhere
        for record in await read_topic(settings, topic):
            with contextlib.suppress(ValueError):
                letter = DeadLetter.from_json(record.value or b"")
                if letter.id in unresolved:
                    carriers[letter.id] = letter
    for letter_id, letter in list(by_id.items()):
        if letter.body_ref is not None:
            carrier = by_id.get(letter.body_ref) or carriers.get(letter.body_ref)
            if carrier is None or carrier.body_b64 is None:
                continue  # its carrier is gone (retention?): the letter is listed, its body unknown
            by_id[letter_id] = letter.with_body_of(carrier)  # `stored` keeps the record as written
    snapshot.letters = sorted(by_id.values(), key=lambda d: d.failed_at)
    for record in log:
        try:
            entry = Redrive.model_validate_json(record.value or b"")
        except ValueError:
            continue
        snapshot.redrives[entry.id] = entry
    return snapshot


def export_lines(snapshot: Snapshot, letters: Sequence[DeadLetter]) -> Iterator[bytes]:
    """Each letter as stored and, once before its first referrer, the carrier of a body_ref not selected."""
    selected = {d.id for d in letters}
    added: set[str] = set()
    for letter in letters:
        stored = snapshot.stored[letter.id]
        ref = orjson.loads(stored).get("body_ref") if b'"body_ref":"' in stored else None
        if ref and ref not in selected and ref not in added and ref in snapshot.stored:
            added.add(ref)
            yield snapshot.stored[ref]
        yield stored


# --- summaries -------------------------------------------------------------------------------------------


def count_by_source_and_reason(letters: Iterable[DeadLetter]) -> Counter[tuple[str, str]]:
    """(source, reason) -> number of dead letters."""
    return Counter((d.source, d.reason) for d in letters)


def pretty_body(letter: DeadLetter) -> tuple[str, bool]:
    """The original body for people: indented JSON when it parses, else the text as is. (text, is_json)"""
    body = letter.body
    try:
        return orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode(), True
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "backslashreplace"), False


def as_row(letter: DeadLetter, redriven: bool = False) -> dict[str, object]:
    """The columns `ls` and the web page show."""
    return {
        "id": letter.id,
        "failed_at": letter.failed_at,
        "source": letter.source,
        "tenant": letter.tenant,
        "stage": letter.stage,
        "reason": letter.reason,
        "index": letter.index,
        "redrives": letter.redrive_count,
        "redriven": redriven,
        "message": letter.message,
    }


# --- redrive ---------------------------------------------------------------------------------------------


@dataclass
class RedrivePlan:
    """What a redrive will do: one raw record per raw origin, and the dead letters it covers."""

    selected: list[DeadLetter]
    records: list[tuple[DeadLetter, list[DeadLetter]]] = field(
        default_factory=list
    )  # (representative, covered)
    parked: list[DeadLetter] = field(default_factory=list)  # reason redrive_limit, without --reset-count
    foreign: list[DeadLetter] = field(default_factory=list)  # no Headwater raw headers: nothing to rebuild
    reset_count: bool = False
    body: bytes | None = None  # a corrected body to send instead of the original (one raw record only)

    @property
    def skipped(self) -> int:
        return len(self.parked) + len(self.foreign)


@dataclass
class RedriveSummary:
    selected: int
    republished: int
    skipped: int
    merged: int  # dead letters redriven by another letter's raw record (items of one bulk payload)
    dry_run: bool
    records: list[str] = field(default_factory=list)  # "topic:partition:offset" of each republished record

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def plan_redrive(
    letters: Sequence[DeadLetter], reset_count: bool = False, body: bytes | None = None
) -> RedrivePlan:
    """Group the selected letters by their raw record; skip parked and foreign ones.

    Parked letters (`redrive_limit`) would only be parked again; `reset_count` restarts their count. With
    `body` (the operator fixed the request) the selection must be one raw record, sent with that body
    under its original headers; HeadwaterError otherwise.
    """
    plan = RedrivePlan(selected=list(letters), reset_count=reset_count, body=body)
    groups: dict[str, list[DeadLetter]] = {}
    for letter in letters:
        if letter.reason == reasons.INVALID_RAW_HEADERS.code:
            plan.foreign.append(letter)
        elif letter.reason == reasons.REDRIVE_LIMIT.code and not reset_count:
            plan.parked.append(letter)
        elif letter.redrive_to == "keyed":  # one canonical event per letter
            groups.setdefault(letter.id, []).append(letter)
        else:
            groups.setdefault(letter.origin.ref(), []).append(letter)
    plan.records = [(group[0], group) for group in groups.values()]
    if body is not None and len(plan.records) != 1:
        raise HeadwaterError(
            f"a corrected body replaces one request, but the selection covers {len(plan.records)} raw "
            "records; select the letters of one request (dlq show gives its raw record)"
        )
    return plan


async def redrive(settings: Settings, plan: RedrivePlan, dry_run: bool = False) -> RedriveSummary:
    """Republish each planned raw record to raw.<source> (count + 1), then log the letters it covers."""
    covered = sum(len(group) for _, group in plan.records)
    summary = RedriveSummary(
        selected=len(plan.selected),
        republished=0,
        skipped=plan.skipped,
        merged=covered - len(plan.records),
        dry_run=dry_run,
    )
    if dry_run or not plan.records:
        return summary
    log_topic = redrive_log_topic(settings)
    raw_topics = {settings.topics.raw(d.source) for d, _ in plan.records if d.redrive_to == "raw"}
    if raw_topics:
        await ensure_topics(settings, raw_topics)
    await ensure_topics(settings, [log_topic], partitions=1)
    producer = make_producer(settings)
    async with broker_errors("redriving dead letters", access=settings.kafka):
        await producer.start()
        try:
            sends = []
            for letter, _ in plan.records:  # the letters of one raw record share its headers and count
                body = letter.body if plan.body is None else plan.body
                if letter.redrive_to == "keyed":
                    topic, partition, value = keyed_record(settings, body)
                    sends.append(await producer.send(topic, value, partition=partition))
                    continue
                headers = letter.raw_headers().model_copy(update={"redrive_count": _next_count(plan, letter)})
                sends.append(
                    await producer.send(settings.topics.raw(letter.source), body, headers=headers.to_kafka())
                )
            acks = await asyncio.gather(*sends)
            now = utc_now()
            logged = []
            for (letter, group), ack in zip(plan.records, acks, strict=True):
                ref = f"{ack.topic}:{ack.partition}:{ack.offset}"
                summary.records.append(ref)
                for covered_letter in group:
                    entry = Redrive(
                        id=covered_letter.id,
                        redriven_at=now,
                        redrive_count=_next_count(plan, letter),
                        raw=ref,
                        edited=plan.body is not None,
                    )
                    logged.append(
                        await producer.send(
                            log_topic, orjson.dumps(entry.model_dump(mode="json")), key=entry.id.encode()
                        )
                    )
            await asyncio.gather(*logged)
            summary.republished = len(acks)
        finally:
            await producer.stop()
    return summary


def keyed_record(settings: Settings, event_json: bytes) -> tuple[str, int, bytes]:
    """(topic, partition, value) of a canonical event sent back through the dedup rules: a keyed pack of
    one, in the keyed partition of its (tenant, event_id), as the normalize stage routes it."""
    try:
        event = CanonicalEvent.model_validate_json(event_json)
    except ValidationError as exc:
        raise HeadwaterError(f"the body is not a valid canonical event: {exc.errors()[0]['msg']}") from exc
    pack = KeyedBatch()
    pack.add_json(event.dedup_key(), event.kafka_key(), event_json)
    partition = key_partition(event.dedup_key().encode(), settings.kafka.partitions)
    return settings.topics.keyed, partition, pack.to_bytes()


def _next_count(plan: RedrivePlan, letter: DeadLetter) -> int:
    return 1 if plan.reset_count else letter.redrive_count + 1
