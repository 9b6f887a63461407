"""What several commands share: reading ``--checkpoint``."""
from __future__ import annotations

import argparse
import re
import sys
from typing import Optional

import torch


# Bad command input (arguments, a checkpoint or folder that does not fit): one line and this exit
# code in every command, argparse's own for its errors. A failure of the work itself (an output
# that cannot be written, NaN) exits 1 (fastddpm.cli).
BAD_INPUT_EXIT = 2


class CommandError(ValueError):
    """A problem with a command's input, reported as one line and :data:`BAD_INPUT_EXIT`."""


def report_bad_input(command: str, error: BaseException) -> int:
    print(f"fastddpm {command}: error: {error}", file=sys.stderr)
    return BAD_INPUT_EXIT


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
    from fastddpm.acceleration import MODEL_DTYPES, model_dtype

    dtype = options.dtype or model_dtype(model) or torch.float32
    return next((name for name, value in MODEL_DTYPES.items() if value == dtype), str(dtype).replace("torch.", ""))


# ---------------------------------------------------------------------------------------------
# one vocabulary of flags for every command
# ---------------------------------------------------------------------------------------------
DEVICE_HELP = "auto (cuda when available, the default), cpu, cuda, cuda:1, ..."


def add_device_argument(parser, extra: str = "") -> None:
    """``--device``, with the same help in every command."""
    parser.add_argument("--device", default="auto", help=DEVICE_HELP + (f"; {extra}" if extra else ""))


class _DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: stores into the new one's destination and says which to use."""

    def __init__(self, option_strings, dest, replacement: str = "", **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated; use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser, old: str, new: str, dest: str, **kwargs) -> None:
    """``old`` as a hidden, deprecated spelling of ``new`` (same destination, a note when used)."""
    parser.add_argument(old, dest=dest, action=_DeprecatedAlias, replacement=new, help=argparse.SUPPRESS, **kwargs)


def flag_names(parser) -> dict:
    """Destination -> the flag that sets it (its first long option), for messages in flag terms."""
    names = {}
    for action in parser._actions:
        longs = [option for option in action.option_strings if option.startswith("--")]
        if longs and action.help is not argparse.SUPPRESS and action.dest not in names:
            names[action.dest] = longs[0]
    return names


def in_flag_terms(message: str, names: dict) -> str:
    """A library error (``steps must be ...``, ``out 'x': ...``) as the command line says it:
    a leading argument name becomes its flag (``--train-steps must be ...``)."""
    match = re.match(r"([a-z_]+)(\b.*)", message, flags=re.S)
    if match and match.group(1) in names:
        return names[match.group(1)] + match.group(2)
    return message
