"""A keyed partition's transactional producer and table after the broker goes away mid-transaction: the
producer lost to a failed abort is re-created on a later batch (with back-off), and what the changelog
holds past the table is read before the partition decides again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from rigs.kafka import read_records, start_local_broker

from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics
from pipeline.kafka.local import LocalKafka
from pipeline.stream.changelog_reader import ChangelogReader
from pipeline.stream.dedup import Deduplicator
from pipeline.stream.fingerprint_table import fingerprint
from pipeline.stream.transactions import NotOwned, PartitionTransactions

pytestmark = pytest.mark.slow


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalKafka]:
    """A broker of this test alone (it is stopped mid-transaction), on free ports, gone at the end."""
    broker = start_local_broker(tmp_path / "kafka")
    try:
        yield broker
    finally:
        broker.down()


def test_a_producer_lost_while_the_broker_was_away_is_re_created_and_the_next_batch_commits(
    make_settings: Callable[..., Settings], own_broker: LocalKafka
) -> None:
    """The broker is gone when a batch commits: the transaction fails, its abort and the producer's
    re-creation fail, the partition has no producer. Once the broker is back, a later batch re-creates it
    (after its back-off) and commits; only that batch's record is there for a read_committed reader."""
    settings = make_settings(kafka={"bootstrap_servers": own_broker.bootstrap, "partitions": 1})
    topics = settings.topics

    loop = asyncio.new_event_loop()  # one loop across the phases; the broker is stopped and started between
    transactions = PartitionTransactions(settings, f"{settings.worker.app_id}-dedup")
    offsets = {TopicPartition(topics.keyed, 0): 1}
    outcomes: list[str] = []

    async def start() -> None:
        await ensure_topics(settings, [topics.keyed, topics.canonical])
        assert await transactions.own({0}) == set()

    async def fail() -> None:
        with pytest.raises(Exception):  # noqa: B017 - whichever error the broker's absence gives
            await asyncio.wait_for(
                transactions.commit(0, [(topics.canonical, b"k", b"lost", 0)], offsets), 120
            )
        outcomes.append("failed")
        assert 0 not in transactions.producers

    async def recover() -> None:
        for _ in range(200):
            try:
                await transactions.commit(0, [(topics.canonical, b"k", b"after", 0)], offsets)
            except NotOwned:
                outcomes.append("backing off")
                await asyncio.sleep(0.5)  # the back-off this test observes
                continue
            except Exception:  # noqa: BLE001 - the broker may still be electing
                outcomes.append("retry")
                await asyncio.sleep(0.5)
                continue
            outcomes.append("committed")
            return

    try:
        loop.run_until_complete(start())
        own_broker.down()
        loop.run_until_complete(fail())
        own_broker.up(bound_to_parent=True)
        loop.run_until_complete(recover())
    finally:
        loop.run_until_complete(transactions.close())
        loop.close()
    assert outcomes[0] == "failed" and outcomes[-1] == "committed"
    assert [r.value for r in read_records(settings, topics.canonical)] == [b"after"]


def test_a_re_sync_reads_what_a_transaction_committed_past_the_table(
    make_settings: Callable[..., Settings], own_broker: LocalKafka
) -> None:
    """A transaction whose outcome the stage did not learn: its changelog record is read from the table's
    position once no transaction is open, so the batch's ids are duplicates when it is replayed."""
    settings = make_settings(kafka={"bootstrap_servers": own_broker.bootstrap, "partitions": 1})
    topic = f"{settings.worker.app_id}-dedup-changelog"

    async def run() -> Deduplicator:
        await ensure_topics(settings, [topic, settings.topics.keyed])
        transactions = PartitionTransactions(settings, f"{settings.worker.app_id}-dedup")
        await transactions.own({0})
        fps = [fingerprint(b"acme/a"), fingerprint(b"acme/b")]
        [(key, value)] = Deduplicator.changelog_records(fps, 0, 1_700_000_000_000, 5)
        try:
            await transactions.commit(
                0, [(topic, key, value, 0)], {TopicPartition(settings.topics.keyed, 0): 6}
            )
        finally:
            await transactions.close()
        dedup = Deduplicator(10**9)
        async with ChangelogReader(settings, topic) as reader:
            ends = await reader.settled_ends([0])
            held = await reader.read({0: 0}, ends)
        for record_key, record_value in held[0]:
            dedup.restore(0, record_key, record_value, 1_700_000_000_000)
        return dedup

    dedup = asyncio.run(run())
    verdicts = dedup.decide(0, [(b"acme/a", b"", b"{}"), (b"acme/c", b"", b"{}")], 1_700_000_000_000)
    assert [c[0] for c in verdicts.emit] == [b"acme/c"] and verdicts.duplicates == 1
