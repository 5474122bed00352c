"""The models an evaluation trained, saved to a folder and loaded back (``tandem evaluate --save-model``).

Why: a replay trains the production cloud and, per strategy, the shared reranker its fleet
runs; without a copy, a run's winner cannot be inspected, served or compared later.

Layout of a saved folder (``FORMAT`` 2; 1 kept the trainer beside the pickled cloud)::

    manifest.json          format, source, events, seed, the cloud's file, one entry per strategy
    cloud.pkl              the CloudRecommender (pickle, our own file; it pickles its trainer as
                           ``OnlineTrainer.state_dict()``), as the cloud service checkpoints it
                           (tandem/services/recommender_engine.py)
    strategies/<slug>.pt   torch.save of {"reranker_config", "state_dict" (the shared reranker),
                           "model_version", "item_delta" and "user_vec" ({"ids", "vectors"}: the
                           strategy's overlays on the cloud)}; loads with ``weights_only=True``

With several replay workers each one saves what it trained (worker 1 the cloud, which is the
same in every worker), so nothing large travels back to the parent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloud_recsys.recommender import CloudRecommender
from device_rerank.config import RerankerConfig
from device_rerank.reranker import Reranker
from tandem.strategies.server import StrategyCloud

FORMAT = 2
MANIFEST = "manifest.json"
CLOUD_FILE = "cloud.pkl"
STRATEGY_DIR = "strategies"


def slug(label: str) -> str:
    """A strategy label as a file name: ``feature[drift=0.2]`` -> ``feature_drift_0.2_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", label)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- the cloud ---------------------------------------------------------------------------
def save_cloud(folder: Path | str, cloud: CloudRecommender) -> Path:
    """Write ``cloud`` to ``folder/cloud.pkl`` (its availability callback is not saved: the
    loader's caller supplies one, as the service does)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = pickle.dumps(cloud, protocol=pickle.HIGHEST_PROTOCOL)
    path = folder / CLOUD_FILE
    _atomic_write(path, data)
    return path


def load_cloud(path: Path | str) -> CloudRecommender:
    """Inverse of ``save_cloud`` (a trusted file: it is a pickle)."""
    cloud: CloudRecommender = pickle.loads(Path(path).read_bytes())  # our own file, written by save_cloud
    return cloud


# -- one strategy's shared reranker and overlays -------------------------------------------
def _vectors(d: dict[int, np.ndarray], dim: int) -> dict[str, torch.Tensor]:
    ids = sorted(d)
    vecs = np.stack([np.asarray(d[i], np.float32) for i in ids]) if ids else np.zeros((0, dim), np.float32)
    return {"ids": torch.tensor(ids, dtype=torch.int64), "vectors": torch.from_numpy(vecs)}


def _unvectors(t: dict[str, torch.Tensor]) -> dict[int, np.ndarray]:
    return {int(i): v for i, v in zip(t["ids"].tolist(), t["vectors"].numpy())}


def save_strategy(folder: Path | str, label: str, server: StrategyCloud) -> Path:
    """Write one strategy's shared reranker and overlays to ``folder/strategies/<slug>.pt``."""
    out = Path(folder) / STRATEGY_DIR
    out.mkdir(parents=True, exist_ok=True)
    dim = server.reranker.config.emb_dim
    payload = {
        "label": label,
        "reranker_config": dataclasses.asdict(server.reranker.config),
        "state_dict": {k: v.detach().clone() for k, v in server.reranker.state_dict().items()},
        "model_version": int(server.model_version),
        "item_delta": _vectors(server.item_delta, dim),
        "user_vec": _vectors(server.user_vec, dim),
    }
    path = out / f"{slug(label)}.pt"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


@dataclass
class SavedStrategy:
    """One strategy as saved: its fleet's shared reranker and its overlays on the cloud.

    Args:
        label / name: the result's label and the strategy's registered name.
        reranker: the shared reranker the fleet ran last (eval mode).
        model_version: the cloud version that shipped it (0: never changed).
        item_delta / user_vec: device item-row deltas and uploaded interest vectors.
    """

    label: str
    name: str
    reranker: Reranker
    model_version: int
    item_delta: dict[int, np.ndarray]
    user_vec: dict[int, np.ndarray]

    def server(self, cloud: CloudRecommender) -> StrategyCloud:
        """This strategy's server side over ``cloud``, ready for ``serve_candidates``."""
        sc = StrategyCloud(self.reranker)
        sc.model_version = self.model_version
        sc.item_delta = dict(self.item_delta)
        sc.user_vec = dict(self.user_vec)
        sc.refresh(cloud)
        return sc


def load_strategy(path: Path | str, name: str = "") -> SavedStrategy:
    """Inverse of ``save_strategy``."""
    payload = torch.load(Path(path), weights_only=True)
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in payload["reranker_config"].items()}
    model = Reranker(RerankerConfig(**cfg))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return SavedStrategy(
        label=str(payload["label"]),
        name=name,
        reranker=model,
        model_version=int(payload["model_version"]),
        item_delta=_unvectors(payload["item_delta"]),
        user_vec=_unvectors(payload["user_vec"]),
    )


# -- the folder --------------------------------------------------------------------------------
def write_manifest(folder: Path | str, source: str, n_events: int, seed: int, strategies: list[tuple[str, str]]) -> Path:
    """Write ``manifest.json`` for a folder whose files the replay already wrote.

    Args:
        strategies: (label, registered name) of every strategy saved.
    Raises:
        FileNotFoundError: a file the manifest would name is missing (a worker did not save it).
    """
    folder = Path(folder)
    entries = [{"label": label, "name": name, "file": f"{STRATEGY_DIR}/{slug(label)}.pt"} for label, name in strategies]
    for rel in [CLOUD_FILE] + [e["file"] for e in entries]:
        if not (folder / rel).is_file():
            raise FileNotFoundError(f"{folder / rel}: not written by the replay")
    manifest = {"format": FORMAT, "source": source, "n_events": int(n_events), "seed": int(seed), "cloud": CLOUD_FILE, "strategies": entries}
    path = folder / MANIFEST
    _atomic_write(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return path


@dataclass
class SavedModels:
    """A saved folder, loaded: the cloud and every strategy by label."""

    cloud: CloudRecommender
    strategies: dict[str, SavedStrategy]
    manifest: dict[str, Any]


def load_saved(folder: Path | str) -> SavedModels:
    """Load what ``tandem evaluate --save-model DIR`` wrote.

    Raises:
        ValueError: ``folder`` holds no manifest, or one of another format.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise ValueError(f"{folder}: no {MANIFEST} (not written by tandem evaluate --save-model)")
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder}: saved-model format {manifest.get('format')!r}, this version reads {FORMAT}")
    cloud = load_cloud(folder / manifest["cloud"])
    strategies = {e["label"]: load_strategy(folder / e["file"], e["name"]) for e in manifest["strategies"]}
    return SavedModels(cloud, strategies, manifest)


__all__ = ["SavedModels", "SavedStrategy", "load_cloud", "load_saved", "load_strategy", "save_cloud", "save_strategy", "write_manifest"]
