"""Pick a transport from a URL, so every command takes one ``--transport`` string.

    embedded:///abs/path          EmbeddedLog at /abs/path
    embedded:relative/path        EmbeddedLog at ./relative/path
    kafka://host:port[,host:port] KafkaTransport with that bootstrap list
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from streams.transport import Transport

_HOSTPORT = re.compile(r"^[A-Za-z0-9._\-]+:\d{1,5}$|^\[[0-9A-Fa-f:]+\]:\d{1,5}$")


def open_transport(url: str, **kafka_config: Any) -> Transport:
    """A transport for ``url``; ``ValueError`` saying what is accepted for anything else.

    Args:
        url: see the module docstring.
        kafka_config: ``KafkaTransport`` keyword options (client_id, session_timeout_ms, ...);
            ignored for the embedded log.
    """
    if not isinstance(url, str) or not url:
        raise ValueError(f"transport URL must be a non-empty string, got {url!r}")
    if url.startswith("embedded:"):
        rest = url[len("embedded:") :]
        if rest.startswith("//"):
            rest = rest[2:]
            if not rest.startswith("/"):
                raise ValueError(f"{url!r}: use embedded:///abs/path (three slashes) or embedded:relative/path")
        if not rest:
            raise ValueError(f"{url!r}: embedded transport needs a path, e.g. embedded:///var/tandem/log")
        from streams.embedded_log import EmbeddedLog

        return EmbeddedLog(Path(rest))
    if url.startswith("kafka://"):
        hosts = url[len("kafka://") :].rstrip("/")
        parts = [h.strip() for h in hosts.split(",")]
        bad = [h for h in parts if not _HOSTPORT.match(h)]
        if not hosts or bad:
            raise ValueError(f"{url!r}: expected kafka://host:port[,host:port], bad entries {bad or [hosts]}")
        for h in parts:
            port = int(h.rsplit(":", 1)[1])
            if not 0 < port < 65536:
                raise ValueError(f"{url!r}: port {port} out of range")
        from streams.kafka_transport import KafkaTransport

        return KafkaTransport(",".join(parts), **kafka_config)
    raise ValueError(
        f"unknown transport URL {url!r}: expected embedded:///abs/path, embedded:relative/path "
        "or kafka://host:port[,host:port]"
    )
