"""Nothing lost, no raw tracebacks (issue 15): outputs, interrupts, NaN, devices, surprises.

Each test here failed before its fix; docs/reliability.md maps every fault to its test.
Signals are sent to fresh subprocesses, never to the pytest process.
"""
import errno
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import NoiseSchedule, ops
from fastddpm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastddpm.cli import COMMANDS, build_parser, main
from fastddpm.data import Dataset
from fastddpm.training import TRAINING_DEFAULTS, train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
TINY_ARGS = ["--model-arg", "ch=16", "--model-arg", "ch_mult=[1,2]", "--model-arg", "num_res_blocks=1"]
QUIET = dict(progress=False, sample_every=0, log_every=1)
HAS_CUDA = torch.cuda.is_available()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


class _Conv(torch.nn.Module):
    """A stand-in model: one 1x1 convolution, time ignored; ``nan_below`` poisons small t."""

    def __init__(self, channels=1, nan_below=None):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1)
        self.nan_below = nan_below
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        out = self.conv(x)
        if self.nan_below is not None and int(t[0]) < self.nan_below:
            out = out * float("nan")
        return out


def _fake_checkpoint(monkeypatch, model=None, schedule=None):
    """``fastddpm sample`` / ``eval`` load this model instead of a real checkpoint; returns a call log."""
    calls = []

    def load_pretrained(path=None, *, device="cpu"):
        calls.append(path)
        return types.SimpleNamespace(model=(model or _Conv()).eval(), schedule=schedule or NoiseSchedule.linear(10),
                                     sample_shape=(1, 4, 4), prediction_type="epsilon", variance_type="fixed_small",
                                     config={"data": {"name": "digits"}}, path=Path("fake.safetensors"))

    monkeypatch.setattr("fastddpm.checkpoint.load_pretrained", load_pretrained)
    return calls


def _disk_full_in(folder, real_writer, file_arg=0):
    """A file writer (``np.savez``, ``torch.save``, safetensors' ``save_file``; its file object
    or file name is positional argument ``file_arg``) on a disk that is full in ``folder``: there
    it writes a few bytes and fails with ENOSPC, as a real full disk does; elsewhere it writes."""

    def writer(*args, **kwargs):
        file = args[file_arg]
        name = Path(file.name if hasattr(file, "write") else os.fspath(file))
        if name.parent != Path(folder):
            return real_writer(*args, **kwargs)
        if hasattr(file, "write"):
            file.write(b"PK\x03\x04 partial")
        else:
            name.write_bytes(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return writer


# ---------------------------------------------------------------------------------------------
# 5. devices and demo arguments: one line, no traceback
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["demo", "--batch", "0"], "--batch must be >= 1"),
    (["demo", "--size", "-1"], "--size must be >= 1"),
    (["demo", "--device", "meta"], "--device 'meta'"),
    (["train", "--device", "meta", "--steps", "1"], "--device 'meta'"),
    (["eval", "--device", "meta"], "--device 'meta'"),
    (["sample", "--device", "meta"], "--device 'meta'"),
] + ([] if HAS_CUDA else [
    (["train", "--device", "cuda", "--steps", "1"], "CUDA is not available"),
    (["demo", "--device", "cuda"], "CUDA is not available"),
    (["eval", "--device", "cuda"], "CUDA is not available"),
]))
def test_bad_devices_and_sizes_get_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, *(["--no-progress"] if argv[0] in ("sample", "train") else [])]) in (1, 2)
    err = capsys.readouterr().err
    assert err.startswith(f"fastddpm {argv[0]}: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_library_device_arguments_are_checked():
    with pytest.raises(ValueError, match="^device 'meta'"):
        fastddpm.load_pretrained(device="meta")
    with pytest.raises(ValueError, match="^device 'meta'"):
        fastddpm.sample(_Conv(), (1, 1, 2, 2), device="meta", progress=False)
    with pytest.raises(ValueError, match="^device 'meta'"):
        train("digits", "digits", device="meta", steps=1, **QUIET)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="^device 'cuda': CUDA is not available"):
            fastddpm.load_pretrained(device="cuda")
