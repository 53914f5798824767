"""Data-parallel training over ``torch.distributed`` (``resources.gpus: N > 1``).

Semantics (docs/deploy.md, "Data-parallel jobs"): ``training.batch_size`` B is per process,
and N processes train exactly what one process with batch ``B * N`` would: the training split
is cut into ``B * N`` streams as that run cuts it (:func:`worker.engine.data.batchify`), rank
``r`` trains on rows ``[r * B, (r + 1) * B)`` (:func:`shard_rows`), and
``DistributedDataParallel`` averages the gradients over the ranks, which is the gradient of the
mean loss over all ``B * N * seq_len`` tokens; the reported training loss is the mean over the
ranks (one ``all_reduce`` per step). Rank 0 decides whatever depends on time or on the outside
world (a cancel, a shutdown, ``max_runtime_s``, ``max_duration_s``, ``checkpoint_every_s``),
evaluates the validation split with the unwrapped model and ``B * N`` streams, and broadcasts
what it found (:meth:`DistContext.agree`), so every rank takes the same branch; it alone
reports metrics and writes checkpoints, in the one-process format (the hidden states of all
ranks gathered into ``(num_layers, B * N, hidden_dim)``, the other ranks' generator states as
``rng.rank<r>.*`` tensors).

Control messages (:meth:`DistContext.agree`, the object collectives) go over a gloo group on
the CPU, also when the gradients go over NCCL, so they never wait on a GPU stream.

This module only wraps ``torch.distributed``; starting the processes is the worker's
(:mod:`worker.ddp_rank`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

#: ``agree`` encodes "no value" as NaN.
NONE = float("nan")


@dataclass
class DistContext:
    """This process's place in a data-parallel run: ``rank`` in ``[0, world_size)``, the
    training ``device`` (``cuda:LOCAL_RANK`` or the CPU) and the process group for control
    messages (gloo; the default group on the CPU). Built by :func:`init_distributed`."""

    rank: int
    world_size: int
    device: torch.device
    control: Any = None  # a gloo ProcessGroup, None for the default group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def agree(self, values: list[float]) -> list[float]:
        """Rank 0's ``values`` on every rank (a float64 broadcast over the control group; the
        other ranks' arguments only give the length). NaN stands for "none"."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.broadcast(t, src=0, group=self.control)
        return [float(v) for v in t.tolist()]

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` (a device tensor) over the ranks, on the device (no host sync):
        one ``all_reduce`` over the default group."""
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (picklable; CPU tensors), in rank order, on rank 0; None on the
        others. One ``gather_object`` over the control group."""
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(group=self.control)


def shard_rows(data: torch.Tensor, rank: int, world_size: int, dim: int = 0) -> torch.Tensor:
    """Rank ``rank``'s streams of ``data``, whose dimension ``dim`` holds all ranks' B * N
    streams (the batchified split (B * N, n): ``dim=0``; a hidden state (num_layers, B * N,
    hidden_dim): ``dim=1``): indices ``[rank * B, (rank + 1) * B)``, a view. Raises
    ``ValueError`` when they do not divide evenly."""
    rows = data.size(dim)
    if rows % world_size:
        raise ValueError(f"{rows} streams do not divide into {world_size} ranks")
    b = rows // world_size
    return data.narrow(dim, rank * b, b)


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(rank: int, world_size: int, device: torch.device, store: Any,
                     timeout_s: float) -> DistContext:
    """Join the default process group through ``store`` (a ``torch.distributed.TCPStore``;
    the rendezvous of ``env://`` with the variables ``torchrun`` sets, ``MASTER_ADDR``,
    ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, made by the caller), with the backend of
    ``device`` (:func:`backend_for`) and ``timeout_s`` for every collective; on NCCL also a
    gloo group for control messages. Blocks until all ``world_size`` ranks joined (or
    ``timeout_s``: ``torch.distributed.DistStoreError``)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend_for(device)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                            world_size=world_size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return DistContext(rank, world_size, device, control)


def shutdown_distributed(failed: bool = False) -> None:
    """Leave the default process group (if any), so the process can run another job.
    ``failed``: after a collective failed (a rank died), NCCL's communicators are aborted
    rather than destroyed, since work queued to the dead peer would never finish
    (``torch.distributed``'s ``_abort_process_group``; gloo's are destroyed as usual)."""
    if not dist.is_initialized():
        return
    if failed and dist.get_backend() == "nccl":
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()
        return
    dist.destroy_process_group()
