"""EmbeddedLog: offsets, groups, replay, tailing, crash recovery, concurrency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.batch import EventBatch, decode_record, encode_batch
from streams.embedded_log import EmbeddedLog
from streams.transport import TransportError, partition_for
from streams.transports import open_transport



def make_batch(start: int, n: int, users: int = 50) -> EventBatch:
    ids = np.arange(start, start + n)
    return EventBatch.from_columns(
        event_id=ids, ts_ms=ids * 10, user_id=ids % users, item_id=ids % 7, value=np.ones(n), kind=np.full(n, 2)
    )


def drain(consumer, expect: int, timeout_s: float = 5.0) -> list:
    out: list = []
    deadline = time.monotonic() + timeout_s
    while len(out) < expect and time.monotonic() < deadline:
        out.extend(consumer.poll(max_records=1000, timeout_s=0.1))
    return out


def test_batches_round_trip_with_keys_offsets_and_partitions(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path)
    log.create_topic("interactions", 4)
    log.create_topic("interactions", 4)  # idempotent
    sent = {}
    for i in range(40):
        key = int(i % 13).to_bytes(8, "little", signed=True)
        value = encode_batch(make_batch(i * 10, 10))
        log.produce("interactions", value, key=key)
        sent[(partition_for(i % 13, 4), i)] = value
    log.produce("interactions", b'{"x":1}', key=None, partition=3)
    with log.consumer("interactions", "g") as c:
        got = drain(c, 41)
    assert len(got) == 41
    by_part: dict[int, list] = {}
    for r in got:
        by_part.setdefault(r.partition, []).append(r)
    for p, recs in by_part.items():
        assert [r.offset for r in recs] == list(range(len(recs)))  # dense offsets per partition
        for r in recs:
            if r.key is not None:
                assert partition_for(r.key, 4) == p
    values = sorted(r.value for r in got if r.key is not None)
    assert values == sorted(sent.values())
    first = next(r for r in by_part[partition_for(0, 4)])
    assert decode_record(first.value).event_id.tolist() == list(range(0, 10))
    assert all(r.timestamp_ms > 1_600_000_000_000 for r in got)
    assert by_part[3][-1].key is None and by_part[3][-1].value == b'{"x":1}'


def test_group_commit_survives_reopen_and_groups_are_independent(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path)
    log.create_topic("t", 2)
    for i in range(20):
        log.produce("t", b"%d" % i, partition=i % 2)
    c = log.consumer("t", "a")
    first = c.poll(max_records=6, timeout_s=0.1)
    assert len(first) == 6
    c.commit()
    committed = c.committed()
    assert sum(committed.values()) == 6
    c.poll(max_records=4, timeout_s=0.1)  # read but never committed: must be redelivered
    log.close()

    log2 = EmbeddedLog(tmp_path)
    c2 = log2.consumer("t", "a")
    assert c2.committed() == committed and c2.positions() == committed
    rest = drain(c2, 14)
    seen = {(r.partition, r.offset) for r in first} | {(r.partition, r.offset) for r in rest}
    assert len(rest) == 14 and len(seen) == 20  # exactly the uncommitted ones, no gaps or repeats
    assert c2.lag() == 0
    other = log2.consumer("t", "b")
    assert other.committed() == {} and len(drain(other, 20)) == 20
    files = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "_groups").rglob("*.json"))
    assert files == ["_groups/a/t.json"]
    assert json.loads((tmp_path / "_groups/a/t.json").read_text())["offsets"] == {str(k): v for k, v in committed.items()}


def test_seek_replay_lag_and_explicit_assignment(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path)
    log.create_topic("t", 3)
    for i in range(30):
        log.produce("t", b"%d" % i, partition=i % 3)
    c = log.consumer("t", "g", partitions=[1])
    assert c.end_offsets() == {1: 10} and c.lag() == 10
    assert [r.value for r in drain(c, 10)] == [b"%d" % i for i in range(1, 30, 3)]
    assert c.lag() == 0
    c.seek(1, 7)
    assert [r.offset for r in c.poll(10, 0.1)] == [7, 8, 9]
    c.seek_to_beginning()
    assert len(drain(c, 10)) == 10
    with pytest.raises(TransportError, match="not assigned"):
        c.seek(0, 0)
    with pytest.raises(TransportError, match="not assigned"):
        c.commit({2: 1})
    with pytest.raises(TransportError, match="cannot assign"):
        log.consumer("t", "g", partitions=[5])


def test_consumer_tails_appends_from_this_and_other_processes(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path)
    log.create_topic("t", 1)
    c = log.consumer("t", "g")
    assert c.poll(10, timeout_s=0.05) == []
    threading.Timer(0.1, lambda: log.produce("t", b"late")).start()
    t0 = time.monotonic()
    got = c.poll(10, timeout_s=3.0)
    assert [r.value for r in got] == [b"late"] and time.monotonic() - t0 < 2.0  # woken, not timed out
    code = f"from streams.embedded_log import EmbeddedLog; L = EmbeddedLog({str(tmp_path)!r}); [L.produce('t', b'p%d' % i) for i in range(5)]"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert [r.value for r in drain(c, 5)] == [b"p%d" % i for i in range(5)]
    assert [r.offset for r in log.consumer("t", "h").poll(10, 0.1)] == list(range(6))


def test_torn_tail_is_truncated_and_appends_continue(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = EmbeddedLog(tmp_path)
    log.create_topic("t", 1)
    values = [encode_batch(make_batch(i * 100, 100)) for i in range(5)]
    for v in values:
        log.produce("t", v)
    log.close()
    path = tmp_path / "t" / "0.log"
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 7)  # cut the last frame mid-record
    with caplog.at_level("WARNING"):
        log2 = EmbeddedLog(tmp_path)
        c = log2.consumer("t", "g")
        assert [r.value for r in drain(c, 4)] == values[:4]
    assert any("torn tail" in m for m in caplog.messages)
    log2.produce("t", b"after")
    assert [r.value for r in c.poll(10, 1.0)] == [b"after"]
    log2.close()
    # A bad crc on the last frame is torn too; zero fill after a crash as well.
    with open(path, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        fh.write(b"\xff")
    with open(path, "ab") as fh:
        fh.write(b"\x00" * 100)
    assert [r.value for r in drain(EmbeddedLog(tmp_path).consumer("t", "x"), 4)] == values[:4]


def test_corruption_in_the_middle_is_refused_not_truncated(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path)
    log.create_topic("t", 1)
    for i in range(5):
        log.produce("t", b"x" * 100 + bytes([i]))
    log.close()
    path = tmp_path / "t" / "0.log"
    data = bytearray(path.read_bytes())
    data[30] ^= 0xFF  # inside the first frame's value
    path.write_bytes(bytes(data))
    with pytest.raises(TransportError, match="corrupt frame at byte 0"):
        EmbeddedLog(tmp_path).consumer("t", "g")
    assert path.stat().st_size == len(data)  # nothing was dropped


_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from streams.embedded_log import EmbeddedLog

    real_write = os.write

    def slow_write(fd, data):  # a slow disk: each frame lands in pieces, so SIGKILL tears one
        view = memoryview(data)
        for i in range(0, len(view), 8192):
            real_write(fd, view[i : i + 8192])
            time.sleep(0.002)
        return len(view)

    os.write = slow_write
    log = EmbeddedLog(sys.argv[1])
    log.create_topic("t", 2)
    big = b"z" * 200_000  # large frames make a kill mid-write likely
    i = 0
    while True:
        log.produce("t", i.to_bytes(8, "little") + big, partition=i % 2)
        print(i, flush=True)  # acknowledged: fully written
        i += 1
    """
)


