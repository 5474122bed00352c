"""Glue between the services and device_rerank: the cloud's update gate and the fleet's devices.

``UpdateGate`` wraps ``device_rerank.envelope.UpdateVerifier``: it recognizes exact
re-deliveries (same envelope bytes, ``is_duplicate``) before verification, so a redelivered
update is a duplicate, not a "replayed" dead letter, and its state (per-device last seq, the
digests of each device's last few accepted envelopes, model version) is checkpointed with
the model. All of it is bounded by the devices active within the staleness window.

Keys: there is no master key in the code. ``master_key`` reads ``TANDEM_DEVICE_KEY`` (via the
settings) and refuses to go on without one, unless dev mode (``TANDEM_DEV_MODE=1``) is on;
dev mode uses a published, insecure key and says so loudly in the log. During a rotation
the cloud also accepts ``TANDEM_DEVICE_KEY_PREVIOUS`` (docs/services.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import deque
from typing import Any

log = logging.getLogger(__name__)

#: Envelopes larger than this are dead-lettered as "oversized" before decoding.
MAX_UPDATE_BYTES = 64 * 1024
#: Environment switches (the settings classes expose the same names as fields).
ENV_KEY = "TANDEM_DEVICE_KEY"
ENV_PREVIOUS_KEY = "TANDEM_DEVICE_KEY_PREVIOUS"
ENV_DEV_MODE = "TANDEM_DEV_MODE"
#: Digests of a device's last accepted envelopes kept to tell a redelivery from a replay.
RECENT_PER_DEVICE = 8
#: Shortest accepted master secret (bytes after hex/UTF-8 decoding).
MIN_KEY_BYTES = 16
#: The key ``main`` used to ship as a default: refused outside dev mode, since anyone has read it.
_PUBLISHED_KEYS = frozenset({"tandem-dev-master-key"})
_DEV_SEED = b"tandem-dev-mode-insecure-published-key"


class KeyConfigError(ValueError):
    """The device key configuration is missing or unsafe; the service must not start."""


def dev_mode_on(env: dict[str, str] | None = None) -> bool:
    """True when ``TANDEM_DEV_MODE`` is set to a true value (1/true/yes/on)."""
    env = os.environ if env is None else env  # type: ignore[assignment]
    return str(env.get(ENV_DEV_MODE, "")).strip().lower() in ("1", "true", "yes", "on")


def _decode_key(key: str) -> bytes:
    try:
        return bytes.fromhex(key)
    except ValueError:
        return key.encode()


def master_key(key: str, dev_mode: bool | None = None) -> bytes:
    """The fleet's master HMAC secret from settings (hex if it parses as hex, else UTF-8).

    Raises ``KeyConfigError`` (one line, says what to set) when the key is missing, shorter
    than ``MIN_KEY_BYTES`` or the formerly published default, unless dev mode is on
    (``dev_mode`` or ``TANDEM_DEV_MODE``). Dev mode without a key uses a published key and
    logs a warning that nothing is secret.
    """
    dev = dev_mode_on() if dev_mode is None else bool(dev_mode)
    key = (key or "").strip()
    if not key:
        if not dev:
            raise KeyConfigError(
                f"{ENV_KEY} is not set: give the services a secret of at least {MIN_KEY_BYTES} bytes "
                f"(e.g. `openssl rand -hex 32`), or set {ENV_DEV_MODE}=1 for a local demo with a published key"
            )
        log.warning("DEV MODE: device updates are signed with a published key; anyone can act as any device. "
                    "Never use dev mode outside a local demo.")  # fmt: skip
        return hashlib.sha256(_DEV_SEED).digest()
    if key in _PUBLISHED_KEYS and not dev:
        raise KeyConfigError(f"{ENV_KEY} is the published default key {key!r}; generate a secret one (openssl rand -hex 32)")
    raw = _decode_key(key)
    if len(raw) < MIN_KEY_BYTES:
        if not dev:
            raise KeyConfigError(f"{ENV_KEY} is {len(raw)} bytes; at least {MIN_KEY_BYTES} are needed")
        raw = hashlib.sha256(b"tandem-master:" + raw).digest()  # dev only: stretch a short demo key
    return raw


def previous_master_keys(keys: str | None = None, dev_mode: bool | None = None) -> list[bytes]:
    """Masters still accepted during a rotation: comma-separated ``keys`` (default ``TANDEM_DEVICE_KEY_PREVIOUS``)."""
    raw = os.environ.get(ENV_PREVIOUS_KEY, "") if keys is None else keys
    return [master_key(k, dev_mode) for k in raw.split(",") if k.strip()]


def default_contract() -> tuple[int, int]:
    """(n_params, emb_dim) of the reranker the fleet service runs (``RerankerConfig()``)."""
    from device_rerank.config import RerankerConfig
    from device_rerank.reranker import Reranker

    cfg = RerankerConfig()
    return int(Reranker(cfg).num_parameters()), int(cfg.emb_dim)


def digest(raw: bytes) -> str:
    """Id of an exact envelope (16-byte BLAKE2b, hex)."""
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


class UpdateGate:
    """Verify, deduplicate and track device update envelopes.

    The verifier enforces the full update contract (``device_rerank.envelope.make_verifier``):
    widths, ``n_params``, finite values, norm bounds, capped example counts, non-zero
    feature direction. Rejections are counted per reason in ``rejected``.

    Args:
        key: master secret (``CloudSettings.device_key``); see ``master_key``.
        max_bytes: size limit (oversized envelopes are rejected before decoding).
        max_staleness_versions: accepted lag of an update's model version.
        n_params / emb_dim: the devices' reranker shape (default: the fleet's ``RerankerConfig()``).
        device_config: the devices' configuration (bounds; default ``DeviceConfig()``).
        previous_keys: comma-separated earlier masters accepted during a rotation
            (None: ``TANDEM_DEVICE_KEY_PREVIOUS``).
        dev_mode: allow running without a key (None: ``TANDEM_DEV_MODE``).
    """

    def __init__(
        self,
        key: str,
        max_bytes: int = MAX_UPDATE_BYTES,
        max_staleness_versions: int = 3,
        n_params: int | None = None,
        emb_dim: int | None = None,
        device_config: Any | None = None,
        previous_keys: str | None = None,
        dev_mode: bool | None = None,
    ) -> None:
        from device_rerank.envelope import Keyring, make_verifier

        if n_params is None or emb_dim is None:
            dn, de = default_contract()
            n_params = dn if n_params is None else n_params
            emb_dim = de if emb_dim is None else emb_dim
        previous = tuple(Keyring(k) for k in previous_master_keys(previous_keys, dev_mode))
        self.verifier = make_verifier(
            Keyring(master_key(key, dev_mode)), n_params, emb_dim, device_config,
            max_staleness_versions=max_staleness_versions, previous=previous, max_bytes=max_bytes,
        )  # fmt: skip
        #: digests of each device's last ``RECENT_PER_DEVICE`` accepted envelopes (pruned with the verifier)
        self.recent: dict[int, deque[str]] = {}

    def is_duplicate(self, raw: bytes) -> bool:
        """True for an exact redelivery of one of the device's recently accepted envelopes.

        Replaces a set of every applied envelope digest: memory is ``RECENT_PER_DEVICE``
        digests per device active within the staleness window. A redelivery older than that
        is rejected as ``replayed`` by ``verify`` (dead-lettered, never applied twice).
        """
        from device_rerank.envelope import _decoder

        try:
            device = int(_decoder.decode(raw).device_id)
        except Exception:  # verify() rejects it with the reason
            return False
        seen = self.recent.get(device)
        return seen is not None and digest(raw) in seen

    @property
    def rejected(self) -> dict[str, int]:
        """Rejections so far, by reason (``device_rerank.envelope.REASONS``)."""
        return dict(self.verifier.rejected)

    def set_model_version(self, version: int) -> None:
        self.verifier.current_model_version = int(version)  # prunes the verifier's per-device state
        for d in [d for d in self.recent if d not in self.verifier.last_seq]:
            del self.recent[d]

    def verify(self, raw: bytes) -> Any:
        """The ``DecodedUpdate``; raises ``Rejected(reason)`` (tandem.services.cloud_service)."""
        from device_rerank.envelope import UpdateRejected

        from tandem.services.cloud_service import Rejected

        try:
            out = self.verifier.verify(raw)
        except UpdateRejected as exc:
            raise Rejected(f"{exc.reason}: {exc.detail}" if exc.detail else exc.reason) from None
        self.recent.setdefault(int(out.device_id), deque(maxlen=RECENT_PER_DEVICE)).append(digest(raw))
        return out

    def state(self) -> dict[str, Any]:
        return {
            "last_seq": {str(d): s for d, s in self.verifier.last_seq.items()},
            "last_version": {str(d): s for d, s in self.verifier.last_version.items()},
            "recent": {str(d): list(q) for d, q in self.recent.items()},
            "model_version": self.verifier.current_model_version,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        v = self.verifier
        v.last_seq = {int(d): int(s) for d, s in state.get("last_seq", {}).items()}
        # An older checkpoint has no versions: treat its devices as current (pruned later).
        versions = state.get("last_version", {})
        version = int(state.get("model_version", 0))
        v.last_version = {d: int(versions.get(str(d), version)) for d in v.last_seq}
        v.current_model_version = version
        self.recent = {int(d): deque(q, maxlen=RECENT_PER_DEVICE) for d, q in state.get("recent", {}).items() if int(d) in v.last_seq}


def sign_update(key: str, dev_mode: bool | None = None, **fields: Any) -> bytes:
    """Sign an envelope as device ``fields['device_id']`` would (tests, tools): wire bytes."""
    from device_rerank.envelope import Keyring, sign

    ring = Keyring(master_key(key, dev_mode))
    return sign(ring.key_for(int(fields["device_id"])), **fields).encode()
