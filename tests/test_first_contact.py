"""What a new user trips on (issue 25), each checked in a fresh interpreter where it depends on
what was imported before."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_a_saved_pipeline_loads_after_import_fastddpm_alone(tmp_path, tiny_unet):
    diffusers = pytest.importorskip("diffusers")
    import fastddpm

    for name in ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        pipe = diffusers.DDPMPipeline(unet=tiny_unet, scheduler=getattr(fastddpm, name)())
        pipe.save_pretrained(tmp_path / name)
        assert json.loads((tmp_path / name / "model_index.json").read_text())["scheduler"] == [
            "fastddpm.schedulers", name]
    done = _python(
        "import sys, fastddpm\n"
        "assert 'diffusers' not in sys.modules, 'import fastddpm stays light'\n"
        "import diffusers\n"
        "for name in ('DDPMScheduler', 'DDIMScheduler', 'DPMSolverMultistepScheduler', 'UniPCMultistepScheduler'):\n"
        "    pipe = diffusers.DDPMPipeline.from_pretrained(%r + '/' + name)\n"
        "    any_pipe = diffusers.DiffusionPipeline.from_pretrained(%r + '/' + name)\n"
        "    assert type(pipe.scheduler) is getattr(fastddpm, name), type(pipe.scheduler)\n"
        "    assert type(any_pipe.scheduler).__module__ == 'fastddpm.schedulers'\n"
        "print('loaded')\n" % (str(tmp_path), str(tmp_path)), tmp_path)
    assert "loaded" in done.stdout


def test_a_submodule_of_the_pending_schedulers_package_imports(tmp_path):
    """`import fastddpm.schedulers.unipc` (or `from fastddpm.schedulers.common import ...`) after
    `import fastddpm` alone: the stand-in hands the import system the real package's path."""
    pytest.importorskip("diffusers")
    done = _python(
        "import sys, fastddpm\n"
        "assert 'diffusers' not in sys.modules\n"
        "import fastddpm.schedulers.unipc as unipc\n"
        "from fastddpm.schedulers.common import HOST_DEVICE_TYPES\n"
        "assert unipc.UniPCMultistepScheduler is fastddpm.UniPCMultistepScheduler\n"
        "assert type(sys.modules['fastddpm.schedulers']).__name__ == 'module'\n"
        "print('imported', HOST_DEVICE_TYPES)\n", tmp_path)
    assert "imported" in done.stdout


def test_the_pending_schedulers_module_forwards_writes_to_the_real_one(tmp_path):
    pytest.importorskip("diffusers")
    _python(
        "import sys, fastddpm\n"
        "schedulers = sys.modules['fastddpm.schedulers']\n"  # the stand-in diffusers finds, not imported yet
        "assert type(schedulers).__name__ == '_Pending'\n"
        "marker = object()\n"
        "schedulers._test_marker = marker\n"           # a write (monkeypatch) imports and reaches the real module
        "real = sys.modules['fastddpm.schedulers']\n"
        "assert real._test_marker is marker and schedulers.DDPMScheduler is real.DDPMScheduler\n"
        "del schedulers._test_marker\n"
        "assert not hasattr(real, '_test_marker')\n", tmp_path)


def test_dir_of_fastddpm_lists_the_lazy_names_and_they_resolve(tmp_path):
    done = _python(
        "import fastddpm\n"
        "names = dir(fastddpm)\n"
        "for name in ('sample', 'load_pretrained', 'DDPMScheduler', 'accelerate', 'q_sample'):\n"
        "    assert name in names, name\n"
        "assert all(hasattr(fastddpm, name) for name in fastddpm.__all__)\n"
        "print(len(names))\n", tmp_path)
    assert int(done.stdout) > 20


# ---------------------------------------------------------------------------------------------
# 4. failed commands leave no empty folders
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["train", "--steps", "0", "--out", "{tmp}/a/run"],
    ["train", "--lr", "-1", "--out", "{tmp}/a/run"],
    ["train", "--resume", "/no/such/checkpoint.safetensors", "--out", "{tmp}/a/run"],
    ["sample", "--checkpoint", "/no/such/checkpoint", "--out", "{tmp}/a/run/"],
    ["sample", "--checkpoint", "/no/such/checkpoint", "--out", "{tmp}/a/grid.png"],
    ["eval", "--checkpoint", "/no/such/checkpoint", "--json", "{tmp}/a/report.json"],
])
def test_a_command_that_fails_leaves_no_folder_behind(argv, tmp_path, capsys):
    from fastddpm.cli import main

    assert main([part.format(tmp=tmp_path) for part in argv]) != 0
    assert list(tmp_path.iterdir()) == []


