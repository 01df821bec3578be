"""Small helpers over ``torch.distributed`` for runs started by ``torchrun`` (or one plain process).

``init_distributed`` reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and returns a ``DistributedEnv`` that the caller passes on explicitly (to the loss, the
task, the trainer). Nothing here keeps state of its own: the only state is the process group that
``torch.distributed`` itself holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# torchrun sets all of these; init_method="env://" reads them.
_REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedEnv:
    rank: int = 0  # global rank of this process, 0 .. world_size - 1
    local_rank: int = 0  # rank on this node; picks the GPU
    world_size: int = 1  # number of processes; 1 = a plain single process
    backend: str | None = None  # "gloo" / "nccl", or None when no process group was created

    @property
    def distributed(self) -> bool:
        """True when a process group of more than one process is in use."""
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        """This process's device: its own GPU under NCCL, otherwise the CPU (or the only GPU)."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        if self.backend is None and torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")


def default_backend() -> str:
    """NCCL when CUDA is available, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout: timedelta | None = None) -> DistributedEnv:
    """Join the process group described by torchrun's environment variables.

    Without RANK / WORLD_SIZE in the environment (a plain ``python`` run) nothing is initialised and
    a single-process ``DistributedEnv`` (rank 0, world_size 1) comes back. If a process group already
    exists (e.g. a test created it), its rank and size are returned and nothing is re-initialised.
    """
    if dist.is_available() and dist.is_initialized():
        return DistributedEnv(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                              world_size=dist.get_world_size(), backend=dist.get_backend())
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return DistributedEnv()
    missing = [name for name in _REQUIRED_ENV if name not in os.environ]
    if missing:
        raise ValueError(f"incomplete distributed environment: {', '.join(missing)} not set "
                         "(start the run with torchrun, which sets them)")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = backend or default_backend()
    if backend == "nccl":
        # NCCL needs each process on its own GPU before the first collective.
        torch.cuda.set_device(local_rank)
    kwargs = {} if timeout is None else {"timeout": timeout}
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size, **kwargs)
    else:
        # After a torchrun restart (--max-restarts) the store still holds the previous attempt's process-group
        # keys, each rank's old address among them: a rank that starts first reads its peer's dead address and
        # gives up ("Gloo connectFullMesh failed ... Connection refused"; pytorch/pytorch#167288). A key prefix
        # per attempt keeps every attempt's rendezvous to itself.
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts it
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=rank == 0 and not agent_store, timeout=timeout or timedelta(minutes=30))
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"vlpt/attempt_{attempt}", store),
                                rank=rank, world_size=world_size, **kwargs)
    return DistributedEnv(rank=rank, local_rank=local_rank, world_size=world_size, backend=backend)


def is_main(env: DistributedEnv) -> bool:
    """Rank 0: the process that logs, writes checkpoints and reports."""
    return env.rank == 0


def barrier(env: DistributedEnv) -> None:
    """Wait for every rank; a no-op in a single process."""
    if env.backend is None or not dist.is_initialized():
        return
    if env.backend == "nccl":
        dist.barrier(device_ids=[env.local_rank])  # avoids NCCL guessing the device
    else:
        dist.barrier()


def cleanup(env: DistributedEnv) -> None:
    """Leave the process group (if this env created or joined one)."""
    if env.backend is not None and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's ``x`` (same shape on all ranks) concatenated along dim 0, in rank order; gradients flow
    back to each rank's own rows (summed over the ranks that used them). ``x`` itself in one process."""
    if world_size == 1:
        return x
    import torch.distributed.nn.functional as dist_fn  # not in every torch build; only multi-process runs need it

    return torch.cat(dist_fn.all_gather(x), dim=0)


@torch.no_grad()
def all_gather_constant(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """``all_gather_with_grad`` for tensors that need no gradient (labels, masks); bools travel as uint8."""
    if world_size == 1:
        return x
    payload = x.to(torch.uint8) if x.dtype == torch.bool else x
    parts = [torch.empty_like(payload) for _ in range(world_size)]
    dist.all_gather(parts, payload.contiguous())
    out = torch.cat(parts, dim=0)
    return out.bool() if x.dtype == torch.bool else out
