"""Scale-out path: partition ownership per rank, shared id hashing, the sharding plan, and a DMP step.

The plan and the partition logic run without a process group (CPU CI). The DMP train
step needs NCCL all-to-all on GPUs: it runs when CUDA is available and skips otherwise;
a single-rank gloo step on CPU checks the same code path end to end.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud_recsys.config import TwoTowerConfig
from cloud_recsys.distributed import (
    DistributedConfig,
    DistributedTwoTower,
    assign_partitions,
    hash_rows,
    plan_summary,
    rank_of_users,
    sharding_plan,
)
from streams.transport import partition_for

torch.set_num_threads(1)

SMALL = TwoTowerConfig(num_users=5000, num_items=8000, num_categories=4, embedding_dim=16, out_dim=16,
                       user_hidden=(32,), item_hidden=(32,), history_len=4, batch_size=64)  # fmt: skip


@pytest.mark.parametrize("partitions, world", [(32, 8), (10, 3), (4, 4), (7, 1)])
def test_partitions_are_split_exactly_once_and_balanced(partitions: int, world: int) -> None:
    owned = [assign_partitions(partitions, world, r) for r in range(world)]
    flat = sorted(p for ps in owned for p in ps)
    assert flat == list(range(partitions)), "every partition consumed by exactly one rank"
    sizes = [len(ps) for ps in owned]
    assert max(sizes) - min(sizes) <= 1


def test_partition_assignment_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="rank"):
        assign_partitions(8, 4, 4)
    with pytest.raises(ValueError, match="idle"):
        assign_partitions(2, 4, 0)
    with pytest.raises(ValueError):
        DistributedConfig(partitions=0)
    with pytest.raises(ValueError, match="compute_device"):
        DistributedConfig(compute_device="tpu")


def test_each_user_is_trained_by_the_rank_owning_its_key_partition() -> None:
    users = np.random.default_rng(0).integers(-(2**40), 2**40, 2000)
    ranks = rank_of_users(users, partitions=12, world_size=4)
    for u, r in zip(users[:200].tolist(), ranks[:200].tolist()):
        assert partition_for(int(u), 12) in assign_partitions(12, 4, r)  # same CRC as the producers
    counts = np.bincount(ranks, minlength=4)
    assert counts.min() > 0.15 * len(users)  # keys spread over all ranks


def test_hash_rows_is_deterministic_in_range_and_spread() -> None:
    raw = np.arange(-50_000, 50_000, dtype=np.int64) * 7919
    rows = hash_rows(raw, 1000)
    assert rows.min() >= 0 and rows.max() < 1000
    assert np.array_equal(rows, hash_rows(raw.copy(), 1000))
    assert np.bincount(rows, minlength=1000).max() < 3 * len(raw) / 1000  # no hot row


@pytest.mark.parametrize("world", [2, 4])
def test_sharding_plan_places_every_table_on_valid_ranks(world: int) -> None:
    plan = sharding_plan(SMALL, world_size=world, compute_device="cuda")
    s = plan_summary(plan)
    assert set(s) == {"t_user", "t_item", "t_category"}
    for table, p in s.items():
        assert p["ranks"] and all(0 <= r < world for r in p["ranks"]), table
    # the planner balances: the two big tables do not share one device when there is room
    if world >= 2 and s["t_user"]["sharding_type"] == s["t_item"]["sharding_type"] == "table_wise":
        assert s["t_user"]["ranks"] != s["t_item"]["ranks"]


def test_sharding_plan_splits_a_table_that_does_not_fit_one_device() -> None:
    big = TwoTowerConfig(num_users=1000, num_items=20_000_000, num_categories=4, embedding_dim=64, out_dim=64)
    # 20M x 64 float32 = 4.8 GiB (plus optimizer state): cannot sit on one 2 GiB device
    plan = sharding_plan(big, world_size=8, compute_device="cuda", hbm_gb=2.0)
    item = plan_summary(plan)["t_item"]
    assert item["sharding_type"] != "table_wise" and len(item["ranks"]) > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_rank_group(backend: str) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})  # fmt: skip
    dist.init_process_group(backend=backend, rank=0, world_size=1)


def _item_table(dmp: DistributedTwoTower) -> torch.Tensor:
    """This rank's (here: the whole) item table, copied to CPU."""
    sd = dmp.model.state_dict()
    (key,) = [k for k in sd if k.endswith("t_item.weight")]
    t = sd[key]
    if hasattr(t, "local_shards"):  # ShardedTensor
        t = t.local_shards()[0].tensor
    return t.detach().cpu().clone()


def _train_and_checkpoint(device: torch.device, tmp_path: Path) -> None:
    import torch.distributed as dist

    cfg = DistributedConfig(model=SMALL, partitions=4, steps=10, compute_device=device.type)
    try:
        dmp = DistributedTwoTower(cfg, device)
        rng = np.random.default_rng(0)
        users = rng.integers(0, 50, 64)
        items = users % 8 * 10 + rng.integers(0, 10, 64)
        ur, ir = hash_rows(users, SMALL.num_users), hash_rows(items, SMALL.num_items)
        hist = (ir[:32], np.array([1] * 32 + [0] * 32))
        before = _item_table(dmp)
        losses = [dmp.train_step(ur, ir, hist)["loss"] for _ in range(8)]
        assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
        assert dmp.steps == 8
        after = _item_table(dmp)
        touched = torch.from_numpy(np.unique(ir))
        assert not torch.allclose(after[touched], before[touched])  # fused optimizer updated the batch's rows
        untouched = torch.ones(len(after), dtype=torch.bool)
        untouched[touched] = False
        assert torch.equal(after[untouched], before[untouched])  # and only those
        dmp.save(tmp_path, offsets={0: 12}, rank=0)
        assert (tmp_path / "step-8" / "offsets-rank0.json").is_file()
        assert any(p.suffix == ".distcp" for p in (tmp_path / "step-8").iterdir())
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="DMP sharded training needs a CUDA device (NCCL all-to-all); CPU CI runs the planner and gloo tests")
def test_dmp_train_step_on_gpu(tmp_path: Path) -> None:
    _one_rank_group("nccl")
    torch.cuda.set_device(0)
    _train_and_checkpoint(torch.device("cuda:0"), tmp_path)


@pytest.mark.slow
def test_dmp_train_step_single_rank_gloo_cpu(tmp_path: Path) -> None:
    """Same code path on one CPU rank (gloo): DMP wrapping, fused optimizer, loss goes down, DCP checkpoint."""
    _one_rank_group("gloo")
    _train_and_checkpoint(torch.device("cpu"), tmp_path)