def test_a_sample_folder_whose_run_stops_on_nan_is_removed_but_an_existing_folder_is_kept(tmp_path, monkeypatch,
                                                                                         capsys):
    import torch

    import fastddpm
    from fastddpm.checkpoint import Pretrained
    from fastddpm.cli import main

    class Poisoned(torch.nn.Module):
        def forward(self, x, t):
            return x * float("nan")

    def load(path=None, *, device="cpu"):
        return Pretrained(model=Poisoned(), schedule=fastddpm.NoiseSchedule.linear(10), sample_shape=(1, 4, 4),
                          config={}, source="poisoned")

    monkeypatch.setattr("fastddpm.checkpoint.load_pretrained", load)
    argv = ["sample", "--num-samples", "4", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "new") + "/"]) != 0
    assert "NaN" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    assert main([*argv, "--out", str(tmp_path / "mine")]) != 0
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 5. an earlier run's outputs are not replaced without --overwrite
# ---------------------------------------------------------------------------------------------
def test_samples_of_an_earlier_run_are_not_overwritten_without_being_asked(tmp_path, capsys):
    import numpy as np

    from fastddpm.cli import main

    argv = ["sample", "--num-samples", "4", "--steps", "3", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "x.jpg")]) == 0
    first = np.load(tmp_path / "x.npz")["samples"]
    capsys.readouterr()
    # another image name, the same .npz: refused, the first run's samples kept
    assert main([*argv, "--seed", "1", "--out", str(tmp_path / "x.png")]) != 0
    err = capsys.readouterr().err
    assert "x.npz' already exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert np.array_equal(np.load(tmp_path / "x.npz")["samples"], first) and not (tmp_path / "x.png").exists()
    assert main([*argv, "--seed", "1", "--out", str(tmp_path / "x.png"), "--overwrite"]) == 0
    assert not np.array_equal(np.load(tmp_path / "x.npz")["samples"], first)


def test_an_eval_report_is_not_overwritten_without_being_asked(tmp_path, capsys):
    from fastddpm.cli import main

    report = tmp_path / "report.json"
    report.write_text("{}")
    assert main(["eval", "--num-samples", "0", "--no-bound", "--json", str(report)]) != 0
    assert "already exists" in capsys.readouterr().err and report.read_text() == "{}"


