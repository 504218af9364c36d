"""Reward webhook bodies and signatures (docs/sources.md §5): pure functions, no broker."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from rigs.signing import (
    SW_SECRET,
    UNICODE_REWARD,
    WORKED_BODY,
    WORKED_DIGEST,
    WORKED_TOKEN,
    python_reserialized,
)

import headwater
from pipeline.cli import main
from pipeline.config import RewardsWebhook
from pipeline.signing import (
    canonical_body,
    cg_signature,
    standard_headers,
    standard_signature,
    verify_signature,
    verify_standard,
)

# The vendor page's Python sample: its sampleObj, token and the header value it shows.
VENDOR_SAMPLE = {
    "campaignId": "6bab1116-ae8e-4644-9cee-7a3d8ee9aff3",
    "type": "direct",
    "userId": "test-8-june-9",
    "rewardId": "acdc71c6-08ad-4cd9-8c1e-3c812487b854",
    "rewardName": "$15",
    "rewardAmount": 15,
    "details": {
        "currency": "USD",
        "value": 15,
        "reward_reason": "got_referred",
        "userAName": "Test Solve 7",
        "userAId": "test-8-june-7",
    },
}
VENDOR_TOKEN = "PbTJp694bmgrfJpJPQmrjGfjgq"
VENDOR_DIGEST = "f2719895b483fbf3f98e1936bc88271cbe74f138"
SW_ID, SW_TIMESTAMP, SW_BODY = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
SW_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


class TestWorkedExamples:
    def test_worked_example_body_and_digest(self) -> None:
        """The spec's worked example: our serialization gives its exact bytes and digest 4bf3191c… (§5)."""
        body = canonical_body(json.loads(WORKED_BODY))
        assert body == WORKED_BODY
        assert cg_signature(body, WORKED_TOKEN) == WORKED_DIGEST
        assert headwater.verify_signature(body, WORKED_DIGEST, WORKED_TOKEN)

    def test_vendor_sample_digest(self) -> None:
        """The vendor page's own Python sample yields f2719895…: SHA-1, compact separators, hex (§5)."""
        body = canonical_body(VENDOR_SAMPLE)
        assert cg_signature(body, VENDOR_TOKEN) == VENDOR_DIGEST
        assert body == python_reserialized(body)

    def test_standard_webhooks_vector(self) -> None:
        """Our Standard Webhooks signature matches the specification's published test vector."""
        assert standard_signature(SW_ID, SW_TIMESTAMP, SW_BODY, SW_SECRET) == SW_SIGNATURE
        headers = {
            "webhook-id": SW_ID,
            "webhook-timestamp": str(SW_TIMESTAMP),
            "webhook-signature": SW_SIGNATURE,
        }
        assert verify_standard(SW_BODY, headers, SW_SECRET, now=SW_TIMESTAMP + 10)


class TestVerifySignature:
    def test_wrong_token_tampered_body_or_garbage_fail(self) -> None:
        """Only the exact body under the right token verifies; anything else is False, never an error."""
        assert not verify_signature(WORKED_BODY, WORKED_DIGEST, "whk_other")
        assert not verify_signature(WORKED_BODY.replace(b"50", b"51"), WORKED_DIGEST, WORKED_TOKEN)
        for header in ("", "0" * 40, WORKED_DIGEST[:-1], "zz", "é" * 40):
            assert not verify_signature(WORKED_BODY, header, WORKED_TOKEN)

    def test_header_case_and_surrounding_spaces_do_not_matter(self) -> None:
        """Hex is hex: an upper-case header or one with spaces around it still verifies."""
        assert verify_signature(WORKED_BODY, f"  {WORKED_DIGEST.upper()} ", WORKED_TOKEN)

    def test_facade_exports_only_the_helpers(self) -> None:
        """The public `headwater` package is the verification helpers and nothing else."""
        assert headwater.__all__ == ["verify_signature", "verify_standard_webhook"]


