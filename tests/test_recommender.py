"""The cloud recommender: each recall channel on tiny logs with a known answer, the merge, the ranking stage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cloud_recsys.config import TwoTowerConfig
from cloud_recsys.cooccurrence import ItemToItem
from cloud_recsys.fusion import FEATURES, FusionRanker
from streams.candidates import top_indices
from cloud_recsys.recommender import CloudRecommender, DecayedCounts, RecommenderConfig, Request, Session
from cloud_recsys.session_knn import SessionKNN
from streams.batch import EventBatch
from streams.schema import EventKind

MIN = 60_000


def _batch(users: list[int], items: list[int], ts: list[int]) -> EventBatch:
    n = len(users)
    frame = pd.DataFrame(
        {
            "event_id": np.arange(n, dtype=np.int64),
            "ts_ms": np.asarray(ts, np.int64),
            "user_id": np.asarray(users, np.int64),
            "item_id": np.asarray(items, np.int64),
            "kind": np.full(n, int(EventKind.CLICK), np.uint8),
            "value": np.zeros(n, np.float32),
        }
    )
    return EventBatch.from_frame(frame)


def _small(**kw: object) -> CloudRecommender:
    tt = TwoTowerConfig(num_users=500, num_items=200, embedding_dim=16, out_dim=16, user_hidden=(16,), item_hidden=(16,), batch_size=32, user_id_dropout=0.3)
    return CloudRecommender(RecommenderConfig(two_tower=tt, **kw))  # type: ignore[arg-type]


# -- item-to-item ----------------------------------------------------------------------
def test_item_to_item_ranks_what_follows_most_often() -> None:
    i2i = ItemToItem(window=1)
    users, items, ts = [], [], []
    for u in range(10):  # 1 -> 2 nine times, 1 -> 3 once
        users += [u, u]
        items += [1, 2 if u < 9 else 3]
        ts += [u * 1000, u * 1000 + 1]
    i2i.update(np.array(users), np.array(items), np.array(ts))
    ids, sc = i2i.top(np.array([1]), 5)
    assert ids.tolist() == [2, 3]
    np.testing.assert_allclose(sc, [0.9, 0.1])
    before, _ = i2i.scores(np.array([2]), direction=1)
    assert before.tolist() == [1]


def test_item_to_item_pairs_within_a_session_only_and_weights_by_distance() -> None:
    i2i = ItemToItem(window=3, session_gap_ms=30 * MIN)
    # user 0: 1, 2, 3 in a session; then 4 after two hours (a new session)
    i2i.update(np.zeros(4, np.int64), np.array([1, 2, 3, 4]), np.array([0, MIN, 2 * MIN, 122 * MIN]))
    assert i2i.forward[1] == {2: 1.0, 3: 0.5}
    assert 4 not in i2i.forward.get(3, {}) and 4 not in i2i.backward


def test_item_to_item_query_weights_the_most_recent_item_most() -> None:
    i2i = ItemToItem(window=1)
    i2i.update(np.array([0, 0, 1, 1]), np.array([10, 11, 20, 21]), np.array([0, 1, 0, 1]))
    ids, _ = i2i.top(np.array([10, 20]), 2)  # 20 is the most recent
    assert ids.tolist() == [21, 11]


# -- trending ----------------------------------------------------------------------------
# -- session kNN ------------------------------------------------------------------------
def test_session_knn_votes_by_similarity_of_whole_sessions() -> None:
    knn = SessionKNN(k=2, session_gap_ms=10 * MIN)
    # three past sessions: (1, 2, 3, 7), (1, 2, 4), (5, 3, 6); the query (1, 2) is most like the first two
    users = [1, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    items = [1, 2, 3, 7, 1, 2, 4, 5, 3, 6]
    knn.update(np.array(users), np.array(items), np.arange(len(users)) * 1000)
    ids, sc = knn.scores(np.array([1, 2]), user_id=99)
    got = dict(zip(ids.tolist(), sc.tolist()))
    assert set(got) == {1, 2, 3, 4, 7}  # session 3 shares no item: never a neighbour
    assert got[3] == pytest.approx(got[4]) and got[3] == pytest.approx(got[7])
    assert sum(got.values()) == pytest.approx(1.0)
    # the most recent query item weighs most: (3, 5) -> session 3 (has both) beats session 1
    ids, sc = knn.scores(np.array([3, 5]), user_id=99)
    got = dict(zip(ids.tolist(), sc.tolist()))
    assert got[6] > got.get(7, 0.0) > 0


def test_session_knn_skips_own_sessions_and_splits_by_gap() -> None:
    knn = SessionKNN(session_gap_ms=10 * MIN)
    knn.update(np.array([1, 1, 1]), np.array([1, 2, 3]), np.array([0, 1000, 60 * MIN]))  # 3 starts a new session
    ids, _ = knn.scores(np.array([1]), user_id=2)
    assert set(ids.tolist()) == {1, 2}
    assert len(knn.scores(np.array([1]), user_id=1)[0]) == 0  # a user's own sessions are not its neighbours
    clone = SessionKNN(session_gap_ms=10 * MIN)
    clone.load_state_dict(knn.state_dict())
    assert [a.tolist() for a in clone.scores(np.array([1]), user_id=2)] == [a.tolist() for a in knn.scores(np.array([1]), user_id=2)]


def test_session_knn_forgets_the_oldest_sessions() -> None:
    knn = SessionKNN(session_gap_ms=1, max_sessions=2)
    knn.update(np.array([1, 1, 2, 2, 3, 3]), np.array([1, 9, 1, 8, 1, 7]), np.array([0, 0, 10, 10, 20, 20]))
    ids, _ = knn.scores(np.array([1]), user_id=99)
    assert set(ids.tolist()) == {1, 8, 7}
    assert len(knn) == 2


def test_decayed_counts_prefer_recent_engagement() -> None:
    day = 86_400_000
    c = DecayedCounts(day)
    c.add(np.array([0, 0, 0]), np.array([0, 1, 2]), 2)  # item 0: three, ten days ago
    c.add(np.array([1]), np.array([10 * day]), 2)  # item 1: one, now
    assert c.log_relative(2).argmax() == 1
    plain = DecayedCounts(None)
    plain.add(np.array([0, 0, 0, 1]), np.zeros(4, np.int64), 2)
    assert plain.log_relative(2).argmax() == 0 and plain.log_relative(2)[0] == 0.0


# -- merged recall and the ranking stage --------------------------------------------------------
def _chains(n_sessions: int, seed: int = 0, start_user: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Sessions that walk chains a -> a+1 -> a+2 (items 0..59, chains of 3); item 100 is globally popular noise."""
    rng = np.random.default_rng(seed)
    users, items, ts = [], [], []
    t = 0
    for s in range(n_sessions):
        a = int(rng.integers(0, 20)) * 3
        for it in (a, 100, a + 1, a + 2):
            users.append(start_user + s)
            items.append(it)
            ts.append(t)
            t += 1000
        t += 3_600_000
    return users, items, ts


