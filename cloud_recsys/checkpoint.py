"""One atomic checkpoint file: model, optimizers, id maps, histories, logQ counts, offsets.

Why together: if the model and the consumer offsets were saved separately, a
crash between the two writes would either lose events (offsets ahead of the
model) or train some twice (model ahead of offsets). One file written to a
temporary name, fsynced, then ``os.replace``d is all-or-nothing.

Numpy arrays are stored as tensors so the file loads with
``torch.load(weights_only=True)``: a checkpoint cannot execute code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from cloud_recsys.trainer import OnlineTrainer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NP = "__ndarray__"


def _to_safe(obj: Any) -> Any:
    """numpy -> tensors (marked), recursively; dict keys kept (ints/strings)."""
    if isinstance(obj, np.ndarray):
        return {_NP: torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, dict):
        return {k: _to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_safe(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_NP}:
            return obj[_NP].numpy()
        return {k: _from_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_safe(v) for v in obj)
    return obj


def save_checkpoint(trainer: "OnlineTrainer", path: str | Path) -> Path:
    """Write ``trainer.state_dict()`` to ``path`` atomically (tmp file, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    payload = {"format": FORMAT_VERSION, "state": _to_safe(trainer.state_dict())}
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    log.info("checkpoint %s: %d events trained, offsets %s", path, trainer.events_trained, trainer.offsets)
    return path


def load_checkpoint(trainer: "OnlineTrainer", path: str | Path) -> None:
    """Restore ``trainer`` from ``path``; ``ValueError`` if the file is not a Tandem checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {payload.get('format') if isinstance(payload, dict) else None}")
    trainer.load_state_dict(_from_safe(payload["state"]))