def test_sigkill_mid_write_loses_nothing_acknowledged_and_duplicates_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="streams.embedded_log")
    for attempt in range(3):
        root = tmp_path / f"run{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        acked = -1
        for line in proc.stdout:  # wait until it is well into writing
            acked = int(line)
            if acked >= 4 + attempt:
                break
        time.sleep(0.01 + 0.01 * attempt)  # let it get part-way into the next frame (~50 ms each)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        acked = max([acked] + [int(x) for x in proc.stdout.read().split()])
        log = EmbeddedLog(root)
        seqs = sorted(int.from_bytes(r.value[:8], "little") for r in drain(log.consumer("t", "g"), acked + 1))
        assert seqs == list(range(len(seqs)))  # no gap, no duplicate
        assert len(seqs) >= acked + 1  # everything acknowledged is there (one more may have landed)
        assert all(len(r.value) == 200_008 for r in log.consumer("t", "h").poll(1000, 0.1))
        log.close()
    # The kills really did land mid-frame (the case this test is about), at least once.
    assert any("torn tail" in m for m in caplog.messages)


def test_concurrent_producer_threads_lose_nothing(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path)
    log.create_topic("t", 2)

    def work(w: int) -> None:
        for i in range(300):
            log.produce("t", b"%d:%d" % (w, i), partition=(w + i) % 2)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    got = drain(EmbeddedLog(tmp_path).consumer("t", "g"), 1800)
    assert sorted(r.value for r in got) == sorted(b"%d:%d" % (w, i) for w in range(6) for i in range(300))
    for p in (0, 1):
        assert [r.offset for r in got if r.partition == p] == list(range(900))


