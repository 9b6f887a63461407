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
from pathlib import Path

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import NoiseSchedule, ops
from fastddpm.checkpoint import CheckpointError, Pretrained, load_checkpoint, save_checkpoint
from fastddpm.cli import COMMANDS, build_parser, main
from fastddpm.data import Dataset
from fastddpm.outputs import NonFiniteError, OutputError, atomic_write, check_writable
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
        # on the device the command picked, as the real loader puts it (cuda on a GPU host)
        return Pretrained(model=(model or _Conv()).to(device).eval(), schedule=schedule or NoiseSchedule.linear(10),
                          sample_shape=(1, 4, 4), config={"data": {"name": "digits"}}, source="fake.safetensors")

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
# 2. outputs: checked before the work, written atomically, kept elsewhere on a failed write
# ---------------------------------------------------------------------------------------------
def test_sample_out_under_a_file_fails_before_loading_anything(monkeypatch, tmp_path, capsys):
    calls = _fake_checkpoint(monkeypatch)
    (tmp_path / "afile").write_text("")
    assert main(["sample", "--out", str(tmp_path / "afile" / "x.png"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert calls == [] and "Traceback" not in err
    assert err.startswith("fastddpm sample: error: --out") and "is a file, not a folder" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(IS_ROOT, reason="root writes into read-only folders")
def test_sample_into_a_read_only_folder_fails_before_loading_anything(monkeypatch, tmp_path, capsys):
    calls = _fake_checkpoint(monkeypatch)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["sample", "--out", str(folder / "x.png"), "--no-progress"]) == 1
    finally:
        folder.chmod(0o755)
    assert calls == [] and "cannot write there" in capsys.readouterr().err


def test_sample_on_a_full_disk_keeps_the_samples_and_says_where(monkeypatch, tmp_path, capsys):
    _fake_checkpoint(monkeypatch)
    out, rescue = tmp_path / "out", tmp_path / "rescue"
    out.mkdir()
    rescue.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(rescue))
    monkeypatch.setattr(np, "savez", _disk_full_in(out, np.savez))
    assert main(["sample", "--out", str(out / "s.png"), "--num-samples", "3", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    kept = re.search(r"kept the samples in (\S+) instead", err)
    assert kept, err
    samples = np.load(kept.group(1))["samples"]
    assert samples.shape == (3, 1, 4, 4) and np.isfinite(samples).all()
    assert list(out.iterdir()) == []  # no partial .npz, no temporary file, no grid


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def fails(temporary):
        Path(temporary).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "full")

    with pytest.raises(OSError):
        atomic_write(target, fails)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_check_writable_names_the_argument(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match=r"^--json .*is a file, not a folder"):
        check_writable(tmp_path / "f" / "r.json", "--json")
    with pytest.raises(OutputError, match=r"^out .*is a file; expected a folder"):
        check_writable(tmp_path / "f", "out", folder=True)
    # The probe goes to the nearest existing folder; missing folders are left to the write itself
    # (a command that fails before writing leaves no empty folders: issue 25).
    before = sorted(p.name for p in tmp_path.iterdir())
    assert check_writable(tmp_path / "new" / "deeper", "out", folder=True) == tmp_path / "new" / "deeper"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created, the probe is gone


def test_train_checkpoint_write_failure_keeps_the_checkpoint_elsewhere(monkeypatch, tmp_path):
    import safetensors.torch

    run, rescue = tmp_path / "run", tmp_path / "rescue"
    rescue.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(rescue))
    monkeypatch.setattr(safetensors.torch, "save_file", _disk_full_in(run, safetensors.torch.save_file, 1))
    with pytest.raises(OutputError, match="No space left") as caught:
        train("digits", "digits", steps=2, batch_size=4, model_overrides=TINY, out=run, **QUIET)
    kept = re.search(r"kept the checkpoint of step 2 in (\S+) instead", str(caught.value))
    assert kept, str(caught.value)
    assert load_checkpoint(kept.group(1)).step == 2
    assert not (run / "checkpoint.safetensors").exists() and not list(run.glob(".*.tmp"))


def test_train_out_under_a_file_fails_before_loading_data(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("fastddpm.training.load_dataset", lambda *a, **k: pytest.fail("loaded data"))
    (tmp_path / "afile").write_text("")
    assert main(["train", "--out", str(tmp_path / "afile" / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastddpm train: error: --out") and "Traceback" not in err


def test_eval_json_and_classifier_cache_are_checked_before_sampling(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(fastddpm, "sample", lambda *a, **k: pytest.fail("sampled"))
    _fake_checkpoint(monkeypatch)
    (tmp_path / "afile").write_text("")
    assert main(["eval", "--json", str(tmp_path / "afile" / "r.json")]) == 1
    assert "--json" in capsys.readouterr().err
    assert main(["eval", "--classifier-cache", str(tmp_path / "afile" / "cache"), "--num-samples", "2",
                 "--no-bound"]) == 1
    assert "--classifier-cache" in capsys.readouterr().err


def test_an_unwritable_classifier_cache_warns_and_keeps_the_classifier(monkeypatch, tmp_path):
    import fastddpm.metrics as metrics

    trained = torch.nn.Linear(1, 1)
    monkeypatch.setattr(metrics, "train_digit_classifier", lambda *a, **k: trained)
    monkeypatch.setattr(torch, "save", _disk_full_in(tmp_path, torch.save, 1))
    images, labels = torch.zeros(4, 1, 8, 8), torch.arange(4)
    with pytest.warns(RuntimeWarning, match="could not cache"):
        assert metrics.load_digit_classifier(tmp_path, images=images, labels=labels) is trained
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 3. interrupts (fresh subprocesses)
# ---------------------------------------------------------------------------------------------
def _start(args, cwd, **env):
    environment = dict(os.environ, OMP_NUM_THREADS="1", **env)
    environment.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, "-m", "fastddpm", *args], cwd=cwd, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(process, pattern, timeout=120):
    """Read stderr until ``pattern`` matches (the command is working); returns what was read."""
    seen = ""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, seen):
        char = process.stderr.read(1)
        if not char or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"never printed {pattern!r}: {seen[-2000:]}")
        seen += char
    return seen


def test_signals_stop_train_with_a_saved_checkpoint_and_sample_with_one_line(tmp_path):
    train_args = ["train", "--train-steps", "100000", "--batch-size", "4", "--sample-every", "0", *TINY_ARGS]
    runs = {
        "sigint": (_start([*train_args, "--out", "int"], tmp_path), signal.SIGINT, 130),
        "sigterm": (_start([*train_args, "--out", "term"], tmp_path), signal.SIGTERM, 143),
        # On the CPU: a GPU draws these 512 samples before the signal arrives.
        "sample": (_start(["sample", "--num-samples", "512", "--out", "s.png", "--device", "cpu"], tmp_path),
                   signal.SIGINT, 130),
    }
    for name, (process, signum, _) in runs.items():
        _wait_for(process, r"\| [1-9]\d*/\d+ ")  # the progress bar has counted a finished step
        process.send_signal(signum)
    for name, (process, signum, code) in runs.items():
        _, err = process.communicate(timeout=120)
        assert process.returncode == code, (name, err[-2000:])
        assert "Traceback" not in err
        last = err.replace("\r", "\n").strip().splitlines()[-1]
        command = "sample" if name == "sample" else "train"
        assert last.startswith(f"fastddpm {command}: interrupted by {signal.Signals(signum).name}; "), last
    assert "nothing written" in last and not list(tmp_path.glob("s.*"))
    for folder in ("int", "term"):
        step = load_checkpoint(tmp_path / folder / "checkpoint.safetensors").step
        assert step >= 1
        assert fastddpm.load_pretrained(tmp_path / folder / "checkpoint.safetensors").step == step


def test_deferred_interrupts_record_the_first_signal_and_a_second_ctrl_c_stops_at_once():
    script = """
import os, signal
from fastddpm.interrupts import DeferredInterrupts, Interrupted
import time
with DeferredInterrupts() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)   # torchrun's follow-up: only noted
    os.kill(os.getpid(), signal.SIGINT)    # the same Ctrl-C passed on by torchrun: only noted
    print("first", stop.signum)
    time.sleep(1.1)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again
    except Interrupted as error:
        print("second", error.exit_code)
print("restored", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
"""
    # The child starts with SIGINT at its default, as under a terminal: a shell's background job
    # (`pytest &`, nohup) inherits SIGINT ignored, and Python then installs no handler to restore.
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.stdout.split() == ["first", "2", "second", "130", "restored", "True"], done.stderr


# ---------------------------------------------------------------------------------------------
# 4. NaN is refused, never written
# ---------------------------------------------------------------------------------------------
def _beta_one_schedule():
    betas = torch.linspace(1e-4, 0.02, 10, dtype=torch.float64)
    betas[-1] = 1.0
    return NoiseSchedule(betas)


def test_a_beta_of_one_is_refused_where_it_makes_a_step_undefined():
    schedule = _beta_one_schedule()
    model = _Conv()
    with pytest.raises(ValueError, match=r"^schedule: beta = 1 at index 9 .*prediction_type='epsilon'"):
        fastddpm.sample(model, (2, 1, 4, 4), schedule=schedule, seed=0, progress=False, sampler="ddpm")
    assert model.calls == 0
    with pytest.raises(ValueError, match="beta = 1"):
        ops.ddpm_step(torch.zeros(2, 1, 4), 3, torch.zeros(2, 1, 4), schedule, seed=0)
    with pytest.raises(ValueError, match="beta = 1"):
        train("digits", "digits", schedule=schedule, steps=1, **QUIET)
    # With v or x_0 prediction alpha_bar = 0 is well defined (zero terminal SNR): allowed, finite.
    x = fastddpm.sample(model, (2, 1, 4, 4), schedule=schedule, prediction_type="v_prediction", seed=0,
                        progress=False, sampler="ddpm")
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_nan_from_the_model_names_the_step_and_stops_early(backend):
    if backend == "interpret":
        pytest.importorskip("triton")
        if HAS_CUDA:
            pytest.skip("the interpreter runs on CPU tensors")
    # NaN from trained timestep 180 down: step 1 of 100 over T=200 sees t=199, ... step 11 sees t=179.
    schedule = NoiseSchedule.linear(200)
    model = _Conv(nan_below=180)
    with pytest.raises(NonFiniteError, match=r"samples contain NaN.*first at step 11 of 100 \(model timestep 1"):
        fastddpm.sample(model, (2, 1, 4, 4), schedule=schedule, num_steps=100, seed=0, progress=False,
                        backend=backend, sampler="ddpm")
    assert model.calls == 50  # the check every 50 steps ended the run half way


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_nan_is_caught_inside_a_real_cuda_graph():
    class Poisoned(torch.nn.Module):  # device ops only, so the call can be captured
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x, t):
            return self.conv(x) * torch.where(t < 180, float("nan"), 1.0).to(x.dtype).reshape(-1, 1, 1, 1)

    with pytest.raises(NonFiniteError, match=r"first at step 11 of 100 \(model timestep 179\)"):
        fastddpm.sample(Poisoned().cuda(), (2, 3, 8, 8), schedule=NoiseSchedule.linear(200), num_steps=100, seed=0,
                        progress=False, cuda_graph=True, sampler="ddpm")


def test_sample_command_refuses_nan_and_writes_nothing(monkeypatch, tmp_path, capsys):
    _fake_checkpoint(monkeypatch, model=_Conv(nan_below=5))
    assert main(["sample", "--out", str(tmp_path / "s.png"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastddpm sample: error: samples contain NaN") and "step 6 of 10 (model timestep 4)" in err
    assert list(tmp_path.iterdir()) == []


def test_eval_says_samples_contain_nan(monkeypatch, tmp_path, capsys):
    _fake_checkpoint(monkeypatch, model=_Conv(nan_below=5))
    assert main(["eval", "--num-samples", "4", "--no-bound", "--classifier-cache", str(tmp_path)]) == 1
    assert "samples contain NaN" in capsys.readouterr().err
    from fastddpm.evaluation import evaluate_digit_samples

    with pytest.raises(NonFiniteError, match="samples contain NaN"):
        evaluate_digit_samples(torch.full((4, 1, 8, 8), float("nan")), classifier=object())


def test_nan_weights_are_neither_written_nor_loaded(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    model = _Conv()
    config = {"model": {}, "diffusion": {}, "sample_shape": [1, 4, 4]}
    path = save_checkpoint(tmp_path / "ok.safetensors", config=config, schedule=NoiseSchedule.linear(10), ema=model)
    with torch.no_grad():
        model.conv.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="conv.weight"):
        save_checkpoint(tmp_path / "nan.safetensors", config=config, schedule=NoiseSchedule.linear(10), ema=model)
    assert not (tmp_path / "nan.safetensors").exists()
    # A NaN file made by other means is refused on loading.
    tensors = load_file(path)
    tensors["ema.conv.weight"] = torch.full_like(tensors["ema.conv.weight"], float("nan"))
    with safe_open(path, framework="pt") as reader:
        metadata = reader.metadata()
    save_file(tensors, tmp_path / "nan.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match="conv.weight.*NaN"):
        load_checkpoint(tmp_path / "nan.safetensors", ema=_Conv())


def test_a_nan_loss_stops_training_without_writing(tmp_path):
    data = Dataset(torch.full((8, 1, 8, 8), float("nan")), "nan")
    with pytest.raises(NonFiniteError, match="loss became NaN or infinite at step 1;"):
        train("digits", data, steps=3, batch_size=4, model_overrides=TINY, out=tmp_path / "run", **QUIET)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# 5. devices and demo arguments: one line, no traceback
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["demo", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["demo", "--size", "-1"], "--size must be >= 1"),
    (["demo", "--device", "meta"], "--device 'meta'"),
    (["train", "--device", "meta", "--train-steps", "1"], "--device 'meta'"),
    (["eval", "--device", "meta"], "--device 'meta'"),
    (["sample", "--device", "meta"], "--device 'meta'"),
] + ([] if HAS_CUDA else [
    (["train", "--device", "cuda", "--train-steps", "1"], "CUDA is not available"),
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
        fastddpm.sample(_Conv(), (1, 1, 2, 2), device="meta", progress=False, sampler="ddpm")
    with pytest.raises(ValueError, match="^device 'meta'"):
        train("digits", "digits", device="meta", steps=1, **QUIET)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="^device 'cuda': CUDA is not available"):
            fastddpm.load_pretrained(device="cuda")


# ---------------------------------------------------------------------------------------------
# 6. silent surprises
# ---------------------------------------------------------------------------------------------
def test_resume_says_where_it_starts(tmp_path, capsys):
    # a constant learning rate: a run with a decaying one resumes only with its own step count
    args = ["train", "--train-steps", "1", "--batch-size", "4", "--out", str(tmp_path), "--resume", "--no-progress",
            "--sample-every", "0", "--lr-schedule", "constant", *TINY_ARGS]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"note: no checkpoint.safetensors in {str(tmp_path)!r} to resume from; starting at step 0" in err
    args[2] = "2"
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"resuming from {str(tmp_path / 'checkpoint.safetensors')!r} at step 1" in err and "note:" not in err
    assert load_checkpoint(tmp_path / "checkpoint.safetensors").step == 2


@pytest.mark.parametrize("array,message", [
    (np.zeros((4, 1, 32, 32), np.float32), r"32x32 images but preset 'digits' is for 8x8.*--image-size 8"),
    (np.zeros((4, 2, 8, 8), np.float32), r"2-channel images but preset 'digits' takes 1.*in_channels=2"),
    (np.arange(10, dtype=np.float32), r"must have shape \[N, D\].*got \(10,\)"),
])
def test_arrays_that_do_not_fit_the_preset_are_refused(array, message, tmp_path):
    np.save(tmp_path / "a.npy", array)
    with pytest.raises(ValueError, match=message):
        train("digits", tmp_path / "a.npy", steps=1, **QUIET)


def test_noise_and_seed_together_and_an_empty_batch_are_refused():
    schedule = NoiseSchedule.linear(10)
    x = torch.zeros(2, 1, 4)
    with pytest.raises(ValueError, match="noise or seed, not both"):
        ops.q_sample(x, 3, schedule, noise=torch.ones_like(x), seed=5)
    with pytest.raises(ValueError, match="noise or seed, not both"):
        ops.ddpm_step(x, 3, x, schedule, noise=torch.ones_like(x), seed=5)
    empty = torch.zeros(0, 1, 4)
    with pytest.raises(ValueError, match=r"^x0 must have shape \[B, \.\.\.\] with a batch of B >= 1"):
        ops.q_sample(empty, torch.zeros(0, dtype=torch.int64), schedule, seed=0)
    with pytest.raises(ValueError, match=r"^x_t must have shape \[B, \.\.\.\] with a batch of B >= 1"):
        ops.ddpm_step(empty, torch.zeros(0, dtype=torch.int64), empty, schedule, seed=0)
    with pytest.raises(ValueError, match="positive ints"):
        fastddpm.sample(_Conv(), (0, 1, 4, 4), progress=False, sampler="ddpm")


# ---------------------------------------------------------------------------------------------
# 7. small things
# ---------------------------------------------------------------------------------------------
def test_one_progress_flag_everywhere_and_eval_shows_progress_by_default():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("sample", "train", "eval"):
        options = {option for action in commands[name]._actions for option in action.option_strings}
        assert "--no-progress" in options and "--progress" not in options, name
    assert commands["eval"].parse_args([]).progress is True
    assert set(COMMANDS) == {"sample", "train", "eval", "merge", "demo"}


def test_train_help_shows_the_preset_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key in ("steps", "batch_size", "lr", "warmup_steps", "lr_schedule", "ema_decay", "ema_start", "ckpt_every",
                "sample_every"):
        for preset, defaults in TRAINING_DEFAULTS.items():
            assert f"{preset} {defaults[key]}" in text, (key, preset)


def test_readme_scheduler_swap_snippet_runs_as_written():
    pytest.importorskip("diffusers")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Swapping the scheduler", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    x = namespace["x"]
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all() and x.std() > 0


def test_unet_gradients_keep_the_weights_layout():
    """DDP warns "grad strides do not match bucket view strides" when they differ."""
    model = fastddpm.create_model("digits")
    model(torch.randn(32, 1, 8, 8), torch.arange(32)).square().mean().backward()
    mismatched = [name for name, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]
    assert mismatched == []
