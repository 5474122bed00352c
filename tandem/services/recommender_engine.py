"""The cloud service's engine: the evaluation's cloud, served.

``CloudRecommender`` (the one cloud model) plus the strategy's server side
(``tandem.strategies.server.StrategyCloud``): the same objects ``tandem evaluate`` drives
in process, here driven by the cloud worker's consume loop. Device updates go through the
strategy's own ``aggregate``; a refresh that produces a new shared reranker ships it to
the fleet on ``model-refresh``. Kept apart from engines.py so the popularity engine
imports no torch/faiss.
"""

from __future__ import annotations

import base64
import pickle
import threading
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from fastapi import FastAPI, HTTPException
from pydantic import ValidationError

from cloud_recsys.availability import Availability
from streams.candidates import Candidates, candidates_to_json
from cloud_recsys.recommender import Request, Session, build_recommender
from device_rerank.config import RerankerConfig
from device_rerank.reranker import Reranker
from streams.batch import EventBatch
from tandem.services.candidate_api import MAX_SESSION, BatchBody, RequestBody, SessionBody, guard, one_line, parse_query
from tandem.services.settings import CloudSettings
from tandem.strategies import make_strategies
from tandem.strategies.server import StrategyCloud, serve_candidates

def encode_reranker(model: Reranker) -> str:
    """A shared reranker as text for the refresh topic (zlib-compressed float32 parameters, base64)."""
    return base64.b64encode(zlib.compress(model.flat_parameters().astype(np.float32).tobytes())).decode()


def decode_reranker(text: str, emb_dim: int, max_bytes: int = 4 << 20) -> Reranker:
    """Inverse of ``encode_reranker``; raises ValueError when the payload does not fit the model."""
    model = Reranker(RerankerConfig(emb_dim=emb_dim))
    try:
        raw = zlib.decompressobj().decompress(base64.b64decode(text, validate=True), max_bytes)
    except (ValueError, zlib.error) as exc:
        raise ValueError(f"reranker payload is not base64/zlib: {exc}") from None
    flat = np.frombuffer(raw, dtype=np.float32)
    if flat.size != model.num_parameters() or not np.all(np.isfinite(flat)):
        raise ValueError(f"reranker payload has {flat.size} values (finite: {bool(np.all(np.isfinite(flat)))}), model needs {model.num_parameters()}")
    model.apply_delta(flat - model.flat_parameters())
    model.eval()
    return model


def catalogue_categories(source: str, events: int = 0) -> dict[int, int]:
    """The item catalogue's categories of ``source`` as the replayer loads it (``events``: a
    synthetic world's catalogue depends on its size): side features known before any event,
    as the evaluation's cloud has them. Empty without a source."""
    if not source:
        return {}
    from tandem.services.replayer_service import load_log

    return load_log(source, events).item_categories()


