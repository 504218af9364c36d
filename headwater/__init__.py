"""Headwater's public helpers for customers who receive our reward webhooks (docs/sources.md §5).

    from headwater import verify_signature
    ok = verify_signature(raw_body, request.headers["X-CG-SIGNATURE"], token)

Verify against the raw request body. `verify_standard_webhook` checks the optional Standard Webhooks
headers (webhook-id, webhook-timestamp, webhook-signature) and rejects stale timestamps (replays).
"""

from pipeline.signing import verify_signature
from pipeline.signing import verify_standard as verify_standard_webhook

__all__ = ["verify_signature", "verify_standard_webhook"]
