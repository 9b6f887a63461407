"""The ``fastddpm`` command line: ``fastddpm <command> --help``.

Each command lives in its own module, which provides ``configure_parser(parser)`` and
``run(args) -> int``; modules import only when their command runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# command -> (module, one-line help)
COMMANDS = {
    "sample": ("fastddpm.commands.sample", "draw samples from a checkpoint (default: the shipped digits model)"),
    "train": ("fastddpm.commands.train", "train a model with L_simple (or the hybrid loss)"),
    "eval": ("fastddpm.commands.eval", "bits/dim bound and sample-quality metrics of a checkpoint"),
    "merge": ("fastddpm.commands.merge", "join the chunks of a finished sample --out DIR run into one .npz and a grid"),
    "demo": ("fastddpm.commands.demo", "run the per-step kernels (or their CPU reference) on random data"),
}


def build_parser(load_commands: Sequence[str] = tuple(COMMANDS)) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastddpm", description="DDPM training and sampling with fused Triton kernels")
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.import_module('fastddpm').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name in load_commands:
            importlib.import_module(module).configure_parser(command_parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command. Its own input errors it reports itself; here, for every command alike:
    SIGINT / SIGTERM (exit 130 / 143), an output that cannot be written and NaN / infinite
    values (exit 1), each as one line on stderr."""
    from fastddpm.interrupts import Interrupted, signals_raise
    from fastddpm.outputs import NonFiniteError, OutputError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(load_commands=(command,) if command else ())
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    prefix = f"fastddpm {args.command}"
    try:
        with signals_raise():
            return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except KeyboardInterrupt as stop:
        stop = stop if isinstance(stop, Interrupted) else Interrupted()
        print(f"{prefix}: interrupted by {stop.signal_name}" + (f"; {stop.detail}" if stop.detail else ""),
              file=sys.stderr)
        return stop.exit_code
    except (OutputError, NonFiniteError) as error:
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
