"""Distributed-training helpers shared by the GistNet and LensNet trainers (``torchrun``, any N >= 1).

Process group
- :func:`init_distributed` reads the variables ``torchrun`` exports (``WORLD_SIZE``, ``RANK``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). Without ``WORLD_SIZE`` it returns a single-process
  :class:`DistInfo` and touches nothing, so the same trainer code runs with and without ``torchrun``.
  The backend is NCCL when this rank trains on CUDA, gloo otherwise (CPU tests, CPU clusters).
- :func:`teardown` destroys the group only if :func:`init_distributed` created it.

The rule for "identical results for the same global batch"
- A step consumes one *global* batch of ``B = b * world`` rows. Every rank draws the same global batch
  from the same unsharded, identically seeded stream and keeps the contiguous slice
  ``[rank * b, (rank + 1) * b)`` (:func:`split_global_batch`, :class:`GlobalBatchShard`). Reading the
  other ranks' rows costs only token-id gathers, which is negligible next to a base-model forward.
- Each rank's loss is a mean over its own rows with equal weight per row; DDP averages gradients over
  ranks, so the update equals the single-process update on all ``B`` rows (up to float reduction order).
- Losses normalised by a *data-dependent* count (masked means: labelled entries, valid tokens) break the
  mean-of-means identity; use :func:`global_mean` there, which divides the local sum by the global count
  and rescales by ``world`` so DDP's averaging yields the global mean.
- Every other random choice of a step (e.g. GistNet's gisted-block count) must derive from
  ``(seed, step)`` alone, never from the rank.

Logging and outputs: only rank 0 logs at INFO (:func:`quiet_non_main_ranks`), writes metrics and
checkpoints; :func:`all_reduce_mean` averages a dict of metric tensors with one collective.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)

_CREATED = False  # whether this module created the process group (and so may destroy it)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    enabled: bool = False  # a process group is up (also for world == 1 under torchrun)
    backend: str = ""

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer (set by torchrun)") from None


def _wants_cuda(device: str) -> bool:
    if device in ("auto", "", "cuda"):
        return torch.cuda.is_available()
    return device.startswith("cuda")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if ``WORLD_SIZE`` is set; otherwise a single-process DistInfo.

    ``device`` is the trainer's device request (auto / cpu / cuda); it decides NCCL vs gloo and, on CUDA,
    pins this process to ``cuda:LOCAL_RANK``."""
    global _CREATED
    if "WORLD_SIZE" not in os.environ:
        return DistInfo()
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}; need 0 <= RANK < WORLD_SIZE")
    cuda = _wants_cuda(device)
    if cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        _CREATED = True
    else:
        backend = dist.get_backend()
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local, True, backend)
    log.info("rank %d/%d (local %d) joined the %s process group", info.rank, info.world, local, backend)
    return info


def rank_device(info: DistInfo, device: str = "auto") -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` under torchrun on CUDA, else the plain choice."""
    if info.enabled and _wants_cuda(device):
        return torch.device("cuda", info.local_rank)
    from megacontext.core.device import select_device

    return select_device(device)


def teardown() -> None:
    """Destroy the process group if :func:`init_distributed` made it (safe to call more than once)."""
    global _CREATED
    if _CREATED and dist.is_initialized():
        dist.destroy_process_group()
    _CREATED = False


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def quiet_non_main_ranks(info: DistInfo, logger: logging.Logger | None = None) -> None:
    """Rank 0 logs as configured; the other ranks only report warnings and errors."""
    if not info.main:
        (logger or logging.getLogger("megacontext")).setLevel(logging.WARNING)


# ---------------------------------------------------------------------- collectives on metrics
def all_reduce_mean(metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    """Average 0-d metric tensors over ranks with a single all-reduce (identity without a group)."""
    if not metrics or not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    flat = torch.stack([v.detach().float().reshape(()) for v in metrics.values()])  # [M]
    dist.all_reduce(flat)
    flat = flat / dist.get_world_size()
    return dict(zip(metrics, flat.unbind(0), strict=True))


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a wall-clock stop), so all stop together."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(value: int, device: torch.device | str = "cpu") -> int:
    """The largest of an int across ranks (every rank gets it), e.g. a step count planned from a timing."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def global_mean(local_sum: Tensor, local_count: Tensor) -> Tensor:
    """Per-rank loss whose DDP gradient average equals the gradient of ``sum(all) / count(all)``.

    Returns ``local_sum * world / global_count``; the count is all-reduced (no gradient flows through it)."""
    count = local_count.detach().float().reshape(1).clone()
    world = 1
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count)
        world = dist.get_world_size()
    return local_sum * world / count.clamp_min(1.0)[0]


# ---------------------------------------------------------------------- data
def local_batch_size(global_batch: int, world: int) -> int:
    if world < 1 or global_batch < 1 or global_batch % world:
        raise ValueError(f"global batch {global_batch} must be a positive multiple of the world size {world}")
    return global_batch // world


def split_global_batch(batch: Tensor, rank: int, world: int) -> Tensor:
    """Rows ``[rank * b, (rank + 1) * b)`` of a global batch ``[B, ...]`` with ``b = B / world``."""
    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    b = local_batch_size(batch.shape[0], world)
    return batch[rank * b:(rank + 1) * b]


class GlobalBatchShard:
    """A window source sharded by slicing global batches (see the module docstring).

    Wraps any source with ``batches(B) -> Iterator[Tensor [B, L]]`` (GistNet's ``RandomWindows`` /
    ``CacheWindows``) and exposes the same ``shard`` / ``batches`` interface the trainers call:
    ``GlobalBatchShard(src).shard(r, W).batches(b)`` yields rank ``r``'s ``b`` rows of each global batch
    of ``b * W`` rows of ``src``, so ``W`` ranks with ``b`` rows see exactly what one process with
    ``b * W`` rows sees."""

    def __init__(self, source, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        self.source, self.rank, self.world = source, rank, world

    def shard(self, rank: int, world: int) -> GlobalBatchShard:
        if self.world != 1:
            raise ValueError(f"already shard {self.rank}/{self.world}; shard the unsharded source")
        return GlobalBatchShard(self.source, rank, world)

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1 (rows per rank)")
        for batch in self.source.batches(batch_size * self.world):
            yield split_global_batch(batch, self.rank, self.world)


def wrap_ddp(module: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP around ``module`` when a group is up (``device_ids`` only on CUDA); the module itself otherwise."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
