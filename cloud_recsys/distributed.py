"""Scale-out training: the same ``TwoTower`` with sharded embedding tables under TorchRec DMP.

Why a separate path: the single-process ``OnlineTrainer`` keeps every table in one
process (CPU CI, small catalogues). When user/item tables outgrow one GPU, the
``EmbeddingBagCollection`` is sharded across ranks by TorchRec's planner and
``DistributedModelParallel`` (DMP): embedding lookups travel by all-to-all, the
MLPs are data-parallel (DDP), and the sparse optimizer (row-wise Adagrad) is fused
into the backward pass.

What differs from ``OnlineTrainer`` and why:

* Rows are ``hash(raw id) % rows`` (``hash_rows``), not an ``IdMap``: every rank must
  map an id to the same row without coordination (TorchRec's modulo hashing; a
  managed-collision module is the next step when collisions matter).
* Each rank consumes its own partitions of the ``interactions`` topic
  (``assign_partitions``); events are keyed by user id, so all of a user's events
  reach one rank and its history bag is complete there.
* In-batch negatives are rank-local (like TorchRec's two-tower example); logQ counts
  are rank-local estimates of the global frequencies.

Launch (one process per GPU; see docs/scale-out.md for multi-host)::

    torchrun --nproc_per_node=8 -m cloud_recsys.distributed \
        --transport kafka://broker:9092 --partitions 32 --steps 100000 --checkpoint-dir ckpt/

CPU: the planner and the partition assignment run anywhere (tests do), but DMP's
table-wise all-to-all needs NCCL; ``main`` refuses to run without CUDA unless
``--allow-cpu`` (gloo, for debugging only).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from cloud_recsys.config import TwoTowerConfig
from cloud_recsys.features import build_kjt
from cloud_recsys.two_tower import TwoTower, in_batch_logits, sampled_softmax_loss
from streams.producer import partitions_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedConfig:
    """One DMP training job.

    Args:
        model: two-tower sizes; ``num_users`` / ``num_items`` are the hashed table sizes.
        partitions: partitions of the interactions topic (a multiple of the world size
            balances ranks; more partitions than ranks lets the job grow without re-keying).
        topic / group: what each rank consumes, and the consumer group (one per job).
        transport: ``kafka://host:port`` or ``embedded:PATH``; "" trains on synthetic events.
        steps: optimizer steps per rank.
        checkpoint_every: steps between distributed checkpoints (0: only at the end).
        checkpoint_dir: where ``torch.distributed.checkpoint`` writes sharded state.
        compute_device: "cuda" (NCCL) or "cpu" (gloo; planning and debugging only).
        hbm_gb: per-device memory the planner may use for tables (None: the device's).
    """

    model: TwoTowerConfig = field(default_factory=lambda: TwoTowerConfig(num_users=1_000_000, num_items=1_000_000))
    partitions: int = 32
    topic: str = "interactions"
    group: str = "cloud-trainer"
    transport: str = ""
    steps: int = 1000
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    compute_device: str = "cuda"
    hbm_gb: float | None = None

    def __post_init__(self) -> None:
        if self.partitions <= 0 or self.steps <= 0 or self.checkpoint_every < 0:
            raise ValueError("partitions and steps must be positive, checkpoint_every non-negative")
        if self.compute_device not in ("cuda", "cpu"):
            raise ValueError(f"compute_device must be 'cuda' or 'cpu', got {self.compute_device!r}")


# -- partitions and ids ---------------------------------------------------------------
def assign_partitions(partitions: int, world_size: int, rank: int) -> list[int]:
    """Partitions consumed by ``rank``: contiguous ranges, like Kafka's RangeAssignor.

    Deterministic on every rank with no coordinator, so ranks never overlap and none
    is skipped; with Kafka consumer groups the broker's assignment can replace it.
    """
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if partitions < world_size:
        raise ValueError(f"{partitions} partitions cannot feed {world_size} ranks (some would idle)")
    per, extra = divmod(partitions, world_size)
    start = rank * per + min(rank, extra)
    return list(range(start, start + per + (1 if rank < extra else 0)))


def rank_of_users(user_ids: np.ndarray, partitions: int, world_size: int) -> np.ndarray:
    """Rank that trains each user: its key's partition (same CRC as the producers), then its owner."""
    owner = np.empty(partitions, dtype=np.int64)
    for r in range(world_size):
        owner[assign_partitions(partitions, world_size, r)] = r
    return owner[partitions_for(np.asarray(user_ids, dtype=np.int64), partitions)]


def hash_rows(raw: np.ndarray, rows: int) -> np.ndarray:
    """Raw int64 ids -> table rows in [0, rows): a fixed multiplicative hash, identical on every rank."""
    x = np.asarray(raw, dtype=np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(29)
    return (x % np.uint64(rows)).astype(np.int64)


# -- planning ---------------------------------------------------------------------------
def sharding_plan(config: TwoTowerConfig, world_size: int, compute_device: str = "cuda",
                  local_world_size: int | None = None, hbm_gb: float | None = None) -> Any:  # fmt: skip
    """TorchRec ``ShardingPlan`` for the two-tower's tables on ``world_size`` devices.

    Runs without a process group (single-process planning), so the plan can be
    inspected and tested before launching. ``DMP`` uses ``collective_plan`` instead,
    which plans on rank 0 and broadcasts.
    """
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner

    model = TwoTower(config, device=torch.device("meta"), sparse_grad=False)
    planner = EmbeddingShardingPlanner(topology=_topology(world_size, compute_device, local_world_size, hbm_gb))
    return planner.plan(model, [EmbeddingBagCollectionSharder()])  # type: ignore[list-item]


def _topology(world_size: int, compute_device: str, local_world_size: int | None, hbm_gb: float | None) -> Any:
    from torchrec.distributed.planner import Topology

    kw: dict[str, Any] = {}
    if hbm_gb is not None:
        kw["hbm_cap"] = int(hbm_gb * 2**30)
    return Topology(world_size=world_size, compute_device=compute_device,
                    local_world_size=local_world_size or world_size, **kw)  # fmt: skip


def plan_summary(plan: Any) -> dict[str, dict[str, Any]]:
    """{table: {"sharding_type", "ranks"}} of the EBC's plan (for logs and tests)."""
    out: dict[str, dict[str, Any]] = {}
    for _module, params in plan.plan.items():
        for table, ps in params.items():
            out[table] = {"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel, "ranks": list(ps.ranks or [])}
    return out


# -- the DMP model ------------------------------------------------------------------------
class DistributedTwoTower:
    """``TwoTower`` under DMP with fused row-wise Adagrad for tables and Adam for the MLPs.

    Args:
        config: job configuration.
        device: this rank's device (``cuda:LOCAL_RANK``).
        pg: the process group (``torch.distributed`` default group when None).
    """

    def __init__(self, config: DistributedConfig, device: torch.device, pg: Any = None) -> None:
        import torch.distributed as dist
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.planner import EmbeddingShardingPlanner
        from torchrec.optim import RowWiseAdagrad, apply_optimizer_in_backward
        from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        self.config = config
        self.device = device
        mc = config.model
        pg = pg or dist.GroupMember.WORLD
        model = TwoTower(mc, device=torch.device("meta"), sparse_grad=False)
        # tables: optimizer fused into backward (no dense gradient of a sharded table is ever built)
        apply_optimizer_in_backward(RowWiseAdagrad, model.ebc.parameters(), {"lr": mc.lr_sparse})
        world = dist.get_world_size(pg)
        planner = EmbeddingShardingPlanner(
            topology=_topology(world, device.type, int(os.environ.get("LOCAL_WORLD_SIZE", world)), config.hbm_gb)
        )
        sharders = [EmbeddingBagCollectionSharder()]
        self.plan = planner.collective_plan(model, sharders, pg)  # type: ignore[arg-type]
        self.model: nn.Module = DistributedModelParallel(module=model, device=device, plan=self.plan, sharders=sharders)  # type: ignore[arg-type]
        dense = KeyedOptimizerWrapper(
            dict(in_backward_optimizer_filter(self.model.named_parameters())),
            lambda params: torch.optim.Adam(params, lr=mc.lr_dense, weight_decay=mc.weight_decay),
        )
        self.optimizer = CombinedOptimizer([self.model.fused_optimizer, dense])
        self.item_counts = np.zeros(mc.num_items + 1, dtype=np.float64)  # rank-local logQ estimate
        self.steps = 0

    def train_step(self, user_rows: np.ndarray, item_rows: np.ndarray, hist: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
        """One in-batch sampled-softmax step on this rank's batch (rows already hashed)."""
        mc = self.config.model
        np.add.at(self.item_counts, item_rows, 1.0)
        kjt = build_kjt(len(user_rows), user_rows, hist, item_rows, np.zeros_like(item_rows)).to(self.device)
        self.model.train()
        user, item = self.model(kjt)
        rows_t = torch.from_numpy(item_rows).to(self.device)
        log_q = None
        if mc.logq_correction:
            log_q = torch.from_numpy(np.log(self.item_counts[item_rows] / self.item_counts.sum())).float().to(self.device)
        loss = sampled_softmax_loss(in_batch_logits(user, item, rows_t, mc.temperature, log_q, mc.mask_accidental_hits))
        self.optimizer.zero_grad()
        loss.backward()  # table rows are updated here (fused optimizer)
        self.optimizer.step()  # MLPs
        self.steps += 1
        return {"loss": float(loss.detach()), "n": float(len(user_rows))}

    def state_dict(self) -> dict[str, Any]:
        """Sharded model + optimizer state (ShardedTensors: each rank holds its shards)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def save(self, path: str | Path, offsets: dict[int, int], rank: int) -> None:
        """Distributed checkpoint: every rank writes its shards; offsets saved per rank beside them.

        The offsets are written after the shards, so a reader that finds a rank's offsets
        file knows the shards it belongs to are complete (restart: load, then seek).
        """
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        dcp.save(self.state_dict(), checkpoint_id=str(path / f"step-{self.steps}"))
        tmp = path / f"step-{self.steps}" / f"offsets-rank{rank}.json.tmp"
        tmp.write_text(json.dumps({"steps": self.steps, "offsets": offsets}))
        tmp.replace(tmp.with_suffix(""))


# -- data -------------------------------------------------------------------------------
def synthetic_batches(config: DistributedConfig, rank: int, world_size: int, batch_size: int, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(user ids, item ids) batches of the users this rank owns (a stand-in for the topic)."""
    rng = np.random.default_rng(seed + rank)
    while True:
        users = rng.integers(0, 100_000, batch_size * 4)
        users = users[rank_of_users(users, config.partitions, world_size) == rank][:batch_size]
        items = (users * 7 + rng.integers(0, 50, len(users))) % 200_000
        yield users, items


def topic_batches(config: DistributedConfig, rank: int, world_size: int, batch_size: int, offsets: dict[int, int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(user ids, item ids) positives from this rank's partitions; ``offsets`` is updated as records are used."""
    from streams.batch import EventBatch, decode_valid
    from streams.schema import SchemaError
    from streams.transports import open_transport

    from cloud_recsys.trainer import positives

    transport = open_transport(config.transport)
    mine = assign_partitions(config.partitions, world_size, rank)
    consumer = transport.consumer(config.topic, group=config.group, partitions=mine)
    buf: list[EventBatch] = []
    n = 0
    while True:
        records = consumer.poll(max_records=500, timeout_s=1.0)
        for rec in records:
            try:
                batch, _bad = decode_valid(rec.value)
            except SchemaError as exc:
                log.warning("rank %d: skipping record %d@%d: %s", rank, rec.partition, rec.offset, exc.reason)
                continue
            pos = positives(batch)
            buf.append(pos)
            n += len(pos)
            offsets[rec.partition] = rec.offset + 1
            if n >= batch_size:
                allb = EventBatch.concat(buf)
                yield allb.user_id, allb.item_id
                buf, n = [], 0


# -- entry point ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc_per_node=N -m cloud_recsys.distributed [options]``."""
    ap = argparse.ArgumentParser(prog="cloud_recsys.distributed", description="Sharded two-tower training (TorchRec DMP).")
    ap.add_argument("--transport", default="", help="kafka://host:port or embedded:PATH; empty: synthetic events")
    ap.add_argument("--topic", default="interactions")
    ap.add_argument("--group", default="cloud-trainer")
    ap.add_argument("--partitions", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=1024, help="per rank")
    ap.add_argument("--user-rows", type=int, default=1_000_000)
    ap.add_argument("--item-rows", type=int, default=1_000_000)
    ap.add_argument("--embedding-dim", type=int, default=64)
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--allow-cpu", action="store_true", help="gloo on CPU (debugging; all-to-all may be unsupported)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)

    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not cuda and not a.allow_cpu:
        ap.error("DMP training needs CUDA GPUs (NCCL all-to-all); pass --allow-cpu to try gloo for debugging")
    if "RANK" not in os.environ:
        ap.error("launch with torchrun (RANK/WORLD_SIZE/MASTER_ADDR are not set)")
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    model_cfg = TwoTowerConfig(num_users=a.user_rows, num_items=a.item_rows, num_categories=1,
                               embedding_dim=a.embedding_dim, out_dim=a.embedding_dim, batch_size=a.batch_size)  # fmt: skip
    cfg = DistributedConfig(model=model_cfg, partitions=a.partitions, topic=a.topic, group=a.group, transport=a.transport,
                            steps=a.steps, checkpoint_every=a.checkpoint_every, checkpoint_dir=a.checkpoint_dir,
                            compute_device="cuda" if cuda else "cpu")  # fmt: skip
    try:
        trainer = DistributedTwoTower(cfg, device)
        if rank == 0:
            log.info("config %s", json.dumps(asdict(cfg), default=str))
            log.info("sharding plan: %s", plan_summary(trainer.plan))
        offsets: dict[int, int] = {}
        batches = (topic_batches(cfg, rank, world, a.batch_size, offsets) if cfg.transport
                   else synthetic_batches(cfg, rank, world, a.batch_size))  # fmt: skip
        hist_len = model_cfg.history_len
        histories: dict[int, list[int]] = {}  # complete per user: users are partitioned by key
        t0 = time.perf_counter()
        for step, (users, items) in zip(range(cfg.steps), batches):
            vals, lens = [], []
            for u, i in zip(users.tolist(), items.tolist()):
                h = histories.setdefault(u, [])
                vals.extend(h[-hist_len:])
                lens.append(min(len(h), hist_len))
                h.append(i)
                del h[:-hist_len]
            ur, ir = hash_rows(users, model_cfg.num_users), hash_rows(items, model_cfg.num_items)
            hv = hash_rows(np.asarray(vals, np.int64), model_cfg.num_items)
            m = trainer.train_step(ur, ir, (hv, np.asarray(lens, np.int64)))
            if rank == 0 and (step + 1) % 50 == 0:
                log.info("step %d loss %.4f (%.1f steps/s)", step + 1, m["loss"], (step + 1) / (time.perf_counter() - t0))
            if cfg.checkpoint_dir and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                trainer.save(cfg.checkpoint_dir, offsets, rank)
        if cfg.checkpoint_dir:
            trainer.save(cfg.checkpoint_dir, offsets, rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