def _trained(n_sessions: int = 300) -> CloudRecommender:
    rec = _small()
    users, items, ts = _chains(n_sessions)
    for s in range(0, len(users), 64):
        rec.ingest(_batch(users[s : s + 64], items[s : s + 64], ts[s : s + 64]))
        rec.refresh()
    return rec


@pytest.fixture(scope="module")
def trained() -> CloudRecommender:
    return _trained()


def test_merged_list_is_the_union_of_the_channels(trained: CloudRecommender) -> None:
    rec = trained
    cfg = rec.config
    sess = Session(np.array([30, 100]), np.array([0, 1000]))
    req = Request(user_id=10_000, at_ms=10_000_000, session=sess)
    feats, ids, rows, personalized = rec._candidates([req], rec.vectors, None)[0]
    assert personalized and feats.shape == (len(ids), len(FEATURES))
    q = rec.trainer.query_vectors(np.array([req.user_id]), [sess.item_ids])[0]
    tt = rec.raw_ids(top_indices(np.where(rec.has_vector, rec.vectors @ q, -np.inf), min(cfg.two_tower_k, int(rec.has_vector.sum()))))
    after = rec.i2i.scores(sess.item_ids, 0)
    before = rec.i2i.scores(sess.item_ids, 1)
    i2i = set(after[0][np.lexsort((after[0], -after[1]))][: cfg.i2i_k].tolist()) | set(before[0][np.lexsort((before[0], -before[1]))][: cfg.i2i_k].tolist())
    knn = rec.sknn.scores(sess.item_ids, req.user_id)
    i2i |= set(knn[0][np.lexsort((knn[0], -knn[1]))][: cfg.sknn_k].tolist())
    trend = rec.raw_ids(top_indices(rec.pops[0].log_relative(rec.n_rows) + 1e-3 * rec.pops[2].log_relative(rec.n_rows), min(cfg.trending_k, rec.n_rows)))
    expected = set(tt.tolist()) | i2i | set(trend.tolist()) | {30, 100}
    assert set(ids.tolist()) == expected
    ranked = rec.recommend([req], k=len(ids))[0]
    assert set(ranked.item_ids.tolist()) == expected and (np.diff(ranked.scores) <= 1e-6).all()
    short = rec.recommend([req], k=5)[0]
    assert short.item_ids.tolist() == ranked.item_ids[:5].tolist()


