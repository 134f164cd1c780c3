"""Data-parallel training over processes started by torchrun: the rank, the process group, each rank's
shard of the global batch, and the collectives the I-JEPA trainer needs. One process: all no-ops."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
from torch import nn


def _map_masks(m, fn):
    """Apply ``fn`` to every tensor field of a MaskBatch (all are batch-leading)."""
    return dataclasses.replace(m, **{f.name: fn(getattr(m, f.name)) for f in dataclasses.fields(m)
                                     if isinstance(getattr(m, f.name), torch.Tensor)})


class DataParallel:
    """The process's place in a data-parallel run: ``rank``, ``world_size``, ``device`` (``cuda:LOCAL_RANK``
    on CUDA), ``is_main``. Joins (and on :meth:`close` leaves) the process group when torchrun started
    several processes and none is initialised yet; ``batch_size`` must split evenly across them."""

    def __init__(self, device: torch.device, batch_size: int):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        self.device, self.is_main, self._own_group = device, self.rank == 0, False
        if self.world_size == 1:
            return
        import torch.distributed as dist

        if device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self._own_group = True
        if batch_size % self.world_size:
            raise ValueError(f"TrainConfig.batch_size must be divisible by the world size {self.world_size}, "
                             f"got {batch_size}")

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DistributedDataParallel (itself in one process)."""
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def shard(self, images: torch.Tensor, masks) -> tuple[torch.Tensor, object, Optional[torch.Tensor]]:
        """This rank's rows of the global batch and its masks, and the valid target tokens of the whole
        global batch (None in one process)."""
        if self.world_size == 1:
            return images, masks, None
        per = images.shape[0] // self.world_size
        lo, hi = self.rank * per, (self.rank + 1) * per
        return images[lo:hi], _map_masks(masks, lambda t: t[lo:hi]), masks.target_valid.sum()

    def all_reduce(self, t: torch.Tensor) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self._own_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._own_group = False
