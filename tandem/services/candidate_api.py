"""The candidate requests every cloud engine accepts, and how a bad one is refused.

Why one module: the recommender and popularity engines serve the same HTTP API, so they
must refuse the same requests the same way (a one-line 400 naming the field, 413 for an
oversize body) instead of each engine trusting FastAPI's defaults differently. The JSON
body of a candidate list is the contract's own (``streams.candidates.candidates_to_json``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

#: Bounds of one candidate request (a device sends at most its recent items).
MAX_K = 1000
MAX_BATCH = 1000
MAX_SESSION = 256
MAX_ID = 2**63 - 1
#: Largest request body accepted (a batch of MAX_BATCH bare user ids is ~25 KB).
MAX_BODY_BYTES: int = 64 * 1024

UserId = Annotated[int, Field(ge=0, le=MAX_ID)]
#: Item ids and times a request carries: int64, non-negative (a larger one is a 400, not a 500
#: from an int64 overflow deep in the engine).
ItemId = Annotated[int, Field(ge=0, le=MAX_ID)]
TimeMs = Annotated[int, Field(ge=0, le=MAX_ID)]


class SessionBody(BaseModel):
    item_ids: list[ItemId] = Field(default_factory=list, max_length=MAX_SESSION)
    ts_ms: list[TimeMs] | None = Field(default=None, max_length=MAX_SESSION)


class RequestBody(BaseModel):
    user_id: int = Field(ge=0, le=MAX_ID)
    at_ms: int | None = Field(default=None, ge=0, le=MAX_ID)  # this fetch's time (default: the batch's)
    session: SessionBody | None = None
    exclude: list[ItemId] | None = Field(default=None, max_length=10_000)


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


class BodyLimit:
    """ASGI middleware: 413 for a request body larger than ``max_bytes`` (declared or streamed).

    Why: a 10 MB JSON body must not be parsed (memory, CPU) to find out it is too big. The
    body is read up to the limit, then handed to the app as one chunk.
    """

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    async def _reject(self, send: Any, size: str) -> None:
        body = ('{"detail":"request body of %s bytes exceeds the limit of %d"}' % (size, self.max_bytes)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    await self._reject(send, value.decode(errors="replace"))
                    return
        chunks: list[bytes] = []
        total = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            chunk = msg.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._reject(send, f"more than {self.max_bytes}")
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Any:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def limit_body(app: FastAPI, max_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """Add ``BodyLimit`` to ``app`` (every engine's HTTP app should)."""
    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    return app


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
