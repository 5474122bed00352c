"""Candidate service contract: in-process ``candidates`` and the HTTP API over it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from cloud_recsys.config import TwoTowerConfig
from cloud_recsys.http import MAX_BATCH_USERS, candidates_from_json, create_app
from cloud_recsys.index import IndexConfig
from cloud_recsys.service import MAX_K, CandidateService, UnknownUser
from cloud_recsys.trainer import OnlineTrainer
from streams.batch import EventBatch
from streams.schema import EventKind

torch.set_num_threads(1)

CFG = TwoTowerConfig(num_users=64, num_items=128, num_categories=4, embedding_dim=16, out_dim=16,
                     user_hidden=(32,), item_hidden=(32,), history_len=8, batch_size=64, seed=0)  # fmt: skip
USERS, ITEMS, GROUPS = 40, 80, 4
UNKNOWN = 999_999


def group_items(g: int) -> np.ndarray:
    """Raw ids of the items liked by taste group ``g`` (users ``1000 + u`` with ``u % 4 == g``)."""
    per = ITEMS // GROUPS
    return (g * per + np.arange(per)) * 10


def clustered_stream(n: int = 3072, seed: int = 0) -> EventBatch:
    """Users in 4 taste groups, each engaging only with its own quarter of the items."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, USERS, n)
    it = (u % GROUPS) * (ITEMS // GROUPS) + rng.integers(0, ITEMS // GROUPS, n)
    return EventBatch.from_columns(event_id=np.arange(n), ts_ms=np.arange(n) * 1000, user_id=u + 1000,
                                   item_id=it * 10, value=np.ones(n), kind=np.full(n, int(EventKind.CLICK)))  # fmt: skip


@pytest.fixture(scope="module")
def trained() -> OnlineTrainer:
    trainer = OnlineTrainer(CFG)
    for _ in range(4):  # a few passes over the stream (histories keep growing: fine for a contract test)
        trainer.train_batch(clustered_stream())
    return trainer


@pytest.fixture()
def service(trained: OnlineTrainer) -> CandidateService:
    return CandidateService(trained, IndexConfig(kind="flat"), k=20)


@pytest.fixture()
def client(service: CandidateService) -> TestClient:
    return TestClient(create_app(service))


# -- in-process ----------------------------------------------------------------------


def test_candidates_payload_shapes_order_and_features(service: CandidateService) -> None:
    c = service.candidates(1000, k=10, at_ms=5_000_000)
    assert c.fallback is None and c.user_id == 1000 and len(c) == 10
    assert c.item_ids.dtype == np.int64 and c.scores.dtype == np.float32
    assert (np.diff(c.scores) <= 1e-6).all(), "best first"
    assert len(np.unique(c.item_ids)) == 10
    assert c.emb_q.dtype == np.int8 and c.emb_q.shape == (10, CFG.out_dim) and c.emb_scale.shape == (10,)
    assert c.model_version == service.model_version >= 1 and c.computed_at_ms == 5_000_000
    # the int8 features dequantize to the indexed item vectors, and the scores are their dot
    # products with the user's query vector
    vecs, found = service.index.vectors(c.item_ids)
    assert found.all()
    assert np.abs(c.embeddings() - vecs).max() <= c.emb_scale.max() * 0.51
    q = service.trainer.user_vectors(np.array([1000]), at_ms=5_000_000)[0]
    assert np.allclose(c.scores, vecs @ q, atol=1e-4)


def test_candidates_are_personalised_by_taste_group(service: CandidateService) -> None:
    for g in range(GROUPS):
        users = [1000 + u for u in range(USERS) if u % GROUPS == g][:3]
        for c in service.candidates_batch(users, k=10):
            own = np.isin(c.item_ids, group_items(g)).mean()
            assert own >= 0.8, f"group {g} user {c.user_id}: only {own:.0%} of top-10 from its own group"


def test_batch_equals_single_requests(service: CandidateService) -> None:
    users = [1000, 1001, UNKNOWN, 1007]
    batch = service.candidates_batch(users, k=15, at_ms=10_000)
    for u, c in zip(users, batch):
        one = service.candidates(u, k=15, at_ms=10_000)
        assert c.user_id == u and np.array_equal(c.item_ids, one.item_ids) and c.fallback == one.fallback
        assert np.allclose(c.scores, one.scores)


def test_unknown_user_gets_flagged_popularity_or_strict_error(service: CandidateService) -> None:
    c = service.candidates(UNKNOWN, k=10)
    pid, _ = service.popularity.top(10)
    assert c.fallback == "popular" and np.array_equal(c.item_ids, pid)
    assert c.emb_q.shape == (10, CFG.out_dim) and np.abs(c.emb_q).max() > 0  # features still shipped
    before = service.metrics()["fallbacks"]
    service.candidates(UNKNOWN, k=5)
    assert service.metrics()["fallbacks"] == before + 1
    with pytest.raises(UnknownUser, match=str(UNKNOWN)):
        service.candidates(UNKNOWN, k=10, strict=True)
    with pytest.raises(UnknownUser):
        service.candidates_batch([1000, UNKNOWN], k=10, strict=True)
    assert service.candidates(1000, k=10, strict=True).fallback is None  # strict is fine for known users


@pytest.mark.parametrize("k", [0, -1, MAX_K + 1, 2.5, "10", True, None])
def test_bad_k_is_rejected_with_reason(service: CandidateService, k: object) -> None:
    if k is None:  # None means the service default, which is valid
        assert len(service.candidates(1000, k=None)) == service.default_k
        return
    with pytest.raises(ValueError, match="k must"):
        service.candidates(1000, k=k)  # type: ignore[arg-type]


@pytest.mark.parametrize("user", [-1, "1000", 1.5, True])
def test_bad_user_or_time_is_rejected(service: CandidateService, user: object) -> None:
    with pytest.raises(ValueError, match="user_id"):
        service.candidates(user, k=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at_ms"):
        service.candidates(1000, k=10, at_ms=-5)


def test_offline_items_are_filtered_at_their_time(service: CandidateService) -> None:
    top = service.candidates(1000, k=5).item_ids
    service.set_live(top[:2], live=False, ts_ms=50_000)
    now = service.candidates(1000, k=5).item_ids
    assert not np.isin(top[:2], now).any() and np.array_equal(now[:3], top[2:5])
    assert np.isin(top[:2], service.candidates(1000, k=5, at_ms=49_999).item_ids).all()  # before going offline
    pop = service.candidates(UNKNOWN, k=50).item_ids
    assert not np.isin(top[:2], pop).any()  # the fallback honours availability too
    service.set_live(top[:2], live=True, ts_ms=60_000)
    assert np.array_equal(service.candidates(1000, k=5).item_ids, top)


def test_exclude_seen_drops_history_items(trained: OnlineTrainer) -> None:
    svc = CandidateService(trained, IndexConfig(kind="flat"), exclude_seen=True)
    hist = trained.items.to_raw(trained.history.read(trained.users.lookup(np.array([1000])))[0])
    assert len(hist)
    c = svc.candidates(1000, k=30)
    assert len(c) == 30 and not np.isin(c.item_ids, hist).any()


# -- HTTP ----------------------------------------------------------------------------


def test_http_get_matches_in_process(client: TestClient, service: CandidateService) -> None:
    r = client.get("/candidates", params={"user_id": 1001, "k": 12, "at_ms": 123456})
    assert r.status_code == 200
    body = r.json()
    got = candidates_from_json(body)
    want = service.candidates(1001, k=12, at_ms=123456)
    assert body["fallback"] is None and body["model_version"] == service.model_version
    assert np.array_equal(got.item_ids, want.item_ids) and np.allclose(got.scores, want.scores)
    assert np.array_equal(got.emb_q, want.emb_q) and np.allclose(got.emb_scale, want.emb_scale)
    assert got.computed_at_ms == 123456
    assert len(client.get("/candidates", params={"user_id": 1001}).json()["item_ids"]) == service.default_k


@pytest.mark.parametrize("path", ["/candidates:batch", "/candidates/batch"])
def test_http_batch_post(client: TestClient, service: CandidateService, path: str) -> None:
    r = client.post(path, json={"user_ids": [1000, UNKNOWN, 1002], "k": 7})
    assert r.status_code == 200
    res = [candidates_from_json(d) for d in r.json()["results"]]
    assert [c.user_id for c in res] == [1000, UNKNOWN, 1002]
    assert [c.fallback for c in res] == [None, "popular", None]
    assert all(len(c) == 7 for c in res)
    assert np.array_equal(res[2].item_ids, service.candidates(1002, k=7).item_ids)


@pytest.mark.parametrize(
    "params, status, words",
    [
        ({"user_id": 1000, "k": 0}, 400, "k must be in 1..1000"),
        ({"user_id": 1000, "k": MAX_K + 1}, 400, "k must be in 1..1000"),
        ({"user_id": 1000, "k": "ten"}, 400, "k must be an integer"),
        ({"user_id": "abc"}, 400, "user_id must be an integer"),
        ({"user_id": "1.5"}, 400, "user_id must be an integer"),
        ({"user_id": -3}, 400, "user_id must be in"),
        ({}, 400, "user_id is required"),
        ({"user_id": 1000, "at_ms": -1}, 400, "at_ms must be in"),
        ({"user_id": 1000, "strict": "maybe"}, 422, "strict"),
    ],
)
def test_http_get_bad_params_are_clear_4xx(client: TestClient, params: dict, status: int, words: str) -> None:
    r = client.get("/candidates", params=params)
    assert r.status_code == status
    assert words in r.text


@pytest.mark.parametrize(
    "body, words",
    [
        ({"user_ids": [1000], "k": 0}, "k"),
        ({"user_ids": [1000], "k": MAX_K + 1}, "k"),
        ({"user_ids": ["abc"]}, "user_ids"),
        ({"user_ids": [-1]}, "non-negative"),
        ({"user_ids": []}, "user_ids"),
        ({"user_ids": list(range(MAX_BATCH_USERS + 1))}, "user_ids"),
        ({"k": 5}, "user_ids"),
    ],
)
def test_http_batch_bad_body_is_4xx(client: TestClient, body: dict, words: str) -> None:
    r = client.post("/candidates:batch", json=body)
    assert 400 <= r.status_code < 500 and words in r.text


def test_http_unknown_user_fallback_and_strict_404(client: TestClient) -> None:
    r = client.get("/candidates", params={"user_id": UNKNOWN, "k": 5})
    assert r.status_code == 200 and r.json()["fallback"] == "popular" and len(r.json()["item_ids"]) == 5
    r = client.get("/candidates", params={"user_id": UNKNOWN, "k": 5, "strict": "true"})
    assert r.status_code == 404 and str(UNKNOWN) in r.text
    r = client.post("/candidates:batch", json={"user_ids": [1000, UNKNOWN], "strict": True})
    assert r.status_code == 404


def test_http_healthz_and_metrics(client: TestClient, service: CandidateService) -> None:
    h = client.get("/healthz").json()
    assert h["ok"] is True and h["model_version"] == service.model_version and h["items_indexed"] == ITEMS
    m0 = client.get("/metrics").json()
    client.get("/candidates", params={"user_id": 1000})
    client.get("/candidates", params={"user_id": UNKNOWN})
    client.post("/candidates:batch", json={"user_ids": [1000, 1001, 1002]})
    client.get("/candidates", params={"user_id": 1000, "k": 0})  # rejected before the service: not counted
    m = client.get("/metrics").json()
    assert m["requests"] - m0["requests"] == 3
    assert m["users_served"] - m0["users_served"] == 5
    assert m["fallbacks"] - m0["fallbacks"] == 1
    assert m["latency_ms_p50"] is not None and 0 < m["latency_ms_p50"] <= m["latency_ms_p99"]
    assert m["model_version"] == service.model_version and m["items_indexed"] == ITEMS and m["index_kind"] == "flat"
    service.refresh()
    assert client.get("/healthz").json()["model_version"] == m["model_version"] + 1
