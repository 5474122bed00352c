"""ONNX export of the reranker (what a phone runtime would load) and an ORT runner.

The exported graph takes one user's unbatched inputs with a dynamic candidate
count K; the patch is an input, so one file serves every user. The TorchScript
exporter is used (``dynamo=False``): the dynamo exporter needs onnxscript,
which is not a dependency.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from device_rerank.features import RerankInputs
from device_rerank.reranker import Reranker

logger = logging.getLogger(__name__)

INPUT_NAMES: tuple[str, ...] = ("cand_emb", "cloud_z", "ctx", "seq_emb", "seq_feat", "seq_mask", "patch")


class _Unbatched(nn.Module):
    """Adds/removes the batch axis so the exported graph has one user's shapes."""

    def __init__(self, model: Reranker) -> None:
        super().__init__()
        self.model = model

    def forward(self, cand_emb, cloud_z, ctx, seq_emb, seq_feat, seq_mask, patch):  # type: ignore[no-untyped-def]
        return self.model(cand_emb[None], cloud_z[None], ctx[None], seq_emb[None], seq_feat[None], seq_mask[None], patch)[0]


def example_inputs(model: Reranker, k: int = 100, seed: int = 0) -> RerankInputs:
    """Random but well-formed inputs (for export, parity tests and benches)."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    mask = np.ones(cfg.seq_len, dtype=np.float32)
    mask[: cfg.seq_len // 4] = 0.0
    return RerankInputs(
        cand_emb=rng.normal(size=(k, cfg.emb_dim)).astype(np.float32),
        cloud_z=rng.normal(size=k).astype(np.float32),
        ctx=rng.random((k, cfg.ctx_dim)).astype(np.float32),
        seq_emb=rng.normal(size=(cfg.seq_len, cfg.emb_dim)).astype(np.float32) * mask[:, None],
        seq_feat=rng.random((cfg.seq_len, cfg.seq_feat_dim)).astype(np.float32),
        seq_mask=mask,
    )


def _feed(inputs: RerankInputs, patch: np.ndarray) -> dict[str, np.ndarray]:
    arrays = (inputs.cand_emb, inputs.cloud_z, inputs.ctx, inputs.seq_emb, inputs.seq_feat, inputs.seq_mask, patch)
    return {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in zip(INPUT_NAMES, arrays)}


def export_onnx(model: Reranker, path: str | Path, opset: int = 17) -> Path:
    """Export with a dynamic candidate axis and check the graph with ``onnx.checker``."""
    import onnx

    path = Path(path)
    model.eval()
    ex = example_inputs(model, k=7)
    args = tuple(torch.from_numpy(v) for v in _feed(ex, np.zeros(model.config.patch_dim, np.float32)).values())
    dyn = {"cand_emb": {0: "k"}, "cloud_z": {0: "k"}, "ctx": {0: "k"}, "scores": {0: "k"}}
    with warnings.catch_warnings():  # the legacy-exporter deprecation notice is expected here
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(model, args, path, dyn, opset)
    onnx.checker.check_model(onnx.load(str(path)))
    logger.info("exported reranker to %s (%d bytes)", path, path.stat().st_size)
    return path


def _export(model: Reranker, args: tuple, path: Path, dyn: dict, opset: int) -> None:
    torch.onnx.export(
        _Unbatched(model),
        args,
        str(path),
        input_names=list(INPUT_NAMES),
        output_names=["scores"],
        dynamic_axes=dyn,
        opset_version=opset,
        dynamo=False,
    )


class OrtReranker:
    """Runs an exported reranker with onnxruntime on ``threads`` intra-op threads."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def score(self, inputs: RerankInputs, patch: np.ndarray | None = None) -> np.ndarray:
        if patch is None:
            patch = np.zeros(self.session.get_inputs()[-1].shape[0], dtype=np.float32)
        return self.session.run(["scores"], _feed(inputs, patch))[0]
