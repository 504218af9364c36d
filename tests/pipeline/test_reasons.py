"""The reason-code catalogue covers docs/sources.md §3.6 and our own codes."""

from __future__ import annotations

from pipeline.reasons import CATALOGUE, UNKNOWN, WRONG_TYPE, Reason, lookup

SPEC_CODES = [
    "invalid_json",
    "unexpected_body_shape",
    "api_key_mismatch",
    "license_code_mismatch",
    "test_payload",
    "unsupported_type",
    "missing_event_name",
    "wrong_type",
    "missing_user_identity",
    "invalid_event_id",
    "missing_timestamp",
    "invalid_timestamp",
]
OUR_CODES = {
    "adapter_crashed": "normalize",
    "validation_failed": "validate",
    "invalid_raw_headers": "parse",
    "redrive_limit": "parse",
    "nesting_too_deep": "parse",
    "unserializable_output": "validate",
    "output_too_large": "validate",
    "output_refused": "validate",
    "more_failed_items": "normalize",
}


def test_every_spec_code_is_catalogued() -> None:
    """Each code of §3.6 has a catalogue entry under its own code."""
    for code in SPEC_CODES:
        assert CATALOGUE[code].code == code


def test_our_codes_are_catalogued_with_their_stage() -> None:
    """Our own codes exist, at the stage that reports them."""
    for code, stage in OUR_CODES.items():
        assert CATALOGUE[code].stage == stage


def test_catalogue_is_exactly_spec_plus_ours() -> None:
    """Nothing else hides in the catalogue; a new code needs a line in docs/reasons.md."""
    assert set(CATALOGUE) == set(SPEC_CODES) | set(OUR_CODES)


def test_entries_are_frozen_and_described() -> None:
    """Each entry is an immutable Reason with a stage and a sentence."""
    for reason in CATALOGUE.values():
        assert isinstance(reason, Reason)
        assert reason.stage in ("parse", "normalize", "validate")
        assert reason.summary.endswith(".")
    assert Reason.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_wrong_type_is_parametrized_by_field() -> None:
    """WRONG_TYPE.about(field) spells wrong_type:<field>, and lookup maps it back to wrong_type (§3.1–3.3)."""
    assert WRONG_TYPE.about("user.id").code == "wrong_type:user.id"
    assert lookup(WRONG_TYPE.about("user.id").code) is WRONG_TYPE


def test_lookup() -> None:
    """Known codes map to their entry; unknown codes to one generic entry, never an error."""
    assert lookup("invalid_json") is CATALOGUE["invalid_json"]
    assert lookup("no_such_code") is UNKNOWN
    assert lookup("") is UNKNOWN