def test_allowed_and_excluded_items_are_never_returned(trained: CloudRecommender) -> None:
    sess = Session(np.array([30]), np.array([0]))
    allowed = np.array([31, 32, 33, 100, 7])
    out = trained.recommend([Request(1, 10_000_000, sess, allowed=allowed, exclude={31})], k=50)[0]
    assert set(out.item_ids.tolist()) <= {32, 33, 100, 7} and 31 not in out.item_ids.tolist()


def test_request_time_session_beats_popularity_for_cold_users(trained: CloudRecommender) -> None:
    """Users the cloud never saw, with one chain item in their session: the next chain item
    ranks in the top 3 (popularity cannot tell chains apart)."""
    hits, pop_hits = 0, 0
    popular = trained.raw_ids(top_indices(trained.pops[2].log_relative(trained.n_rows), 10))
    for a in range(0, 60, 3):
        req = Request(user_id=50_000 + a, at_ms=10**9, session=Session(np.array([a]), np.array([10**9 - 1000])))
        assert not trained.knows_user(req.user_id)
        out = trained.recommend([req], k=10)[0]
        hits += (a + 1) in out.item_ids[:3].tolist()
        pop_hits += (a + 1) in popular[:3].tolist()
    assert hits >= 16 and hits > pop_hits + 10, (hits, pop_hits)
    empty = trained.recommend([Request(60_000, 10**9, Session.empty())], k=10)[0]
    assert not empty.personalized and len(empty.item_ids) == 10


def test_ranking_stage_learns_repeats_when_the_log_repeats() -> None:
    """A log where users go back to the item they consumed two steps ago: the repeat feature's weight grows."""
    rec = _small()
    rng = np.random.default_rng(1)
    users, items, ts = [], [], []
    t = 0
    for u in range(200):
        a, b = rng.choice(60, 2, replace=False).tolist()
        for it in (a, b, a, b, a):
            users.append(u)
            items.append(it)
            ts.append(t)
            t += 1000
    w0 = float(rec.fusion.linear.weight[0, FEATURES.index("rep16")])
    for s in range(0, len(users), 100):
        rec.ingest(_batch(users[s : s + 100], items[s : s + 100], ts[s : s + 100]))
        rec.refresh()
    assert rec.fusion.steps > 0 and np.isfinite(rec.fusion_loss)
    req = Request(9999, t + 1000, Session(np.array([5, 9, 5, 9]), np.array([t, t + 1, t + 2, t + 3])))
    assert rec.recommend([req], k=2)[0].item_ids.tolist()[0] in (5, 9)
    w1 = float(rec.fusion.linear.weight[0, FEATURES.index("rep16")]) + float(rec.fusion.linear.weight[0, FEATURES.index("recency_10m")])
    assert w1 > w0


def test_fusion_listwise_step_moves_the_target_up() -> None:
    f = FusionRanker()
    x = np.zeros((4, len(FEATURES)), np.float32)
    x[2, FEATURES.index("pop_all")] = 1.0  # only the target has this feature
    before = f.score(x)
    for _ in range(20):
        f.learn([x], [2])
    after = f.score(x)
    assert after[2] - after.max(initial=-1e9, where=np.arange(4) != 2) > before[2] - before[[0, 1, 3]].max()


def test_interest_vector_is_a_further_recall_channel() -> None:
    """An uploaded interest vector adds the items it points at (feature collaboration)."""
    rec = _small(two_tower_k=5, i2i_k=3, trending_k=3)
    users, items, ts = _chains(120)
    for s in range(0, len(users), 64):
        rec.ingest(_batch(users[s : s + 64], items[s : s + 64], ts[s : s + 64]))
    rec.refresh()
    req = Request(1, 10**9, Session(np.array([30]), np.array([10**9 - 1000])))
    before = rec.recommend([req], k=100)[0]
    q = rec.trainer.query_vectors(np.array([1]), [np.array([30])])[0]
    far = int(np.argmin(np.where(rec.has_vector, rec.vectors @ q, np.inf)))
    after = rec.recommend([req], k=100, interest={0: rec.vectors[far]})[0]
    far_id = int(rec.raw_ids(np.array([far]))[0])
    assert far_id not in before.item_ids.tolist() and far_id in after.item_ids.tolist()
    assert set(before.item_ids.tolist()) <= set(after.item_ids.tolist())


def test_batched_channels_equal_per_session_calls_bit_for_bit() -> None:
    """``ItemToItem.scores_many`` / ``SessionKNN.scores_many`` and the recommender's row map
    equal their one-at-a-time references exactly (ids, dtypes and every float bit)."""
    for scale in (7, 2**50):  # sparse raw ids; huge ones take the per-session fallback
        _check_batched_channels(scale)


