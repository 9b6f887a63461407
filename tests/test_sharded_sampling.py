"""Issue 13: seeds that depend on neither batch size nor process count; sharded, resumable sampling.

Sample k of a run draws the noise of index k (``fastddpm.sample(..., first_index=, sampler="ddpm")``); the noise
itself is bitwise the same in any batch (``tests/test_noise.py::test_a_sample_draws_the_same_noise_in_any_batch``).
What can still differ between batch sizes is the model's own rounding: a convolution may take
another kernel for another batch (or thread count). BOUND is the largest such difference these
tests accept; README "Sampling at scale" states what was measured.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import NoiseSchedule
from fastddpm.cli import main

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

T_TRAIN = 20
SCHEDULE = dict(num_train_timesteps=T_TRAIN, beta_end=0.2)
# The stated bound (README, "Sampling at scale"): samples lie in [-1, 1]; on this CPU the largest
# difference measured between batch sizes was 2.7e-5 (digits model, DDIM 50 steps), 8e-7 for the
# tiny UNet here. A sample drawn with the wrong noise differs by O(1).
BOUND = 5e-5


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory, tiny_unet):
    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path_factory.mktemp("unet")
    tiny_unet.save_pretrained(folder)
    diffusers.DDPMScheduler(**SCHEDULE).save_config(folder)
    return folder


def _sample_command(*argv):
    argv = list(map(str, argv))
    pinned = [] if "--sampler" in argv else ["--sampler", "ddpm"]  # these tests pin DDPM
    return main(["sample", *argv, *pinned, "--no-progress", "--device", "cpu"])


def _chunks(folder):
    return sorted(Path(folder).glob("chunk-*.npz"))


def _folder_samples(folder):
    return np.concatenate([np.load(path)["samples"] for path in _chunks(folder)])


def _environment():
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    return environment


# ---------------------------------------------------------------------------------------------
# 1. the same index, the same sample, whatever the batch
# ---------------------------------------------------------------------------------------------
class _PerSample(torch.nn.Module):
    """Elementwise in x and t: no arithmetic shared across the batch, so no batch-size rounding."""

    def forward(self, x, t):
        return torch.tanh(x) * 0.5 + (t.to(x.dtype) / 1000.0).view(-1, *([1] * (x.dim() - 1)))


def _in_batches(model, batch, total=8, **kwargs):
    parts = [fastddpm.sample(model, (min(batch, total - first), 1, 8, 8), first_index=first, seed=11,
                             progress=False, **{"sampler": "ddpm", **kwargs}) for first in range(0, total, batch)]
    return torch.cat(parts)


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_a_sample_is_bitwise_the_same_in_any_batch_when_the_model_is(backend):
    if backend == "interpret":
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("the interpreter runs on CPU tensors")
    schedule = NoiseSchedule.linear(T_TRAIN, beta_end=0.2)
    whole = _in_batches(_PerSample(), 8, schedule=schedule, backend=backend)
    for batch in (1, 3):
        assert torch.equal(_in_batches(_PerSample(), batch, schedule=schedule, backend=backend), whole), batch
    # DDIM with eta (noise every step) too.
    ddim = dict(schedule=schedule, sampler="ddim", eta=0.7, num_steps=5, backend=backend)
    assert torch.equal(_in_batches(_PerSample(), 3, **ddim), _in_batches(_PerSample(), 8, **ddim))


def test_a_unet_sample_is_the_same_in_batches_of_1_3_and_8_within_the_bound(tiny_unet):
    schedule = NoiseSchedule.linear(T_TRAIN, beta_end=0.2)
    whole = _in_batches(tiny_unet, 8, schedule=schedule)
    assert whole.std() > 0.1  # real samples, not a constant
    for batch in (1, 3):
        difference = (_in_batches(tiny_unet, batch, schedule=schedule) - whole).abs().max().item()
        assert difference <= BOUND, (batch, difference)


def test_the_command_gives_the_same_samples_for_any_batch_size(unet_dir, tmp_path):
    results = {}
    for batch in (1, 3, 8):
        out = tmp_path / f"b{batch}.png"
        assert _sample_command("--checkpoint", unet_dir, "--num-samples", 8, "--batch-size", batch, "--seed", 4,
                               "--out", out) == 0
        results[batch] = np.load(out.with_suffix(".npz"))["samples"]
    for batch in (1, 3):
        assert np.abs(results[batch] - results[8]).max() <= BOUND, batch
    # A folder --out holds the same samples (chunks of 3: the batch size).
    assert _sample_command("--checkpoint", unet_dir, "--num-samples", 8, "--batch-size", 3, "--seed", 4,
                           "--out", tmp_path / "run") == 0
    assert [path.name for path in _chunks(tmp_path / "run")] == ["chunk-000000.npz", "chunk-000001.npz",
                                                                  "chunk-000002.npz"]
    assert np.array_equal(_folder_samples(tmp_path / "run"), results[3])


# ---------------------------------------------------------------------------------------------
# 2. the folder layout: manifest, refusals, corrupt and half-written chunks, merge
# ---------------------------------------------------------------------------------------------
def _snapshot(folder):
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes())
            for path in sorted(Path(folder).iterdir())}


def test_the_manifest_names_the_run_and_every_chunk(unet_dir, tmp_path):
    out = tmp_path / "run"
    assert _sample_command("--checkpoint", unet_dir, "--num-samples", 7, "--batch-size", 2, "--chunk-size", 3,
                           "--seed", 5, "--out", f"{out}/") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    run = manifest["run"]
    assert run["seed"] == 5 and run["sampler"] == "ddpm" and run["num_steps"] == T_TRAIN
    assert run["checkpoint_sha256"] == fastddpm.load_pretrained(unet_dir).checksum
    assert run["num_samples"] == 7 and run["chunk_size"] == 3
    assert manifest["chunks"] == [dict(file="chunk-000000.npz", first=0, count=3),
                                  dict(file="chunk-000001.npz", first=3, count=3),
                                  dict(file="chunk-000002.npz", first=6, count=1)]
    chunk = np.load(out / "chunk-000001.npz")
    assert int(chunk["first_index"]) == 3 and chunk["samples"].shape == (3, 1, 8, 8)
    assert str(chunk["run_id"]) == manifest["run_id"] and int(chunk["batch_size"]) == 2


@pytest.mark.parametrize("change,message", [
    (["--seed", "6"], "seed 5 there, 6 here"),
    (["--sampler", "ddim"], "sampler 'ddpm' there, 'ddim' here"),
    (["--steps", "10"], "num_steps 20 there, 10 here"),
    (["--num-samples", "9"], "num_samples 7 there, 9 here"),
    (["--chunk-size", "2"], "leave --chunk-size out"),
    (["--checkpoint", "OTHER"], "checkpoint_sha256"),
])
def test_a_folder_of_another_run_is_refused_and_left_alone(change, message, unet_dir, tiny_unet, tmp_path, capsys):
    out = tmp_path / "run"
    base = {"--checkpoint": unet_dir, "--num-samples": 7, "--seed": 5, "--batch-size": 3, "--out": out}
    assert _sample_command(*[str(v) for item in base.items() for v in item]) == 0
    before = _snapshot(out)
    if change[0] == "--checkpoint":
        other = tmp_path / "other"
        torch.manual_seed(1)
        type(tiny_unet)(**tiny_unet.config).save_pretrained(other)
        (other / "scheduler_config.json").write_bytes((unet_dir / "scheduler_config.json").read_bytes())
        change = ["--checkpoint", other]
    arguments = {**base, change[0]: change[1]}
    capsys.readouterr()
    assert _sample_command(*[str(v) for item in arguments.items() for v in item]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastddpm sample: error: --out {str(out)!r} holds samples of another run") and message in err
    assert "nothing in it was changed" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(out) == before


def test_resume_skips_finished_chunks_redoes_half_written_ones_and_corrupt_ones_only_when_asked(unet_dir, tmp_path,
                                                                                                capsys):
    out = tmp_path / "run"
    argv = ["--checkpoint", unet_dir, "--num-samples", 9, "--batch-size", 3, "--seed", 2, "--out", out]
    assert _sample_command(*argv) == 0
    complete = _folder_samples(out)
    # A run killed while writing chunk 1 left its temporary file, and chunk 2 is damaged.
    (out / "chunk-000001.npz").rename(out / ".chunk-000001.npz.x1y2z3.tmp")
    (out / ".chunk-000001.npz.x1y2z3.tmp").write_bytes(b"PK\x03\x04 half")
    damaged = (out / "chunk-000002.npz").read_bytes()[:100]
    (out / "chunk-000002.npz").write_bytes(damaged)
    first = (out / "chunk-000000.npz").stat()
    capsys.readouterr()
    assert _sample_command(*argv) == 2
    err = capsys.readouterr().err
    assert "chunk-000002.npz is corrupt: unreadable" in err and "--redo-corrupt" in err
    assert (out / "chunk-000002.npz").read_bytes() == damaged and not (out / "chunk-000001.npz").exists()

    assert _sample_command(*argv, "--redo-corrupt") == 0
    err = capsys.readouterr().err
    assert "removed 1 half-written file(s) (.chunk-000001.npz.x1y2z3.tmp)" in err
    assert "chunk-000002.npz was corrupt" in err and "kept as chunk-000002.npz.corrupt" in err
    assert (out / "chunk-000002.npz.corrupt").read_bytes() == damaged
    assert np.abs(_folder_samples(out) - complete).max() <= BOUND
    finished = (out / "chunk-000000.npz").stat()
    assert (finished.st_ino, finished.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not written again
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_merge_joins_a_finished_folder_and_refuses_an_unfinished_one(unet_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _sample_command("--checkpoint", unet_dir, "--num-samples", 5, "--batch-size", 2, "--seed", 3,
                           "--out", out) == 0
    assert main(["merge", str(out)]) == 0
    merged = np.load(out / "samples.npz")
    assert np.array_equal(merged["samples"], _folder_samples(out)) and merged["samples"].shape == (5, 1, 8, 8)
    assert int(merged["seed"]) == 3 and str(merged["sampler"]) == "ddpm" and int(merged["num_train_timesteps"]) == 20
    assert (out / "samples.png").is_file()
    (out / "chunk-000001.npz").unlink()
    capsys.readouterr()
    assert main(["merge", str(out), "--npz", str(tmp_path / "m.npz")]) == 2
    err = capsys.readouterr().err
    assert "1 of 3 chunks missing (chunk-000001.npz)" in err and not (tmp_path / "m.npz").exists()
    assert main(["merge", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_torchrun_needs_a_folder_out(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sample", "--out", "x.png", "--no-progress"]) == 2
    assert "--out must be a folder under torchrun" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 3. processes: torchrun with gloo, SIGKILL and SIGINT
# ---------------------------------------------------------------------------------------------
def test_torchrun_with_two_processes_writes_the_one_process_chunks(unet_dir, tmp_path):
    argv = ["--checkpoint", str(unet_dir), "--num-samples", "10", "--batch-size", "2", "--seed", "8",
            "--out", str(tmp_path / "two"), "--device", "cpu", "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fastddpm", "sample", *argv, *([] if "--sampler" in argv else ["--sampler", "ddpm"])],
                          env=_environment(), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "drew 10 samples" in done.stdout and "2 process(es)" in done.stdout
    assert _sample_command(*argv[:-5], "--out", tmp_path / "one") == 0
    two, one = _chunks(tmp_path / "two"), _chunks(tmp_path / "one")
    assert [path.name for path in two] == [path.name for path in one] and len(one) == 5
    assert {int(np.load(path)["rank"]) for path in two} == {0, 1}  # both processes drew chunks
    assert np.abs(_folder_samples(tmp_path / "two") - _folder_samples(tmp_path / "one")).max() <= BOUND
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("one", "two")]
    assert manifests[0]["run_id"] == manifests[1]["run_id"]


def _start(argv, cwd):
    argv = list(map(str, argv))
    argv += [] if "--sampler" in argv else ["--sampler", "ddpm"]  # these tests pin DDPM
    return subprocess.Popen([sys.executable, "-m", "fastddpm", "sample", *argv], cwd=cwd,
                            env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_a_chunk(process, folder, timeout=180):
    deadline = time.monotonic() + timeout
    while not _chunks(folder):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no chunk written: {process.communicate()[1][-2000:]}")
        time.sleep(0.005)


def test_a_killed_run_resumes_to_the_uninterrupted_result_without_writing_a_chunk_twice(tmp_path):
    # The shipped digits model, 20 steps, one sample a chunk: a run of some seconds to stop midway.
    argv = ["--num-samples", 32, "--steps", 20, "--batch-size", 1, "--seed", 3, "--device", "cpu", "--no-progress"]
    killed = _start([*argv, "--out", "killed"], tmp_path)
    stopped = _start([*argv, "--out", "stopped"], tmp_path)
    _wait_for_a_chunk(killed, tmp_path / "killed")
    killed.send_signal(signal.SIGKILL)
    _wait_for_a_chunk(stopped, tmp_path / "stopped")
    stopped.send_signal(signal.SIGINT)
    killed.communicate(timeout=60)
    _, err = stopped.communicate(timeout=60)
    assert stopped.returncode == 130 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fastddpm sample: interrupted by SIGINT; stopped in chunk-") and "to resume" in last

    kept = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in _chunks(tmp_path / "killed")}
    assert 1 <= len(kept) < 32, len(kept)  # stopped midway
    assert _sample_command(*argv[:-3], "--out", tmp_path / "killed") == 0
    again = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in _chunks(tmp_path / "killed")}
    assert len(again) == 32 and all(again[name] == kept[name] for name in kept)  # none written twice
    assert not [path for path in (tmp_path / "killed").iterdir() if path.name.endswith(".tmp")]

    # An uninterrupted run (in batches of 8: the same samples within the bound).
    assert _sample_command(*argv[:4], "--batch-size", 8, "--seed", 3, "--out", tmp_path / "whole") == 0
    assert np.abs(_folder_samples(tmp_path / "killed") - _folder_samples(tmp_path / "whole")).max() <= BOUND


# ---------------------------------------------------------------------------------------------
# 4. several nodes: two torchrun launchers on one machine stand for two nodes
# ---------------------------------------------------------------------------------------------
def _free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_nodes(argv, cwd, job):
    """Two ``torchrun --nnodes 2`` launchers (one process each) meeting at a c10d rendezvous on
    127.0.0.1: the README's multi-node command, with both "nodes" on this machine."""
    port = _free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", job,
                "--local-addr", "127.0.0.1", "--max-restarts", "0",
                "-m", "fastddpm", "sample", *map(str, argv), "--sampler", "ddpm"]
    return [subprocess.Popen(launcher, cwd=cwd, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]


def _workers_of(launchers):
    """The worker processes (children) of the launchers, read from /proc."""
    parents = {process.pid for process in launchers}
    workers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) in parents:
            workers.append(int(stat.parent.name))
    return workers


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads worker processes from /proc")
def test_two_nodes_write_the_one_process_chunks_and_a_killed_rank_resumes_without_drawing_twice(tmp_path):
    argv = ["--num-samples", 32, "--steps", 20, "--batch-size", 1, "--seed", 3, "--device", "cpu", "--no-progress"]
    # One process, uninterrupted: the reference chunks.
    assert _sample_command(*argv, "--out", tmp_path / "one") == 0

    nodes = _start_nodes([*argv, "--out", "nodes"], tmp_path, "fastddpm-test-kill")
    _wait_for_a_chunk(nodes[0], tmp_path / "nodes")
    deadline = time.monotonic() + 60
    while len(_workers_of(nodes)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = _workers_of(nodes)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)  # one rank dies mid-run; torchrun stops the run
    outputs = [node.communicate(timeout=120) for node in nodes]
    assert all(node.returncode != 0 for node in nodes), [out[1][-1500:] for out in outputs]
    kept = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in _chunks(tmp_path / "nodes")}
    assert 1 <= len(kept) < 32, len(kept)  # stopped midway

    # The same two-node command again finishes the run.
    nodes = _start_nodes([*argv, "--out", "nodes"], tmp_path, "fastddpm-test-resume")
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [out[1][-2000:] for out in outputs]
    assert any("2 process(es)" in out[0] for out in outputs)
    again = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in _chunks(tmp_path / "nodes")}
    assert sorted(again) == [path.name for path in _chunks(tmp_path / "one")]
    assert all(again[name] == kept[name] for name in kept)  # no chunk drawn twice
    ranks = {int(np.load(tmp_path / "nodes" / name)["rank"]) for name in again if name not in kept}
    assert ranks == {0, 1}  # both nodes drew chunks in the resumed run
    # The same samples as one process (batch 1 on both sides: the same arithmetic).
    assert np.abs(_folder_samples(tmp_path / "nodes") - _folder_samples(tmp_path / "one")).max() <= BOUND
