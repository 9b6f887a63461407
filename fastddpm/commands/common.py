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


# ---------------------------------------------------------------------------------------------
# how the model runs: the flags sample and eval share (fastddpm.acceleration)
# ---------------------------------------------------------------------------------------------
def add_model_arguments(parser) -> None:
    """``--dtype``, ``--channels-last`` and ``--compile``."""
    from fastddpm.acceleration import MODEL_DTYPES

    parser.add_argument("--dtype", choices=tuple(MODEL_DTYPES), default=None,
                        help="precision of the model's forward pass (a cast copy of the model); the sampler's state "
                             "and the noise stay float32 (default: the checkpoint's, float32)")
    parser.add_argument("--channels-last", action="store_true",
                        help="run the model in channels-last memory layout (faster convolutions on most GPUs)")
    parser.add_argument("--compile", action="store_true",
                        help="run the model through torch.compile (compiled once, inside the CUDA graph; the first "
                             "batch pays the compile time)")


def model_options_of(args):
    """The :class:`fastddpm.acceleration.ModelOptions` the flags of :func:`add_model_arguments` ask for."""
    from fastddpm.acceleration import ModelOptions

    return ModelOptions.build(args.dtype, args.channels_last, args.compile)


def model_dtype_name(options, model) -> str:
    """The model's precision under ``options`` as the command line names it (fp32, bf16, fp16)."""
    from fastddpm.acceleration import MODEL_DTYPES

    dtype = options.dtype
    if dtype is None:
        parameter = next((p for p in model.parameters() if p.is_floating_point()), None) \
            if isinstance(model, torch.nn.Module) else None
        dtype = parameter.dtype if parameter is not None else torch.float32
    return next((name for name, value in MODEL_DTYPES.items() if value == dtype), str(dtype).replace("torch.", ""))
