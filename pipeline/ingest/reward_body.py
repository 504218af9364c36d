"""A POST /rewards/v1 body -> one record per reward, each the exact bytes the sender wrote, plus the items
intake will dead-letter (and why), listed in the 200 answer so the sender learns about them at once.

An array is cut into its elements by scanning (pipeline.ingest.jsonspan), not parsed and re-encoded, and an
array over the limit is refused while scanning, before any element is looked at. A body that is not a
well-formed array is kept whole (one object, or invalid JSON that intake dead-letters): nothing a sender
posted is lost.
"""

from __future__ import annotations

import orjson

from pipeline import reasons
from pipeline.ingest.jsonspan import array_elements
from pipeline.rewards.records import RewardRejected, validate_reward

Invalid = dict[str, object]


def split_reward_body(body: bytes, limit: int) -> tuple[list[bytes], list[Invalid]]:
    """(records, invalid items); raises jsonspan.TooManyItems past `limit` rewards."""
    elements = array_elements(body, limit)
    if elements is None:
        verdict = reward_verdict(body)
        return [body], [] if verdict is None else [{"index": None, "reason": verdict}]
    invalid: list[Invalid] = []
    for index, element in enumerate(elements):
        verdict = reward_verdict(element)
        if verdict is not None:
            invalid.append({"index": index, "reason": verdict})
    return elements, invalid


def reward_verdict(record: bytes) -> str | None:
    """The reason code intake will dead-letter this record with, or None when it is a valid reward."""
    try:
        doc = orjson.loads(record)
    except orjson.JSONDecodeError:
        return reasons.REWARD_INVALID_JSON.code
    try:
        validate_reward(doc)
    except RewardRejected as rejected:
        return rejected.reason.code
    return None
