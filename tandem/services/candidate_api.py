"""The candidate requests every cloud engine accepts, and how a bad one is refused.

Why one module: the recommender and popularity engines serve the same HTTP API, so they
must refuse the same requests the same way (a one-line 400 naming the field, 413 for an
oversize body) instead of each engine trusting FastAPI's defaults differently.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from cloud_recsys.http import limit_body

#: Bounds of one candidate request (a device sends at most its recent items).
MAX_K = 1000
MAX_BATCH = 1000
MAX_SESSION = 256
MAX_ID = 2**63 - 1

UserId = Annotated[int, Field(ge=0, le=MAX_ID)]


class SessionBody(BaseModel):
    item_ids: list[int] = Field(default_factory=list, max_length=MAX_SESSION)
    ts_ms: list[int] | None = Field(default=None, max_length=MAX_SESSION)


class RequestBody(BaseModel):
    user_id: int = Field(ge=0, le=MAX_ID)
    at_ms: int | None = Field(default=None, ge=0, le=MAX_ID)  # this fetch's time (default: the batch's)
    session: SessionBody | None = None
    exclude: list[int] | None = Field(default=None, max_length=10_000)


class BatchBody(BaseModel):
    """POST /candidates:batch: either ``requests`` (each with the device's session) or bare ``user_ids``."""

    requests: list[RequestBody] | None = Field(default=None, max_length=MAX_BATCH)
    user_ids: list[UserId] | None = Field(default=None, max_length=MAX_BATCH)
    k: int | None = Field(default=None, ge=1, le=MAX_K)
    at_ms: int | None = Field(default=None, ge=0, le=MAX_ID)

    def as_requests(self) -> list[RequestBody]:
        """The batch as one ``RequestBody`` per user (400 unless exactly one form is given)."""
        if (self.requests is None) == (self.user_ids is None):
            raise HTTPException(400, "give exactly one of requests or user_ids")
        if self.requests is not None:
            return self.requests
        assert self.user_ids is not None
        return [RequestBody(user_id=u) for u in self.user_ids]


class QueryParams(BaseModel):
    """GET /candidates's parameters, checked by the same rules as a batch entry."""

    user_id: int = Field(ge=0, le=MAX_ID)
    k: int | None = Field(default=None, ge=1, le=MAX_K)
    at_ms: int | None = Field(default=None, ge=0, le=MAX_ID)


def one_line(exc: ValidationError | RequestValidationError) -> str:
    """The first validation error as ``field: message`` (one line, no echo of a huge input)."""
    errs = exc.errors()
    if not errs:
        return "invalid request"
    e = errs[0]
    where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query"))
    return f"{where or 'body'}: {e.get('msg', 'invalid')}"[:200].replace("\n", " ")


def parse_query(user_id: str | None, k: str | None, at_ms: str | None) -> QueryParams:
    """GET parameters as ``QueryParams``; ``HTTPException(400)`` with one line otherwise."""
    raw: dict[str, Any] = {"user_id": user_id}
    if k not in (None, ""):
        raw["k"] = k
    if at_ms not in (None, ""):
        raw["at_ms"] = at_ms
    try:
        return QueryParams.model_validate(raw)
    except ValidationError as exc:
        raise HTTPException(400, one_line(exc)) from None


def guard(app: FastAPI) -> FastAPI:
    """Give ``app`` the shared refusals: 413 above the body limit, 400 with one line for a body
    that does not validate (FastAPI's default is a 422 with a list of dicts)."""

    async def refuse(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": one_line(exc)}, status_code=400)

    app.add_exception_handler(RequestValidationError, refuse)
    return limit_body(app)
