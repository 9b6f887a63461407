"""The one check of a ``device`` argument: it must name a device this machine has."""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["resolve_device"]


def resolve_device(device: Optional[Union[str, torch.device]], *, argument: str = "device") -> torch.device:
    """``device`` as a :class:`torch.device`, or a one-line ``ValueError`` naming ``argument``.

    ``None`` or ``"auto"``: ``cuda`` when CUDA is available, else ``cpu``. Refused: names torch
    cannot parse, CUDA on a machine (or a torch build) without it, a CUDA index beyond the
    devices present, ``meta`` (its tensors hold no data to sample or train with), and any other
    device type that cannot hold a tensor here.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"{argument} must be a device name such as cpu, cuda or cuda:1, got {type(device).__name__}")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{argument} must be auto, cpu, cuda or cuda:N, got {str(device)!r}") from None
    name = str(device)
    if resolved.type == "meta":
        raise ValueError(f"{argument} {name!r}: meta tensors hold no data; use cpu or cuda")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"{argument} {name!r}: CUDA is not available on this machine ({build}); use cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"{argument} {name!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif resolved.type != "cpu":
        try:
            torch.empty(0, device=resolved)
        except (RuntimeError, AssertionError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"{argument} {name!r} is not usable on this machine ({reason})") from None
    return resolved
