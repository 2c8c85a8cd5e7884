"""Query and path parameter types shared by the routers, and the 422 field-error answer.

Bounds here keep nonsense out of the database layer: ids beyond 32 bits, NUL characters (PostgreSQL text
refuses them), naive or out-of-range datetimes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Annotated

from fastapi import HTTPException, Path, Query

from dicom_ai_node.api.schemas import INT32_MAX

NAME_PATTERN = r"^[^\x00]{1,64}$"

IdPath = Annotated[int, Path(ge=1, le=INT32_MAX)]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=INT32_MAX)]
NameQuery = Annotated[str | None, Query(pattern=NAME_PATTERN)]
UidQuery = Annotated[str | None, Query(pattern=r"^[0-9.]{1,64}$")]
TimeQuery = Annotated[datetime | None, Query()]


def field_errors(errors: Iterable[tuple[Sequence[str | int], str]]) -> HTTPException:
    """The 422 answer the page maps onto form fields: {"detail": [{"loc": [...], "msg": "...", "type"}]}
    (the shape FastAPI documents for its own validation errors)."""
    return HTTPException(422, [{"loc": list(loc), "msg": msg, "type": "value_error"} for loc, msg in errors])


def utc(value: datetime | None, name: str) -> datetime | None:
    """A query time as aware UTC; a time without offset is taken as UTC."""
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise field_errors([(("query", name), "time out of range")]) from None
