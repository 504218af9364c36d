"""What every record model is built from: the frozen base model and the field types records share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, PlainSerializer, SkipValidation, StringConstraints
from typing_extensions import TypeAliasType

from pipeline.clock import format_utc

KafkaHeaders = Sequence[tuple[str, bytes]]
# Vendor JSON as orjson decodes it: the one recursive JSON type (adapters and records use it, never Any).
JSONValue = TypeAliasType(
    "JSONValue", "dict[str, JSONValue] | list[JSONValue] | str | int | float | bool | None"
)
# An object of JSON values. Values are not re-validated (they come from orjson): the model checks the shape
# (an object with string keys), which is also faster than validating Any.
JSONObject = dict[str, SkipValidation[JSONValue]]

ShortText = Annotated[str, StringConstraints(max_length=256)]
UtcDatetime = Annotated[
    AwareDatetime,
    PlainSerializer(lambda dt: format_utc(dt), return_type=str),
]


class Record(BaseModel):
    """Frozen and strict about unknown fields: a record that crosses a topic is read exactly as written."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def of(cls, fields: Mapping[str, Any]) -> Self:
        """model_validate(fields) for the worker's per-record models: the validator called without
        model_validate's keyword arguments, whose passing costs about as much as validating a small model."""
        return cls.__pydantic_validator__.validate_python(fields)  # type: ignore[no-any-return]
