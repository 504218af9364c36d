"""CleverTap webhook campaigns (POST /clevertap/v4) -> canonical drafts.

One request is one campaign (targetId) and one profile object or an array of them; event name,
id and time come from reserved campaign key-values, our convention (docs/sources.md §4.5, §6.7).
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline import reading as read
from pipeline import reasons
from pipeline.adapting import AuthScheme, Draft, JSONValue, RawMeta, RequestValue, VendorRecord, reject

SOURCE = "clevertap"
BATCHED = True
ROUTES = ("/clevertap/v4",)
AUTH: AuthScheme = "write_key"
REQUEST_META: Mapping[str, RequestValue] = {}
# CleverTap's doc samples disagree on key casing, so these are looked up case-insensitively.
ENVELOPE_KEYS = ("targetId", "key_values", "profiles", "is_test")
PROFILE_KEYS = (
    "identity", "objectId", "profileData", "event_properties", "key_values", "email", "phone", "name",
    "systemProfileData", "push_token", "all_identities", "session_props",
)  # fmt: skip
RESERVED = ("event_name", "event_id", "timestamp")
PROFILE_CONTEXT = ("systemProfileData", "push_token", "all_identities", "session_props")
PROFILE_TRAITS = ("email", "phone", "name")
MAPPED = frozenset({"identity", "objectId", "profileData", "event_properties", "key_values"})


def parse(body: bytes, meta: RawMeta) -> list[VendorRecord]:
    """One record per profile, each carrying the request's targetId, key_values and is_test.

    Broadcast campaigns send `profiles` as an array, personalised ones as a single object (§4.5).
    """
    doc = read.fold_keys(read.as_object(read.json_body(body), "the body"), ENVELOPE_KEYS)
    profiles = doc.get("profiles")
    if isinstance(profiles, dict):
        profiles = [profiles]
    if not isinstance(profiles, list):
        reject(
            reasons.UNEXPECTED_BODY_SHAPE,
            f"profiles must be an object or an array, got {read.kind(profiles)}",
        )
    envelope = read.leftovers(doc, {"profiles"})
    return [{"envelope": envelope, "profile": profile} for profile in profiles]


def normalize(record: VendorRecord, meta: RawMeta) -> Draft:
    """Map one profile onto the canonical fields (§4.5), in the check order of §3.6."""
    pair = read.as_object(record, "a CleverTap record")
    envelope = read.fold_keys(read.as_object(pair.get("envelope"), "the CleverTap envelope"), ENVELOPE_KEYS)
    profile = read.fold_keys(read.as_object(pair.get("profile"), "a profile"), PROFILE_KEYS)
    if _is_test(envelope.get("is_test")):
        reject(reasons.TEST_PAYLOAD, "CleverTap template test request (is_test)", path="is_test")
    # Profile-level key-values override the campaign's (§4.5).
    key_values = {**read.container(envelope, "key_values"), **read.container(profile, "key_values")}
    name = read.event_name(key_values, "event_name")
    user_id = read.identifier(profile, "identity")
    anonymous_id = read.identifier(profile, "objectId")
    if user_id is None and anonymous_id is None:
        reject(
            reasons.MISSING_USER_IDENTITY, "the profile has neither identity nor objectId", path="identity"
        )
    vendor_id = read.event_id(key_values, "event_id")
    # Without the reserved key-value the core falls back to received_at (§6.7).
    when = read.timestamp(key_values, "timestamp", required=False)
    properties = {**read.container(profile, "event_properties"), **key_values}
    for key in RESERVED:
        properties.pop(key, None)
    traits = read.container(profile, "profileData")  # $D_ dates inside are kept as they are
    traits.update({key: profile[key] for key in PROFILE_TRAITS if profile.get(key) is not None})
    context: dict[str, JSONValue] = {"targetId": envelope.get("targetId")}
    context.update({key: profile[key] for key in PROFILE_CONTEXT if key in profile})
    if "is_test" in envelope:
        context["is_test"] = envelope["is_test"]
    vendor = read.leftovers(envelope, ENVELOPE_KEYS)
    context["vendor"] = {
        **vendor,
        **read.leftovers(profile, MAPPED | set(PROFILE_TRAITS) | set(PROFILE_CONTEXT)),
    }
    return Draft(
        event_name=name,
        user_id=user_id,
        anonymous_id=anonymous_id,
        vendor_event_id=vendor_id,
        timestamp=when,
        properties=properties,
        user_traits=traits,
        context=context,
        # Without an event_id key-value, the campaign separates otherwise identical events (§3.5).
        fingerprint_extra={"targetId": envelope.get("targetId")},
    )


def _is_test(flag: JSONValue) -> bool:
    """CleverTap sends a boolean; a "true" string (e.g. from a proxy) counts too, to stay on the safe side."""
    return flag is True or (isinstance(flag, str) and flag.strip().lower() == "true")
