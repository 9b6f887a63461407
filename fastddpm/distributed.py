"""Processes started by ``torchrun``: the process group and each rank's device, for every command.

Only ``torch.distributed`` is used (no launcher of fastddpm's own), so ``torchrun`` on one node or
on many works alike: ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` come from it.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch

__all__ = ["setup"]


def setup(device: Optional[Union[str, torch.device]]) -> Tuple[int, int, torch.device, bool]:
    """``(rank, world_size, device, created_group)``. Under ``torchrun`` (``WORLD_SIZE > 1``) starts
    the process group (NCCL for CUDA devices, gloo otherwise) unless one exists. ``device=None``
    is ``cuda:LOCAL_RANK`` where CUDA is available, else the CPU; a ``cuda`` device without an
    index is ``cuda:LOCAL_RANK`` too. Call :func:`torch.distributed.destroy_process_group` at the end
    when ``created_group`` is true."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    created = False
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
    elif world_size > 1:
        backend = "nccl" if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda") else "gloo"
        dist.init_process_group(backend=backend)
        created = True
    rank = dist.get_rank() if world_size > 1 else 0
    local_cuda = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else None
    if device is None:
        device = torch.device("cuda", local_cuda if local_cuda is not None else torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_cuda if local_cuda is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return rank, world_size, device, created