class TestCanonicalBody:
    def test_unicode_body_verifies_raw_and_reserialized(self) -> None:
        """Non-ASCII goes out as raw UTF-8, so the helper and a re-serializing Python verifier both agree."""
        body = canonical_body(UNICODE_REWARD)
        assert "Café ☕".encode() in body and b"\\u" not in body
        digest = cg_signature(body, WORKED_TOKEN)
        assert verify_signature(body, digest, WORKED_TOKEN)
        assert cg_signature(python_reserialized(body), WORKED_TOKEN) == digest
        # the vendor-side bug the spec warns about: a Python verifier left on ensure_ascii=True fails
        assert cg_signature(python_reserialized(body, ensure_ascii=True), WORKED_TOKEN) != digest

    def test_spec_key_order_whatever_the_input_order(self) -> None:
        """Known fields in the spec's table order, other keys after them sorted; input order is irrelevant."""
        shuffled = {
            "zeta": 1,
            "details": {},
            "rewardId": "r",
            "alpha": True,
            "userId": "u",
            "campaignId": "c",
        }
        assert list(json.loads(canonical_body(shuffled))) == [
            "campaignId",
            "userId",
            "rewardId",
            "details",
            "alpha",
            "zeta",
        ]

    def test_integers_stay_integers(self) -> None:
        """15.0 is written 15 (as JSON.stringify does); 12.5 stays 12.5; ints and bools are untouched."""
        body = canonical_body({"rewardAmount": 15.0, "details": {"a": 12.5, "b": [1.0, True, 3]}})
        assert body == b'{"rewardAmount":15,"details":{"a":12.5,"b":[1,true,3]}}'

    def test_array_index_keys_come_first_as_in_javascript(self) -> None:
        """Keys like "10" are moved ahead of the others, where JSON.parse+stringify would put them."""
        body = canonical_body({"details": {"b": 1, "10": 2, "a": 3, "2": 4, "01": 5}})
        assert body == b'{"details":{"2":4,"10":2,"b":1,"a":3,"01":5}}'

    @settings(max_examples=300, deadline=None)
    @given(
        st.dictionaries(
            st.text(max_size=8),
            st.recursive(
                st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
                lambda inner: (
                    st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
                ),
                max_leaves=8,
            ),
            max_size=8,
        )
    )
    def test_python_reserialization_reproduces_the_body(self, reward: dict[str, Any]) -> None:
        """For any JSON object, json.dumps(json.loads(body), compact, ensure_ascii=False) gives our exact
        bytes."""
        body = canonical_body(reward)
        assert python_reserialized(body) == body

    @pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
    def test_javascript_reserialization_reproduces_the_body(self) -> None:
        """JSON.stringify(JSON.parse(body)), the vendor's Node verifier, gives our exact bytes."""
        bodies = [
            canonical_body(r)
            for r in (
                UNICODE_REWARD,
                VENDOR_SAMPLE,
                json.loads(WORKED_BODY),
                {
                    "rewardId": "r",
                    "details": {"b": 1, "10": 2, "0": 0, "x": [15.0, -0.0, 1e-3, "\u2028\x7f\x01"]},
                },
            )
        ]
        script = (
            "const bodies = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
            "process.stdout.write(JSON.stringify(bodies.map(b => JSON.stringify(JSON.parse(b)))));"
        )
        payload = json.dumps([b.decode() for b in bodies])
        out = subprocess.run(
            ["node", "-e", script], input=payload.encode(), capture_output=True, timeout=30, check=True
        )
        assert [s.encode() for s in json.loads(out.stdout)] == bodies


class TestStandardWebhooks:
    def test_rotation_sends_one_signature_per_secret(self) -> None:
        """With two secrets configured, either one verifies: keys rotate without a missed delivery."""
        old, new = SW_SECRET, "whsec_" + "c2VjcmV0LW9mLWEtcm90YXRlZC1lbmRwb2ludA=="
        headers = standard_headers("r-1", WORKED_BODY, [old, new])
        assert len(headers["webhook-signature"].split()) == 2
        assert verify_standard(WORKED_BODY, headers, old) and verify_standard(WORKED_BODY, headers, new)
        assert not verify_standard(WORKED_BODY + b" ", headers, old)

    def test_stale_timestamp_is_refused(self) -> None:
        """A signature older than the tolerance is a replay and does not verify."""
        headers = standard_headers("r-1", WORKED_BODY, [SW_SECRET], timestamp=1_700_000_000)
        assert verify_standard(WORKED_BODY, headers, SW_SECRET, now=1_700_000_100)
        assert not verify_standard(WORKED_BODY, headers, SW_SECRET, now=1_700_000_000 + 301)

    def test_config_refuses_secrets_not_in_whsec_form(self) -> None:
        """standard_webhooks_secrets must be whsec_<base64> of 24-64 bytes; the error says so at start-up."""
        with pytest.raises(ValidationError, match="whsec_"):
            RewardsWebhook(url="https://x.example", standard_webhooks_secrets=["plain-secret"])  # type: ignore[list-item]
        with pytest.raises(ValidationError, match="24..64"):
            RewardsWebhook(url="https://x.example", standard_webhooks_secrets=["whsec_c2hvcnQ="])  # type: ignore[list-item]


class TestSignCommand:
    def test_sign_prints_the_worked_example_digest(self) -> None:
        """`headwater rewards sign --token T < body.json` prints the X-CG-SIGNATURE value of the exact
        bytes."""
        result = CliRunner().invoke(main, ["rewards", "sign", "--token", WORKED_TOKEN], input=WORKED_BODY)
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == WORKED_DIGEST

    def test_sign_canonical_reserializes_first(self) -> None:
        """--canonical signs what the dispatcher would send, so a pretty-printed file gives the same
        digest."""
        pretty = json.dumps(json.loads(WORKED_BODY), indent=2).encode() + b"\n"
        result = CliRunner().invoke(
            main, ["rewards", "sign", "--canonical", "--token", WORKED_TOKEN], input=pretty
        )
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == WORKED_DIGEST
