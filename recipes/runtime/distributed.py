"""Ranks for a search sharded over ``torch.distributed`` (launched by ``torchrun``).

The dev set is split across ranks: each rank runs its share of the dev batches through every
candidate, and the per-utterance edit counts (WER) and per-batch KL sums (the default recipe's
score) are all-reduced into arrays indexed by the *global* utterance / batch position. Each rank
writes only its own positions (the others stay zero), so the sum is exact and every rank holds
the same numbers a single process computes; WERs are computed from the summed counts, never
averaged. Every decision therefore comes out the same on all ranks and in one process, and the
ranks stay in lock-step without exchanging decisions.

Launch: ``torchrun --nproc-per-node N --no-python stablequant quantize ...``. RANK / WORLD_SIZE /
LOCAL_RANK come from the environment; the process group (gloo on the CPU, NCCL on CUDA) is
initialised only when WORLD_SIZE > 1. Rank 0 alone writes the state file and the outputs.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and shows progress."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def ranks_from_env() -> Ranks:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (one process without them)."""
    ranks = Ranks(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if ranks.world < 1 or not 0 <= ranks.rank < ranks.world:
        raise ValueError(f"bad torchrun environment: RANK={ranks.rank}, WORLD_SIZE={ranks.world}")
    return ranks


def init_ranks(device: torch.device) -> Ranks:
    """Join the process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA); idempotent."""
    import torch.distributed as dist

    ranks = ranks_from_env()
    if ranks.world > 1 and not dist.is_initialized():
        # Workaround: ModelOpt warns once per quantized module class that no tensor-parallel state is set; the
        # ranks here replicate the model and shard only the dev set. Remove when ModelOpt lets a
        # caller state that (its quant_module.py:82 warning, 0.47).
        warnings.filterwarnings("ignore", message="Distributed training is initialized but no parallel_state")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
        log.info("rank %d of %d joined the %s process group", ranks.rank, ranks.world, backend)
    return current_ranks()


def current_ranks() -> Ranks:
    """This process's rank in the initialised process group, else one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return Ranks()


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks (int64 or float64; exact where only one rank holds each entry)."""
    if current_ranks().world == 1:
        return values
    import torch.distributed as dist

    t = torch.from_numpy(np.ascontiguousarray(values)).to(_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def broadcast_from_main(value):
    """Rank 0's ``value`` on every rank (a picklable object; only between our own ranks)."""
    if current_ranks().world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def barrier() -> None:
    if current_ranks().world > 1:
        import torch.distributed as dist

        dist.barrier()


def assign_batches(costs: Sequence[int], world: int) -> list[int]:
    """Rank per batch: largest first to the least loaded rank (ties: lowest rank); deterministic."""
    load = [0] * world
    owner = [0] * len(costs)
    for b in sorted(range(len(costs)), key=lambda b: (-costs[b], b)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[b] = r
        load[r] += costs[b]
    return owner


class DevShard:
    """This rank's dev batches, and where their batches / utterances sit in the whole set."""

    def __init__(self, batches: Sequence, ranks: Ranks | None = None):
        self.ranks = ranks or current_ranks()
        owner = assign_batches([int(b.input_values.numel()) for b in batches], self.ranks.world)
        self.positions = [b for b in range(len(batches)) if owner[b] == self.ranks.rank]
        self.batches = [batches[b] for b in self.positions]
        first = np.cumsum([0] + [len(b.ids) for b in batches])
        self.num_batches, self.num_utterances = len(batches), int(first[-1])
        self.rows = [int(i) for b in self.positions for i in range(first[b], first[b + 1])]
        self.reduce = True

    @classmethod
    def whole(cls, num_batches: int) -> DevShard:
        """All of ``num_batches`` batches in this process, nothing exchanged (per-batch use only)."""
        shard = cls.__new__(cls)
        shard.ranks, shard.positions, shard.batches = Ranks(), list(range(num_batches)), []
        shard.num_batches, shard.num_utterances, shard.rows, shard.reduce = num_batches, 0, [], False
        return shard

    def per_utterance(self, local: np.ndarray) -> np.ndarray:
        """[..., local utterances] -> [..., all utterances], summed over ranks."""
        full = np.zeros(local.shape[:-1] + (self.num_utterances,), dtype=local.dtype)
        full[..., self.rows] = local
        return all_reduce_sum(full) if self.reduce else full

    def per_batch(self, local: Sequence[float]) -> list[float]:
        """One float64 per local batch -> one per batch of the whole set, summed over ranks."""
        full = np.zeros(self.num_batches, dtype=np.float64)
        full[self.positions] = np.asarray(local, dtype=np.float64)
        return [float(v) for v in (all_reduce_sum(full) if self.reduce else full)]