# ---------------------------------------------------------------------------------------------
# 6. a sample count that cannot fit in memory: one line, before any work
# ---------------------------------------------------------------------------------------------
def test_a_sample_count_that_cannot_fit_is_refused_in_one_line_under_a_memory_limit(tmp_path):
    import resource

    def limit():  # an 8 GiB address-space limit, as `ulimit -v` sets
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))

    done = subprocess.run([sys.executable, "-m", "fastddpm", "sample", "--num-samples", "100000000", "--out", "h.png",
                           "--device", "cpu", "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, preexec_fn=limit)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds every sample in memory" in lines[0] and "--out DIR/" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 1. one default sampler, read from the registry everywhere
# ---------------------------------------------------------------------------------------------
def test_the_library_and_every_command_default_to_the_registry_default(tmp_path, capsys):
    import inspect

    import numpy as np
    import torch

    import fastddpm
    from fastddpm.cli import main
    from fastddpm.samplers import DEFAULT_SAMPLER, SAMPLERS, default_steps

    assert inspect.signature(fastddpm.sample).parameters["sampler"].default is None  # None: the registry's
    pretrained = fastddpm.load_pretrained()
    shape = (3, *pretrained.sample_shape)
    by_default = fastddpm.sample(pretrained.model, shape, schedule=pretrained.schedule, seed=0, progress=False)
    explicit = fastddpm.sample(pretrained.model, shape, schedule=pretrained.schedule, seed=0, progress=False,
                               sampler=DEFAULT_SAMPLER, num_steps=default_steps(DEFAULT_SAMPLER, 1000))
    assert torch.equal(by_default, explicit)
    assert main(["sample", "--num-samples", "3", "--out", str(tmp_path / "s.png"), "--device", "cpu",
                 "--no-progress"]) == 0
    data = np.load(tmp_path / "s.npz")
    assert str(data["sampler"]) == DEFAULT_SAMPLER and int(data["num_steps"]) == default_steps(DEFAULT_SAMPLER, 1000)
    np.testing.assert_allclose(data["samples"], by_default.numpy(), atol=1e-6)
    # Every sampler of the registry is named in the docstring and in both commands' --help.
    for name in SAMPLERS:
        assert f'"{name}"' in fastddpm.sample.__doc__, name
    for command in ("sample", "eval"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(name in text for name in SAMPLERS) and f"default {DEFAULT_SAMPLER}" in text, text


# ---------------------------------------------------------------------------------------------
# 7. one vocabulary of flags and messages
# ---------------------------------------------------------------------------------------------
def _command_parsers():
    from fastddpm.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(action for action in parser._actions if action.dest == "command")
    return {name: sub.choices[name] for name in COMMANDS}


def test_every_command_speaks_one_vocabulary_of_flags():
    import argparse

    from fastddpm.commands.common import DEVICE_HELP

    parsers = _command_parsers()
    meanings = {}
    for name, parser in parsers.items():
        visible = [action for action in parser._actions if action.help is not argparse.SUPPRESS]
        for action in visible:
            for option in action.option_strings:
                if option.startswith("--"):
                    assert re.fullmatch(r"--[a-z0-9]+(-[a-z0-9]+)*", option), (name, option)
                    meanings.setdefault(option, set()).add(name)
        options = {option for action in visible for option in action.option_strings}
        assert "--batch" not in options and "--json" not in options, name  # --batch-size, --out
        if name == "train":
            assert "--steps" not in options and "--train-steps" in options  # --steps is a sampling count
        device = next((action for action in visible if "--device" in action.option_strings), None)
        if device is not None:
            assert device.help.startswith(DEVICE_HELP) and device.default == "auto", name
    # the same flag names across commands
    assert {"sample", "train", "eval", "demo"} <= meanings["--device"]
    assert {"sample", "train", "eval", "demo"} <= meanings["--batch-size"]
    assert {"sample", "train", "eval"} <= meanings["--out"]
    assert meanings["--steps"] == {"sample", "eval"}


@pytest.mark.parametrize("argv, flag", [
    (["train", "--train-steps", "0"], "--train-steps"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--resume", "/no/such.safetensors"], "--resume"),
    (["sample", "--steps", "0"], "--steps"),
    (["sample", "--seed", "-1"], "--seed"),
    (["eval", "--steps", "0"], "--steps"),
    (["demo", "--batch-size", "0"], "--batch-size"),
    (["demo", "--device", "tpu:x"], "--device"),
])
def test_input_errors_name_the_flag(argv, flag, tmp_path, capsys):
    from fastddpm.cli import main

    extra = {"train": ["--out", str(tmp_path / "run")], "demo": []}.get(argv[0], ["--no-progress"])
    assert main([*argv, *extra]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in err and "Traceback" not in err, err


@pytest.mark.parametrize("command, old, new", [
    (["train", "--train-steps", "0"], ["--steps", "0"], "--train-steps"),
    (["demo", "--size", "0"], ["--batch", "2"], "--batch-size"),
    (["eval", "--num-samples", "0", "--no-bound"], ["--json", "{tmp}/r.json"], "--out"),
])
def test_old_spellings_still_work_with_a_note(command, old, new, tmp_path, capsys):
    from fastddpm.cli import main

    main([*command, *[part.format(tmp=tmp_path) for part in old]])
    assert f"note: {old[0]} is deprecated; use {new}" in capsys.readouterr().err


def test_a_corrupt_chunk_is_said_not_to_be_a_fastddpm_chunk(tmp_path, capsys):
    import numpy as np

    from fastddpm.cli import main

    assert main(["sample", "--num-samples", "4", "--batch-size", "2", "--steps", "2", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "run")]) == 0
    np.savez(tmp_path / "run" / "chunk-000001.npz", samples=np.array([{"not": "samples"}], dtype=object))
    assert main(["merge", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err
    assert "chunk-000001.npz" in err and "not a chunk written by fastddpm" in err and "allow_pickle" not in err


def test_bad_input_exits_2_in_every_command(tmp_path, capsys):
    from fastddpm.cli import main

    cases = [["sample", "--steps", "0", "--no-progress"], ["train", "--train-steps", "0", "--out", str(tmp_path / "r")],
             ["eval", "--steps", "0"], ["merge", str(tmp_path / "missing")], ["demo", "--size", "0"]]
    for argv in cases:
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"fastddpm {argv[0]}: error: "), (argv, lines)
