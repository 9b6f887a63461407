"""What several commands share: reading ``--checkpoint``."""
from __future__ import annotations

from typing import Optional

import torch


def load_checkpoint_argument(checkpoint: Optional[str], device: torch.device):
    """:func:`fastddpm.checkpoint.load_pretrained` of ``--checkpoint`` (None: the shipped model),
    its failures as one ``ValueError`` naming ``--checkpoint``."""
    from fastddpm.checkpoint import load_pretrained

    try:
        return load_pretrained(checkpoint, device=device)
    except FileNotFoundError:
        raise ValueError(f"--checkpoint {checkpoint}: no such file or directory") from None
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        what = "the shipped default checkpoint" if checkpoint is None else f"--checkpoint {checkpoint}"
        raise ValueError(f"could not load {what}: {error}") from error
