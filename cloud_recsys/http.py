"""HTTP API of the candidate service (FastAPI).

GET  /candidates?user_id=&k=&at_ms=&strict=   one user's candidates (JSON, int8 features base64)
POST /candidates/batch  (alias /candidates:batch)  {"user_ids": [...], "k": .., "at_ms": .., "strict": ..}
GET  /healthz                                    liveness + model version
GET  /metrics                                    counters, latency percentiles, model state

Bad parameters are 400 with a message saying which and why; unknown users get
the popularity list flagged ``"fallback": "popular"`` (200), or 404 with ``strict=true``.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query
from pydantic import BaseModel, Field

from cloud_recsys.candidates import Candidates
from cloud_recsys.service import MAX_K, CandidateService, UnknownUser

log = logging.getLogger(__name__)

#: Most users in one batch request.
MAX_BATCH_USERS: int = 1000


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
    at_ms: int | None = Field(default=None, ge=0)
    strict: bool = False


def create_app(service: CandidateService) -> FastAPI:
    """The candidate API over ``service``."""
    app = FastAPI(title="Tandem candidate service")

    @app.get("/candidates")
    def get_candidates(
        user_id: str | None = Query(None, description="raw user id"),
        k: str | None = Query(None, description=f"1..{MAX_K}"),
        at_ms: str | None = Query(None, description="log time of the request"),
        strict: bool = Query(False, description="404 for unknown users instead of the popularity fallback"),
    ) -> dict[str, Any]:
        uid = _int_param("user_id", user_id, 0)
        if uid is None:
            raise HTTPException(400, "user_id is required")
        kk = _int_param("k", k, 1, MAX_K)
        at = _int_param("at_ms", at_ms, 0)
        try:
            return candidates_to_json(service.candidates(uid, kk, at, strict=strict))
        except UnknownUser as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None

    def post_batch(req: BatchRequest) -> dict[str, Any]:
        if any(u < 0 for u in req.user_ids):
            raise HTTPException(400, "user_ids must be non-negative integers")
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