class RecommenderEngine:
    """``CloudRecommender`` + one strategy's ``StrategyCloud`` behind the cloud worker's engine API.

    Args:
        settings: ``strategy`` (whose ``aggregate`` the updates go through), ``domain``
            ("repeat" or "feed": a feed never returns consumed items), capacities, ``k``,
            ``source`` (its item catalogue: categories).
        item_categories: the catalogue given directly (instead of ``settings.source``).
    """

    def __init__(self, settings: CloudSettings, item_categories: dict[int, int] | None = None) -> None:
        self.settings = settings
        self.strategy = make_strategies(settings.strategy)[0]
        dim = settings.embedding_dim
        self.availability = Availability(max_transitions=32)
        torch.manual_seed(settings.seed)  # the towers, then the shared reranker: the evaluation's order
        cats = catalogue_categories(settings.source, settings.events) if item_categories is None else dict(item_categories)
        self.cloud = build_recommender(
            settings.num_users,
            settings.num_items,
            dim,
            num_categories=len(set(cats.values())) + 2,
            seed=settings.seed,
            exclude_consumed=settings.domain == "feed",
            item_categories=cats,
            allowed_at=self._allowed_at,
        )
        self.server = StrategyCloud(
            Reranker(RerankerConfig(emb_dim=dim)),
            trust_radius=settings.trust_radius,
            trial_min_devices=settings.trial_min_devices,
            trial_max_rounds=settings.trial_max_rounds,
        )
        self.rounds = 0
        self.clock_ms = 0  # the log's clock: newest event time ingested
        self.last_round: dict[str, Any] = {}
        self.lock = threading.RLock()  # the HTTP thread serves while the worker trains
        self.server.refresh(self.cloud)

    # -- engine API -------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.server.version)

    def _allowed_at(self, at_ms: int) -> np.ndarray | None:
        """Items live at ``at_ms`` (None when the stream carries no availability: a feed)."""
        return self.availability.live(at_ms) if len(self.availability) else None

    def train(self, batch: EventBatch) -> None:
        with self.lock:
            self.cloud.ingest(batch)
            if len(batch):
                self.clock_ms = max(self.clock_ms, int(batch.ts_ms.max()))

    def apply_availability(self, batch: EventBatch) -> None:
        self.availability.apply(batch)

    def apply_updates(self, updates: list[Any]) -> None:
        """One aggregation round through the strategy's own rule (raises when an update cannot be applied)."""
        with self.lock:
            self.rounds += 1
            self.last_round = self.strategy.aggregate(self.rounds, list(updates), self.server)

    def refresh(self) -> int:
        with self.lock:
            self.cloud.refresh()
            self.server.refresh(self.cloud)
            return self.version

    def resume_versions_after(self, version: int) -> None:
        """Continue numbering after ``version`` (announced before a restart the checkpoint
        missed): the served model is renamed ``version``, the next refresh is ``version + 1``."""
        with self.lock:
            self.server.version = max(self.server.version, int(version))

    def update_contract(self) -> dict[str, Any]:
        """What a device update must fit (``UpdateGate`` arguments): the evaluation's contract
        for this strategy's devices and the shared reranker's shape."""
        from device_rerank.config import DeviceConfig

        reranker = self.server.reranker
        return {
            "n_params": reranker.num_parameters(),
            "emb_dim": reranker.config.emb_dim,
            "device_config": self.strategy.device_config(DeviceConfig()),
        }

    def refresh_payload(self) -> dict[str, Any]:
        """What the ``model-refresh`` message carries beyond the version: the shared reranker
        (always, so a fleet that starts late or missed a message still converges) and the
        trial reranker devices are asked to score, if any (``trial_version`` -1: none)."""
        trial = self.server.trial
        return {
            "strategy": self.strategy.name,
            "reranker_version": int(self.server.model_version),
            "reranker": encode_reranker(self.server.reranker),
            "trial_version": int(self.server.trial_version) if trial is not None else -1,
            **({"trial": encode_reranker(trial)} if trial is not None else {}),
        }

    def requests(self, bodies: Sequence[RequestBody], at_ms: int | None) -> list[Request]:
        default_at = int(at_ms) if at_ms is not None else self.clock_ms
        live: dict[int, np.ndarray | None] = {}
        out = []
        for b in bodies:
            at = int(b.at_ms) if b.at_ms is not None else default_at
            if at not in live:
                live[at] = self._allowed_at(at)
            allowed = live[at]
            if b.session is None:
                sess = self.cloud.session_of(b.user_id)
            else:
                ids = np.asarray(b.session.item_ids, np.int64)
                ts = np.asarray(b.session.ts_ms if b.session.ts_ms is not None else [at] * len(ids), np.int64)
                if len(ts) != len(ids):
                    raise ValueError("session.ts_ms must have one time per item id")
                sess = Session(ids, ts)
            out.append(Request(int(b.user_id), at, sess, allowed, set(b.exclude) if b.exclude else None))
        return out

    def candidates(self, bodies: Sequence[RequestBody], k: int | None, at_ms: int | None) -> list[Candidates]:
        with self.lock:
            return serve_candidates(self.server, self.cloud, self.requests(bodies, at_ms), int(k or self.settings.k))

    def topk(self, user_id: int, k: int, at_ms: int) -> np.ndarray:
        return self.candidates([RequestBody(user_id=int(user_id))], k, at_ms or None)[0].item_ids

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        with self.lock:
            state = {
                "cloud": self.cloud,  # pickles its trainer as a state_dict, without its availability callback
                "server": self.server,
                "aggregator": self.strategy.aggregator,
                "rounds": self.rounds,
                "clock_ms": self.clock_ms,
                "availability": self.availability.state_dict(),
            }
            (path / "recommender.pkl.tmp").write_bytes(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
        (path / "recommender.pkl.tmp").replace(path / "recommender.pkl")

    def load(self, path: Path) -> None:
        state = pickle.loads((path / "recommender.pkl").read_bytes())  # our own checkpoint, written by save()
        cloud = state["cloud"]
        mine = self.cloud.trainer.config  # the settings' sizes: a checkpoint of other sizes is refused
        if cloud.trainer.config != mine:
            raise ValueError(f"checkpoint was written with a different config: {cloud.trainer.config} != {mine}")
        with self.lock:
            self.cloud = cloud
            self.cloud.allowed_at = self._allowed_at
            self.server = state["server"]
            self.strategy.aggregator = state["aggregator"]
            self.rounds = int(state["rounds"])
            self.clock_ms = int(state["clock_ms"])
            self.availability.load_state_dict(state["availability"])

    # -- HTTP -------------------------------------------------------------------------
    def http_app(self) -> FastAPI:
        """GET /candidates?user_id=&k=&at_ms=&items= and POST /candidates:batch (JSON).

        ``items`` (comma-separated ids, oldest first) is the device's session; without it the
        cloud uses its own copy of the user's recent items. ``at_ms`` defaults to the log's clock.
        """
        app = guard(FastAPI(title="tandem cloud"))

        @app.get("/candidates")
        def get_candidates(user_id: str | None = None, k: str | None = None, at_ms: str | None = None, items: str | None = None) -> dict[str, Any]:
            q = parse_query(user_id, k, at_ms)
            session = None
            if items:
                try:
                    ids = [int(x) for x in items.split(",") if x.strip()]
                except ValueError:
                    raise HTTPException(400, "items must be comma-separated integer ids") from None
                if len(ids) > MAX_SESSION:
                    raise HTTPException(400, f"at most {MAX_SESSION} session items")
                try:
                    session = SessionBody(item_ids=ids)
                except ValidationError as exc:
                    raise HTTPException(400, "items: " + one_line(exc)) from None
            return candidates_to_json(self.candidates([RequestBody(user_id=q.user_id, session=session)], q.k, q.at_ms)[0])

        def post_batch(body: BatchBody) -> dict[str, Any]:
            reqs = body.as_requests()
            try:
                out = self.candidates(reqs, body.k, body.at_ms)
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from None
            return {"results": [candidates_to_json(c) for c in out], "model_version": self.version}

        app.post("/candidates:batch")(post_batch)
        app.post("/candidates/batch")(post_batch)

        @app.get("/healthz")
        def healthz() -> dict[str, Any]:
            return {"ok": True, "model_version": self.version, "strategy": self.strategy.name, "items": self.cloud.n_rows}

        return app
