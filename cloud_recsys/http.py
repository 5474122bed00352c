"""HTTP API of the candidate service (FastAPI).

GET  /candidates?user_id=&k=&at_ms=&strict=   one user's candidates (JSON, int8 features base64)
POST /candidates/batch  (alias /candidates:batch)  {"user_ids": [...], "k": .., "at_ms": .., "strict": ..}
GET  /healthz                                    liveness + model version
GET  /metrics                                    counters, latency percentiles, model state

Bad parameters are 400 with a message saying which and why; unknown users get
the popularity list flagged ``"fallback": "popular"`` (200), or 404 with ``strict=true``.
Ids above ``streams.schema.MAX_ID`` are 400 (not a 500 from an int64 overflow); request
bodies above ``MAX_BODY_BYTES`` are 413 before any parsing (``BodyLimit``). Any engine's
app gets the same checks from ``check_user_id``, ``check_k_param`` and ``limit_body``.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query
from pydantic import BaseModel, Field

from streams.candidates import Candidates
from cloud_recsys.service import MAX_K, CandidateService, UnknownUser
from streams.schema import MAX_ID, MAX_TS_MS

log = logging.getLogger(__name__)

#: Most users in one batch request.
MAX_BATCH_USERS: int = 1000
#: Largest request body accepted (a full batch request of MAX_BATCH_USERS ids is ~25 KB).
MAX_BODY_BYTES: int = 64 * 1024


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


def check_user_id(value: Any, name: str = "user_id") -> int:
    """A user id in 0..MAX_ID, else ``HTTPException(400)`` naming the problem."""
    if isinstance(value, bool):
        raise HTTPException(400, f"{name} must be an integer, got {value!r}")
    try:
        v = int(value) if isinstance(value, (int, np.integer, str)) else int("x")
    except ValueError:
        raise HTTPException(400, f"{name} must be an integer, got {value!r}") from None
    if not 0 <= v <= MAX_ID:
        raise HTTPException(400, f"{name} must be in 0..{MAX_ID}, got {v}")
    return v


def check_k_param(value: Any, default: int | None = None) -> int | None:
    """``k`` in 1..MAX_K (None: ``default``), else ``HTTPException(400)``."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise HTTPException(400, f"k must be an integer, got {value!r}")
    try:
        v = int(value) if isinstance(value, (int, np.integer, str)) else int("x")
    except ValueError:
        raise HTTPException(400, f"k must be an integer, got {value!r}") from None
    if not 1 <= v <= MAX_K:
        raise HTTPException(400, f"k must be in 1..{MAX_K}, got {v}")
    return v


def candidates_to_json(c: Candidates) -> dict[str, Any]:
    """JSON body of one candidate list (int8 features base64-encoded, row-major (k, dim))."""
    return {
        "user_id": int(c.user_id),
        "item_ids": [int(i) for i in c.item_ids],
        "scores": [float(s) for s in c.scores],
        "dim": int(c.emb_q.shape[1]) if c.emb_q.ndim == 2 else 0,
        "emb_q_b64": base64.b64encode(np.ascontiguousarray(c.emb_q, dtype=np.int8).tobytes()).decode(),
        "emb_scale": [float(s) for s in c.emb_scale],
        "model_version": int(c.model_version),
        "computed_at_ms": int(c.computed_at_ms),
        "fallback": c.fallback,
    }


def candidates_from_json(d: dict[str, Any]) -> Candidates:
    """Inverse of ``candidates_to_json`` (used by device-side HTTP clients)."""
    k = len(d["item_ids"])
    dim = int(d.get("dim", 0))
    raw = base64.b64decode(d["emb_q_b64"])
    emb = np.frombuffer(raw, dtype=np.int8).reshape(k, dim) if dim else np.zeros((k, 0), np.int8)
    return Candidates(
        user_id=int(d["user_id"]),
        item_ids=np.asarray(d["item_ids"], dtype=np.int64),
        scores=np.asarray(d["scores"], dtype=np.float32),
        emb_q=emb,
        emb_scale=np.asarray(d["emb_scale"], dtype=np.float32),
        model_version=int(d["model_version"]),
        computed_at_ms=int(d.get("computed_at_ms", 0)),
        fallback=d.get("fallback"),
    )


def _int_param(name: str, value: str | None, lo: int, hi: int | None = None) -> int | None:
    if value is None or value == "":
        return None
    try:
        v = int(value)
    except ValueError:
        raise HTTPException(400, f"{name} must be an integer, got {value!r}") from None
    if v < lo or (hi is not None and v > hi):
        raise HTTPException(400, f"{name} must be in {lo}..{hi if hi is not None else 'inf'}, got {v}")
    return v


class BatchRequest(BaseModel):
    """Body of POST /candidates/batch."""

    user_ids: list[int] = Field(min_length=1, max_length=MAX_BATCH_USERS)
    k: int | None = Field(default=None, ge=1, le=MAX_K)
    at_ms: int | None = Field(default=None, ge=0, le=MAX_TS_MS)
    strict: bool = False


def create_app(service: CandidateService) -> FastAPI:
    """The candidate API over ``service``."""
    app = limit_body(FastAPI(title="Tandem candidate service"))

    @app.get("/candidates")
    def get_candidates(
        user_id: str | None = Query(None, description="raw user id"),
        k: str | None = Query(None, description=f"1..{MAX_K}"),
        at_ms: str | None = Query(None, description="log time of the request"),
        strict: bool = Query(False, description="404 for unknown users instead of the popularity fallback"),
    ) -> dict[str, Any]:
        uid = _int_param("user_id", user_id, 0, MAX_ID)
        if uid is None:
            raise HTTPException(400, "user_id is required")
        kk = _int_param("k", k, 1, MAX_K)
        at = _int_param("at_ms", at_ms, 0, MAX_TS_MS)
        try:
            return candidates_to_json(service.candidates(uid, kk, at, strict=strict))
        except UnknownUser as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None

    def post_batch(req: BatchRequest) -> dict[str, Any]:
        if any(u < 0 or u > MAX_ID for u in req.user_ids):
            raise HTTPException(400, f"user_ids must be non-negative integers up to {MAX_ID}")
        try:
            out = service.candidates_batch(req.user_ids, req.k, req.at_ms, strict=req.strict)
        except UnknownUser as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return {"results": [candidates_to_json(c) for c in out], "model_version": service.model_version}

    app.post("/candidates/batch")(post_batch)
    app.post("/candidates:batch")(post_batch)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "model_version": service.model_version, "items_indexed": len(service.index)}

    @app.get("/metrics")
    def metrics() -> dict[str, Any]:
        return service.metrics()

    return app