@given(values=st.lists(st.binary(max_size=300), min_size=1, max_size=30), cut=st.integers(min_value=1, max_value=40))
@settings(max_examples=30, deadline=None)
def test_any_truncation_keeps_exactly_the_complete_prefix(tmp_path_factory: pytest.TempPathFactory, values: list[bytes], cut: int) -> None:
    root = tmp_path_factory.mktemp("log")
    log = EmbeddedLog(root)
    log.create_topic("t", 1)
    sizes = []
    for v in values:
        log.produce("t", v, key=b"k" if len(v) % 2 else None)
        sizes.append((root / "t" / "0.log").stat().st_size)
    log.close()
    path = root / "t" / "0.log"
    new_size = max(0, sizes[-1] - cut)
    with open(path, "r+b") as fh:
        fh.truncate(new_size)
    kept = sum(1 for s in sizes if s <= new_size)
    got = EmbeddedLog(root).consumer("t", "g").poll(1000, 0.01)
    assert [r.value for r in got] == values[:kept]


def test_bad_names_closed_log_and_missing_topic_raise_transport_errors(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path)
    for name in ("../evil", "_groups", "", "a/b"):
        with pytest.raises(TransportError, match="invalid topic name"):
            log.create_topic(name)
    with pytest.raises(TransportError, match="does not exist"):
        log.produce("missing", b"x")
    log.create_topic("t", 1)
    with pytest.raises(TransportError, match="no partition 3"):
        log.produce("t", b"x", partition=3)
    log.close()
    with pytest.raises(TransportError, match="closed"):
        log.produce("t", b"x")


def test_fsync_mode_and_open_transport_urls(tmp_path: Path) -> None:
    log = open_transport(f"embedded://{tmp_path}/abs")
    assert isinstance(log, EmbeddedLog) and log.root == tmp_path / "abs"
    log.create_topic("t", 1)
    log.produce("t", b"v")
    log.flush()
    durable = EmbeddedLog(tmp_path / "abs2", fsync=True)
    durable.create_topic("t", 1)
    durable.produce("t", b"v")
    durable.flush()
    durable.consumer("t", "g").commit({0: 1})
    assert EmbeddedLog(tmp_path / "abs2").consumer("t", "g").committed() == {0: 1}
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        rel = open_transport("embedded:rel/log")
        assert isinstance(rel, EmbeddedLog) and rel.root == Path("rel/log")
    finally:
        os.chdir(cwd)
    for bad in ("file:///x", "embedded://relative", "embedded:", "kafka://", "kafka://host", "kafka://h:1,,h:2", ""):
        with pytest.raises(ValueError):
            open_transport(bad)


def test_a_short_write_is_cut_back_and_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = EmbeddedLog(tmp_path)
    log.create_topic("t", 1)
    log.produce("t", b"first")
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:10]))  # disk full mid-frame
    with pytest.raises(TransportError, match="short write"):
        log.produce("t", b"second" * 10)
    monkeypatch.setattr(os, "write", real_write)
    log.produce("t", b"third")
    log.close()
    assert [r.value for r in EmbeddedLog(tmp_path).consumer("t", "g").poll(10, 0.05)] == [b"first", b"third"]
