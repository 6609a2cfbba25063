"""TEMPLATE wire format: options, signing, models and status mapping. Pure, no I/O.

Replace every TODO. Keep bank types in this folder: the connector turns them into
`connectors.base` types before anything leaves it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from connectors.base import BankStatus


class TemplateOptions(BaseModel):
    """`connector_options` of a funder on this protocol; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str
    secret: SecretStr
    timeout_seconds: float = Field(default=10, gt=0, le=300)


def parse_options(raw: Mapping[str, Any]) -> TemplateOptions:
    """Validate `connector_options`; a `ValueError` names every bad field."""
    try:
        return TemplateOptions.model_validate(dict(raw))
    except ValidationError as e:
        raise ValueError(
            "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        ) from None


def map_status(word: str) -> BankStatus:
    """Every status word the bank documents, and an explicit unknown."""
    match word:
        case "TODO_ACCEPTED":
            return BankStatus.ACCEPTED
        case "TODO_PROCESSING":
            return BankStatus.PROCESSING
        case "TODO_SUCCESS":
            return BankStatus.SUCCEEDED
        case "TODO_FAILED":
            return BankStatus.FAILED
        case _:
            return BankStatus.UNKNOWN
