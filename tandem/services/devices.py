"""Glue between the services and device_rerank: the cloud's update gate and the fleet's devices.

``UpdateGate`` wraps ``device_rerank.envelope.UpdateVerifier``: it deduplicates exact
re-deliveries (same envelope bytes) before verification, so a redelivered update is a
duplicate, not a "replayed" dead letter, and its state (per-device last seq, digests of
applied envelopes, model version) is checkpointed with the model.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

log = logging.getLogger(__name__)

#: Envelopes larger than this are dead-lettered as "oversized" before decoding.
MAX_UPDATE_BYTES = 64 * 1024


def master_key(key: str) -> bytes:
    """The fleet's master HMAC secret from settings (hex if it parses as hex, else UTF-8)."""
    try:
        raw = bytes.fromhex(key)
    except ValueError:
        raw = key.encode()
    if len(raw) < 16:  # Keyring wants >= 16 bytes; stretch short dev keys deterministically
        raw = hashlib.sha256(b"tandem-master:" + raw).digest()
    return raw


def digest(raw: bytes) -> str:
    """Id of an exact envelope (16-byte BLAKE2b, hex)."""
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


class UpdateGate:
    """Verify, deduplicate and track device update envelopes.

    Args:
        key: master secret (``CloudSettings.device_key``).
        max_bytes: size limit (oversized envelopes are rejected before decoding).
        max_staleness_versions: accepted lag of an update's model version.
    """

    def __init__(self, key: str, max_bytes: int = MAX_UPDATE_BYTES, max_staleness_versions: int = 3) -> None:
        from device_rerank.envelope import Keyring, UpdateVerifier

        self.verifier = UpdateVerifier(Keyring(master_key(key)), max_bytes=max_bytes, max_staleness_versions=max_staleness_versions)

    def set_model_version(self, version: int) -> None:
        self.verifier.current_model_version = int(version)

    def verify(self, raw: bytes) -> Any:
        """The ``DecodedUpdate``; raises ``Rejected(reason)`` (tandem.services.cloud_service)."""
        from device_rerank.envelope import UpdateRejected

        from tandem.services.cloud_service import Rejected

        try:
            return self.verifier.verify(raw)
        except UpdateRejected as exc:
            raise Rejected(f"{exc.reason}: {exc.detail}" if exc.detail else exc.reason) from None

    def state(self) -> dict[str, Any]:
        return {
            "last_seq": {str(d): s for d, s in self.verifier.last_seq.items()},
            "model_version": self.verifier.current_model_version,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.verifier.last_seq = {int(d): int(s) for d, s in state.get("last_seq", {}).items()}
        self.verifier.current_model_version = int(state.get("model_version", 0))


def sign_update(key: str, **fields: Any) -> bytes:
    """Sign an envelope as device ``fields['device_id']`` would (tests, tools): wire bytes."""
    from device_rerank.envelope import Keyring, sign

    ring = Keyring(master_key(key))
    return sign(ring.key_for(int(fields["device_id"])), **fields).encode()
