"""How many dead letters one raw record may make: the first items one by one, then one summary letter.

A bulk body of tiny failing items (`[0,0,0,...]`) would otherwise make one letter of several hundred bytes
per item of two bytes. Past `ITEM_LETTERS` letters a record's further letters are only counted (per reason,
with their index ranges) and written as one `more_failed_items` letter at its end. Every letter of the
record points to the same body, so `dlq show` and `dlq redrive` still rebuild the exact request. The bound
that follows is in docs/dead-letters.md.
"""

from __future__ import annotations

from pipeline import reasons
from pipeline.records import DeadLetter, FailureSummary, RawRecord
from pipeline.stream.record_outcomes import dead_letter

ITEM_LETTERS = 100  # letters of one raw record written one by one


class DeadLetterBudget:
    """One raw record's letters: `admit` says if a letter is written, `summary` is the letter of the rest."""

    __slots__ = ("written", "counts", "ranges", "ranges_truncated", "folded")

    def __init__(self) -> None:
        self.written = 0
        self.folded = 0
        self.counts: dict[str, int] = {}
        self.ranges: list[list[int]] = []
        self.ranges_truncated = False

    def admit(self, letter: DeadLetter) -> bool:
        """True: write the letter. False: it is counted into the summary instead."""
        if self.written < ITEM_LETTERS:
            self.written += 1
            return True
        self.folded += 1
        self.counts[letter.reason] = self.counts.get(letter.reason, 0) + 1
        index = letter.index
        if index is not None:
            ranges = self.ranges
            if ranges and ranges[-1][1] + 1 == index:
                ranges[-1][1] = index
            elif len(ranges) < FailureSummary.MAX_RANGES:
                ranges.append([index, index])
            else:
                self.ranges_truncated = True
        return False

    def summary(self, raw: RawRecord, carrier: str | None) -> DeadLetter | None:
        """The `more_failed_items` letter of the letters not written, or None when every one was."""
        if not self.folded:
            return None
        counts = ", ".join(f"{code} x{count}" for code, count in sorted(self.counts.items()))
        letter = dead_letter(
            raw,
            "normalize",
            reasons.MORE_FAILED_ITEMS,
            f"{self.folded} more failing items after the first {self.written} ({counts})",
            index=-1,  # no item of its own; -1 keeps its id apart from the items' and the record's
            body_ref=carrier,
        )
        summary = FailureSummary(
            items=self.folded,
            counts=dict(self.counts),
            ranges=tuple((first, last) for first, last in self.ranges),
            ranges_truncated=self.ranges_truncated,
        )
        return letter.model_copy(update={"summary": summary, "index": None})
