"""When `headwater up` may say "ready": the receiver answers and the workers' stages own every partition.

Read from what the processes serve: the receiver's /readyz and each worker's /health, whose stages list
the partitions they own and how many their topic has. A stage is ready when the workers together own all
of its topic's partitions (a worker beyond the partition count owns none, and that is fine).
"""

from __future__ import annotations

import contextlib
import json
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from typing import Any


def answers(url: str, timeout_s: float = 1.0) -> bool:
    """Whether GET url answers 200."""
    with contextlib.suppress(OSError, ValueError):
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - our own loopback URLs
            return bool(response.status == 200)
    return False


def health(url: str, timeout_s: float = 1.0) -> dict[str, Any] | None:
    """A worker's /health document (200 or 503 alike), or None while it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - loopback URLs
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:  # 503: stalled, still a document
        with contextlib.suppress(ValueError):
            return dict(json.loads(exc.read()))
    except (OSError, ValueError):
        pass
    return None


def stages_waiting(documents: Sequence[dict[str, Any] | None]) -> list[str]:
    """The stages whose topics are not yet owned whole by the workers ("worker N" for one that does not
    answer yet); empty when every stage of every worker owns its share."""
    waiting = [f"worker {i}" for i, doc in enumerate(documents) if doc is None]
    owned: dict[str, set[int]] = defaultdict(set)
    partitions: dict[str, int] = {}
    for doc in documents:
        for name, stage in (doc or {}).get("stages", {}).items():
            owned[name].update(stage.get("partitions_owned", ()))
            partitions[name] = max(partitions.get(name, 0), int(stage.get("partitions", 0)))
    waiting += [name for name, total in sorted(partitions.items()) if not total or len(owned[name]) < total]
    return waiting