def _check_batched_channels(scale: int) -> None:
    rng = np.random.default_rng(3)
    n = 3000
    users = rng.integers(0, 40, n)
    items = rng.integers(0, 120, n) * scale + 5
    ts = np.sort(rng.integers(0, 10 * 3_600_000, n))
    i2i, knn = ItemToItem(3, 30 * 60_000, neighbours=8), SessionKNN(k=5, sample_size=20, session_gap_ms=30 * 60_000)
    i2i.update(users, items, ts)
    knn.update(users, items, ts)
    sessions = [rng.choice(items, size=int(rng.integers(0, 12))) for _ in range(60)] + [np.array([999_999])]
    who = rng.integers(0, 40, len(sessions)).tolist()

    def same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
        assert a[0].dtype == b[0].dtype and a[1].dtype == b[1].dtype
        assert a[0].tolist() == b[0].tolist() and a[1].tobytes() == b[1].tobytes()

    for direction, qlen in ((0, 3), (1, 3), (0, 1)):
        for s, got in zip(sessions, i2i.scores_many(sessions, direction, qlen)):
            same(got, i2i.scores(s, direction, qlen))
    for s, u, got in zip(sessions, who, knn.scores_many(sessions, who)):
        same(got, knn.scores(s, u))

    rec = CloudRecommender(RecommenderConfig(two_tower=TwoTowerConfig(num_users=50, num_items=900, embedding_dim=8, out_dim=8)))
    rec._rows(items, add=True)
    probe = np.concatenate([items[:50], [1, 2, 999_999], items[-5:]])
    assert rec._rows(probe).tolist() == [rec.row_of.get(int(r), -1) for r in probe]
    rec._rows(np.array([123_456]), add=True)  # a new row: the map follows
    assert rec._rows(np.array([123_456, 1])).tolist() == [rec.n_rows - 1, -1]


def test_lookup_grouped_equals_lookup_per_request() -> None:
    from cloud_recsys.recommender import _lookup, _lookup_grouped

    rng = np.random.default_rng(5)
    for hi in (50, 2**61):  # keys that fit one search, and ones that take the per-request path
        groups = [np.unique(rng.integers(0, hi, int(rng.integers(0, 9)))) for _ in range(7)]
        vals = [rng.random(len(g)) for g in groups]
        bounds = np.concatenate([[0], np.cumsum([len(g) for g in groups])]).astype(np.int64).tolist()
        cands = [np.concatenate([g[:2], rng.integers(0, hi, 3)]) for g in groups]
        grp = np.repeat(np.arange(7), [len(c) for c in cands])
        got = _lookup_grouped(grp, np.concatenate(cands), np.concatenate(groups), bounds, np.concatenate(vals))
        want = np.concatenate([_lookup(c, g, v) if len(g) else np.zeros(len(c)) for c, g, v in zip(cands, groups, vals)])
        assert got.tobytes() == want.tobytes()


def test_channel_top_equals_per_request_filter_and_sort() -> None:
    from cloud_recsys.recommender import _channel_top

    rng = np.random.default_rng(9)
    n_rows, k = 40, 5
    shared = rng.random(n_rows) < 0.7
    oks = [shared, shared, np.ones(n_rows, bool), rng.random(n_rows) < 0.5, shared]
    per = [rng.permutation(np.arange(-3, 50))[: int(rng.integers(0, 12))] for _ in oks]  # unknown (-1..) and new rows too
    scs = [np.round(rng.random(len(p)), 1) for p in per]  # ties
    bounds = np.concatenate([[0], np.cumsum([len(p) for p in per])]).astype(np.int64).tolist()
    got, tb = _channel_top(np.concatenate(scs), bounds, np.concatenate(per).astype(np.int64), oks, n_rows, k)
    for j, (r_, sc, ok) in enumerate(zip(per, scs, oks)):
        good = (r_ >= 0) & (r_ < n_rows)
        r_, sc = r_[good], sc[good]
        r_, sc = r_[ok[r_]], sc[ok[r_]]
        assert got[tb[j] : tb[j + 1]].tolist() == r_[np.lexsort((r_, -sc))][:k].tolist()


def test_the_cloud_forgets_the_least_recently_active_users_beyond_its_cap() -> None:
    """Sessions kept for fetches without one are bounded: the least recently active user goes first."""
    rec = _small(max_session_users=3)
    rec.exclude_consumed = True
    rec.ingest(_batch([1, 2, 3], [10, 11, 12], [1_000, 2_000, 3_000]))
    rec.ingest(_batch([1, 4], [13, 14], [4_000, 5_000]))  # user 1 active again; user 4 is new: user 2 goes
    assert list(rec.sessions) == [3, 1, 4] and set(rec.consumed) == {1, 3, 4}
    assert rec.session_of(2).item_ids.size == 0
    assert rec.session_of(1).item_ids.tolist() == [10, 13]
