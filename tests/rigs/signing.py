"""The spec's signing examples (docs/sources.md §5), shared by the signing and reward delivery tests."""

from __future__ import annotations

import json
from typing import Any

WORKED_BODY = (
    b'{"campaignId":"5d1c7e2a-0b3f-4c6d-9a8e-7f1b2c3d4e5f","type":"spinthewheel","userId":"usr_3344",'
    b'"rewardId":"9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d","rewardName":"50 Points","rewardAmount":50,'
    b'"details":{"rewardCategory":"points"}}'
)


WORKED_TOKEN = "whk_demo_token_123"


WORKED_DIGEST = "4bf3191cdfda708a7469a5eaec0fe1e4ef682a5c"


# The Standard Webhooks specification's published test vector.
SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


UNICODE_REWARD: dict[str, Any] = {
    "campaignId": "c-ü",
    "type": "quiz",
    "userId": "usuário_42",
    "rewardId": "r-unicode-1",
    "rewardName": "Café ☕ 50 очков 积分 🎁",
    "rewardAmount": 12.5,
    "code": "ÉTÉ-2024",
    "details": {"currency": "€", "note": 'line\nbreak "quoted" \\ tab\t', "userAName": "Zoë"},
}


def python_reserialized(body: bytes, ensure_ascii: bool = False) -> bytes:
    """What the vendor's Python sample verifier hashes: the parsed body, dumped again compactly."""
    return json.dumps(json.loads(body), separators=(",", ":"), ensure_ascii=ensure_ascii).encode("utf-8")
