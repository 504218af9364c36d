"""Local checkpoints of the dedup tables, so a restart reads only the changelog written since
(docs/dedup.md, "Restarts"). Like Kafka Streams' state directory and checkpoint files.

One file per keyed partition under `<data_dir>/<app_id>/dedup/`: a header (format, app id, changelog
topic, keyed partition and partition count, time-bucket length, the changelog offset the table is complete
up to), the table's buckets and time-bucket lists, and a CRC-32 of all of it. It is written to a temporary
file, synced and renamed over the last one, so a SIGKILL while writing leaves the previous file whole, and a
torn or foreign file is refused by its reader (then the partition is restored from the whole changelog).

The offset is the changelog position the table holds everything before: where its restore ended, or
just past the newest changelog record this worker committed itself. Never the topic's end, which may
already hold another owner's records after a rebalance.

The directory has one owner at a time: an exclusive `flock` next to it, so a second worker on the same
data_dir fails with StoreLocked instead of overwriting the first one's files.
"""

from __future__ import annotations

import fcntl
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import orjson

from pipeline.errors import HeadwaterError
from pipeline.stream.fingerprint_table import FingerprintTable, TableParts

log = logging.getLogger(__name__)

FORMAT = "headwater-dedup-checkpoint-1"
MAGIC = b"HWCK"


class StoreLocked(HeadwaterError):
    """Another process holds this dedup state's directory (two workers on one data_dir?)."""


@dataclass(frozen=True)
class Identity:
    """What a checkpoint must match to be trusted: whose state, of which partition layout."""

    app_id: str
    changelog_topic: str
    partitions: int  # of the keyed topic (ids map to partitions by it)
    bucket_s: int


@dataclass
class Checkpoint:
    """A table read back from disk and the changelog offset it is complete up to."""

    table: FingerprintTable
    offset: int


class CheckpointStore:
    """The checkpoint files of one worker's dedup tables."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_exclusively(directory / ".lock")
        self.directory = directory
        self.identity: Identity | None = None  # known once the keyed topic's partition count is

    def _identity(self) -> Identity:
        if self.identity is None:
            raise ValueError("no identity to check checkpoints against yet")
        return self.identity

    def path(self, partition: int) -> Path:
        return self.directory / f"partition-{partition}.checkpoint"

    def write(self, partition: int, parts: TableParts, offset: int) -> int:
        """Replace the partition's checkpoint (a table's `to_parts`), durably; returns the bytes written."""
        buckets, lists = parts
        identity = self._identity()
        header = orjson.dumps(
            {
                "format": FORMAT,
                "app_id": identity.app_id,
                "changelog_topic": identity.changelog_topic,
                "partition": partition,
                "partitions": identity.partitions,
                "bucket_s": identity.bucket_s,
                "offset": offset,
                "buckets": [len(bucket) for bucket in buckets],
                "lists": [[generation, size, len(raw)] for generation, size, raw in lists],
            }
        )
        chunks = [MAGIC, len(header).to_bytes(4, "big"), header, *buckets, *(raw for _, _, raw in lists)]
        crc = 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
        final = self.path(partition)
        temporary = final.with_name(final.name + ".tmp")
        with temporary.open("wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.write(crc.to_bytes(4, "big"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, final)
        _sync_directory(self.directory)
        return sum(len(chunk) for chunk in chunks) + 4

    def read(self, partition: int) -> Checkpoint | None:
        """The partition's checkpoint, or None (with the reason logged) if there is none it can trust."""
        path = self.path(partition)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return self._parse(partition, data)
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            log.warning("dedup: ignoring the checkpoint %s (%s); restoring the whole changelog", path, exc)
            return None

    def _parse(self, partition: int, data: bytes) -> Checkpoint:
        if len(data) < 12 or not data.startswith(MAGIC):
            raise ValueError("not a checkpoint file")
        if zlib.crc32(data[:-4]) != int.from_bytes(data[-4:], "big"):
            raise ValueError("its checksum does not match (written partly?)")
        size = int.from_bytes(data[4:8], "big")
        header = orjson.loads(data[8 : 8 + size])
        identity = self._identity()
        expected = {
            "format": FORMAT,
            "app_id": identity.app_id,
            "changelog_topic": identity.changelog_topic,
            "partition": partition,
            "partitions": identity.partitions,
            "bucket_s": identity.bucket_s,
        }
        for name, value in expected.items():
            if header.get(name) != value:
                raise ValueError(f"it was written for {name} = {header.get(name)!r}, not {value!r}")
        position = 8 + size
        buckets: list[bytes] = []
        for length in header["buckets"]:
            buckets.append(data[position : position + int(length)])
            position += int(length)
        lists: list[tuple[int, int, bytes]] = []
        for generation, listed_under, length in header["lists"]:
            lists.append((int(generation), int(listed_under), data[position : position + int(length)]))
            position += int(length)
        if position != len(data) - 4:
            raise ValueError("its parts do not add up to its size")
        table = FingerprintTable.from_parts(identity.bucket_s, (buckets, lists))
        return Checkpoint(table, int(header["offset"]))

    def remove(self, partition: int) -> None:
        self.path(partition).unlink(missing_ok=True)

    def close(self) -> None:
        self._lock.close()  # releases the flock


def _sync_directory(directory: Path) -> None:
    """fsync a directory, so a rename in it survives a power loss."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _lock_exclusively(path: Path) -> IO[str]:
    """An exclusive, non-blocking flock on `path`, held while the returned file is open."""
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise StoreLocked(
            f"the dedup state {path.parent} is in use by {holder}; give each worker its own worker.data_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle
