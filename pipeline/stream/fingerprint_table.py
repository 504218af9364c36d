"""The dedup table of one keyed partition: 128-bit fingerprints with their first-seen second, and no
Python object per id (docs/dedup.md has the sizing and the collision bound).

Layout: a power of two of buckets, each a `bytearray` of 20-byte entries (16 bytes of fingerprint, the
first-seen second as 4 bytes little-endian, rounded up so an id is held at least the window). An id's
bucket is given by the low bits of its fingerprint. A lookup is one `bytearray.find` in C over a bucket of
about 48 entries; an insert appends, so each bucket is in order of first sighting and expiry deletes a
bucket's head. When the table averages SPLIT_AT entries a bucket, the bucket count doubles (each bucket
splits in two by one more bit, keeping its order).

Expiry visits only what expires: `generations` lists, per time bucket of first sightings, the buckets
that received an id in it (once per bucket and time bucket, so at high rates far fewer than the ids).

About 22 bytes of entry (with the bytearrays' spare room), 3 of bucket objects and at most 4 of lists per
id held.
"""

from __future__ import annotations

import hashlib
import sys
from array import array

FINGERPRINT_BYTES = 16
ENTRY_BYTES = FINGERPRINT_BYTES + 4
SPLIT_AT = 64  # entries per bucket on average before the bucket count doubles
FIRST_BUCKETS = 64

# A table as bytes: its buckets, and per time bucket (time bucket, bucket count listed under, the list).
TableParts = tuple[list[bytes], list[tuple[int, int, bytes]]]


def fingerprint(key: bytes) -> bytes:
    """The 128-bit BLAKE2b digest of a dedup key (tenant/event_id)."""
    return hashlib.blake2b(key, digest_size=FINGERPRINT_BYTES).digest()


def _zeros(count: int) -> array[int]:
    out = array("I")
    out.frombytes(bytes(4 * count))
    return out


def _bucket_of(fp: bytes, mask: int) -> int:
    return int.from_bytes(fp[:8], "little") & mask


class FingerprintTable:
    """Fingerprints of one keyed partition and their first-seen seconds; expiry by time buckets."""

    def __init__(self, bucket_s: int = 60, buckets: int = FIRST_BUCKETS) -> None:
        self.bucket_s = max(1, bucket_s)
        size = FIRST_BUCKETS
        while size < buckets:
            size *= 2
        self.buckets: list[bytearray] = [bytearray() for _ in range(size)]
        self.mask = size - 1
        self.count = 0
        self.listed_in = _zeros(size)  # per bucket: 1 + the time bucket it was last listed under
        # time bucket -> (bucket count when listed, the buckets listed); a bucket listed under a smaller
        # count stands for every bucket it split into since.
        self.generations: dict[int, tuple[int, array[int]]] = {}

    def __len__(self) -> int:
        return self.count

    def nbytes(self) -> int:
        """Bytes of entries and lists held (the buckets' spare room and object headers not counted)."""
        lists = sum(len(listed) * 4 for _, listed in self.generations.values())
        return self.count * ENTRY_BYTES + lists

    def holds(self, fp: bytes, after_s: int) -> bool:
        """Whether `fp` is held with a first-seen second later than `after_s`."""
        bucket = self.buckets[_bucket_of(fp, self.mask)]
        pos = bucket.find(fp)
        while pos >= 0:
            if pos % ENTRY_BYTES == 0 and int.from_bytes(bucket[pos + 16 : pos + 20], "little") > after_s:
                return True
            pos = bucket.find(fp, pos + 1)
        return False

    def add(self, fp: bytes, second: int) -> None:
        """Hold `fp` as first seen at `second` (a later copy of an id held is a second entry, expired
        later; lookups take any live one)."""
        index = _bucket_of(fp, self.mask)
        bucket = self.buckets[index]
        if self.listed_in[index] != second // self.bucket_s + 1:
            self._list(index, second)
        bucket += fp
        bucket += second.to_bytes(4, "little")
        self.count += 1
        if self.count > len(self.buckets) * SPLIT_AT:
            self._split()

    def add_all(self, fps: bytes, second: int) -> int:
        """Hold every 16-byte fingerprint of `fps` as first seen at `second`; returns how many."""
        count = len(fps) // FINGERPRINT_BYTES
        self.reserve(self.count + count)
        stamp = second.to_bytes(4, "little")
        buckets = self.buckets
        mask = self.mask
        words = array("Q")
        words.frombytes(fps[: count * FINGERPRINT_BYTES])  # low word of each fingerprint at even indexes
        if sys.byteorder == "big":
            words.byteswap()
        listed_in = self.listed_in
        mark = second // self.bucket_s + 1
        for n in range(count):
            index = words[2 * n] & mask
            bucket = buckets[index]
            if listed_in[index] != mark:
                self._list(index, second)
            offset = n * FINGERPRINT_BYTES
            bucket += fps[offset : offset + FINGERPRINT_BYTES]
            bucket += stamp
        self.count += count
        return count

    def reserve(self, ids: int) -> None:
        """Split now to the bucket count `ids` need (cheap while the table is small: a bulk restore)."""
        while ids > len(self.buckets) * SPLIT_AT:
            self._split()

    def discard(self, fp: bytes) -> None:
        """Forget every entry of `fp` (a tombstone of the earlier per-id changelog)."""
        bucket = self.buckets[_bucket_of(fp, self.mask)]
        pos = bucket.find(fp)
        while pos >= 0:
            if pos % ENTRY_BYTES == 0:
                del bucket[pos : pos + ENTRY_BYTES]
                self.count -= 1
                pos = bucket.find(fp, pos)
            else:
                pos = bucket.find(fp, pos + 1)

    def _list(self, index: int, second: int) -> None:
        """List the bucket under the time bucket of `second`."""
        generation = second // self.bucket_s
        self.listed_in[index] = generation + 1
        listed = self.generations.get(generation)
        if listed is None or listed[0] != len(self.buckets):
            previous = listed
            listed = self.generations[generation] = (len(self.buckets), array("I"))
            if previous is not None:  # listed before the last split: map them to today's buckets
                self._keep_older(generation, previous)
        listed[1].append(index)

    def _keep_older(self, generation: int, previous: tuple[int, array[int]]) -> None:
        """A time bucket listed under an older bucket count: its buckets map to more buckets now."""
        size, listed = previous
        step = len(self.buckets) // size
        current = self.generations[generation][1]
        for index in listed:
            for offset in range(step):
                current.append(index + offset * size)

    def _split(self) -> None:
        """Double the bucket count: each bucket splits in two by one more bit of the fingerprint."""
        old = self.buckets
        size = len(old)
        bit = size
        self.buckets = old + [bytearray() for _ in range(size)]
        self.mask = size * 2 - 1
        self.listed_in = self.listed_in + self.listed_in  # a half is listed wherever its bucket was
        for index in range(size):
            bucket = old[index]
            if not bucket:
                continue
            low = bytearray()
            high = bytearray()
            for pos in range(0, len(bucket), ENTRY_BYTES):
                entry = bucket[pos : pos + ENTRY_BYTES]
                if int.from_bytes(entry[:8], "little") & bit:
                    high += entry
                else:
                    low += entry
            self.buckets[index] = bytearray(low)  # copied at their exact size: no spare room
            self.buckets[index + size] = bytearray(high)

    def expire(self, cutoff_s: int, limit: int) -> int:
        """Delete entries first seen at or before `cutoff_s`, by whole time buckets that end by then,
        until about `limit` were deleted; returns how many. Visits the listed buckets' heads only."""
        deleted = 0
        for generation in sorted(g for g in self.generations if (g + 1) * self.bucket_s - 1 <= cutoff_s):
            if deleted >= limit:
                break
            size, listed = self.generations.pop(generation)
            step = len(self.buckets) // size
            for index in listed:
                for offset in range(step):
                    deleted += self._trim(self.buckets[index + offset * size], cutoff_s)
        self.count -= deleted
        return deleted

    @staticmethod
    def _trim(bucket: bytearray, cutoff_s: int) -> int:
        """Delete the bucket's head entries first seen at or before `cutoff_s`."""
        end = 0
        size = len(bucket)
        while end < size and int.from_bytes(bucket[end + 16 : end + 20], "little") <= cutoff_s:
            end += ENTRY_BYTES
        if end:
            del bucket[:end]
        return end // ENTRY_BYTES

    def to_parts(self) -> TableParts:
        """The buckets and the time-bucket lists as bytes, for a checkpoint file."""
        lists = [(g, size, listed.tobytes()) for g, (size, listed) in sorted(self.generations.items())]
        return [bytes(bucket) for bucket in self.buckets], lists

    @classmethod
    def from_parts(cls, bucket_s: int, parts: TableParts) -> FingerprintTable:
        """A table from `to_parts` (a checkpoint file whose checksum its reader has verified)."""
        buckets, lists = parts
        size = len(buckets)
        if size < FIRST_BUCKETS or size & (size - 1) or any(len(b) % ENTRY_BYTES for b in buckets):
            raise ValueError("the table's buckets do not fit together")
        table = cls(bucket_s)
        table.buckets = [bytearray(bucket) for bucket in buckets]
        table.mask = size - 1
        table.listed_in = _zeros(size)  # listing again under a time bucket is harmless
        table.count = sum(len(bucket) for bucket in buckets) // ENTRY_BYTES
        for generation, listed_under, raw in lists:
            listed = array("I")
            listed.frombytes(raw)
            if listed_under > size or size % listed_under or (listed and max(listed) >= listed_under):
                raise ValueError("a time bucket lists buckets the table does not have")
            table.generations[generation] = (listed_under, listed)
        return table
