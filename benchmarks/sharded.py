"""Samples/s of ``fastddpm sample --out DIR`` in one process and split over ``torchrun`` processes.

    python benchmarks/sharded.py [--processes 1 2] [--num-samples 64] [--steps 100] [--batch-size 16]
                                 [--checkpoint PATH] [--device cpu|cuda] [--repeats 3] [--out DIR]

Each run is the real command in a fresh folder: one process (``python -m fastddpm sample``) or
``torchrun --standalone --nproc_per_node N -m fastddpm sample`` (gloo on the CPU, NCCL on GPUs,
one GPU a process). The rate is the command's own ``drew N samples in S s``: from the first batch
to the last chunk written (rank 0 waits for every process), without start-up and loading; the
wall time of the whole command is kept too. On the CPU, one process runs with torch's default
threads and with one thread, N processes with one thread each (torchrun's default), so the rows
compare the same cores used two ways (``--one-process-threads`` picks the one-process rows). The load average before each run is recorded: on a shared
machine it says how much the numbers can be trusted.

Writes ``DIR/<device-name>/<date>-<commit>-sharded.json`` (every run, raw) and ``.md`` (the table),
then prints the table. Default ``DIR`` is ``benchmarks/results``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import markdown_table  # noqa: E402

RATE = re.compile(r"drew (\d+) samples in ([0-9.]+) s \(([0-9.]+) samples/s, (\d+) process")


def _command(processes: int, args, folder: Path):
    sample = ["sample", "--num-samples", str(args.num_samples), "--steps", str(args.steps), "--batch-size",
              str(args.batch_size), "--seed", "0", "--device", args.device, "--out", str(folder), "--no-progress"]
    if args.checkpoint:
        sample += ["--checkpoint", args.checkpoint]
    if processes == 1:
        return [sys.executable, "-m", "fastddpm", *sample]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "fastddpm", *sample]


def _one_run(processes: int, threads, args) -> dict:
    environment = dict(os.environ)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TRITON_INTERPRET"):
        environment.pop(name, None)
    if threads is None:
        environment.pop("OMP_NUM_THREADS", None)
    else:
        environment["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory(prefix="fastddpm-sharded-") as folder:
        command = _command(processes, args, Path(folder) / "run")
        load = os.getloadavg()[0]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            done = None
        wall = time.perf_counter() - started
    row = dict(processes=processes, omp_num_threads=threads, load_average_1min_before=load, wall_s=round(wall, 3),
               returncode=None if done is None else done.returncode, command=" ".join(command[1:]))
    if done is None:
        row["error"] = f"timed out after {args.timeout:.0f} s"
        return row
    found = RATE.search(done.stdout)
    if done.returncode != 0 or found is None:
        row["error"] = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return row
    samples, seconds = int(found.group(1)), float(found.group(2))
    row.update(samples=samples, sampling_s=seconds, samples_per_s=samples / seconds if seconds > 0 else None)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--checkpoint", default=None, help="default: the shipped digits model")
    parser.add_argument("--device", default="cuda" if common.HAS_CUDA else "cpu")
    parser.add_argument("--one-process-threads", nargs="+", default=["default", "1"],
                        help="CPU: OMP_NUM_THREADS of the one-process runs (default: torch's default, and 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600, help="seconds a run may take (default 600)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)

    configurations = []
    for processes in args.processes:
        if args.device == "cpu" and processes == 1:
            configurations += [(1, None if threads == "default" else int(threads))
                               for threads in args.one_process_threads]
        else:
            configurations.append((processes, 1 if args.device == "cpu" else None))
    runs = []
    for repeat in range(args.repeats):  # interleaved, so that a change of load hits every configuration
        for processes, threads in configurations:
            row = dict(_one_run(processes, threads, args), repeat=repeat)
            runs.append(row)
            print(json.dumps(row), flush=True)

    table = []
    for processes, threads in configurations:
        mine = [row for row in runs if row["processes"] == processes and row["omp_num_threads"] == threads]
        rates = [row["samples_per_s"] for row in mine if row.get("samples_per_s")]
        walls = [row["wall_s"] for row in mine if row.get("samples_per_s")]
        table.append([processes, "default" if threads is None else threads,
                      f"{statistics.median(rates):.2f}" if rates else "error",
                      " ".join(f"{rate:.2f}" for rate in rates), f"{statistics.median(walls):.1f}" if walls else "—",
                      " ".join(f"{row['load_average_1min_before']:.1f}" for row in mine)])
    markdown = markdown_table(["processes", "threads each", "samples/s (median)", "samples/s (each run)",
                               "command wall s (median)", "load average before each run"], table)
    meta = common.run_metadata(args.device, sys.argv)
    meta.update(workload=dict(num_samples=args.num_samples, steps=args.steps, batch_size=args.batch_size,
                              checkpoint=args.checkpoint or "shipped digits model", sampler="ddpm"),
                cpu_count=os.cpu_count())
    slug = common.device_slug(args.device)
    folder = Path(args.out) / slug
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{meta['git_commit']}-sharded"
    (folder / f"{stem}.json").write_text(json.dumps(dict(meta=meta, runs=runs), indent=1), encoding="utf-8")
    header = (f"# fastddpm sample --out DIR: samples/s by process count\n\n{meta['device_name']}, "
              f"{os.cpu_count()} CPUs, torch {meta['torch']}, commit {meta['git_commit']}"
              f"{' (dirty tree)' if meta.get('git_dirty') else ''}; {args.num_samples} samples, {args.steps} DDPM "
              f"steps, batch {args.batch_size}, {meta['workload']['checkpoint']}, {args.repeats} runs each.\n\n"
              f"Command: `{meta['command']}`\n\n")
    (folder / f"{stem}.md").write_text(header + markdown + "\n", encoding="utf-8")
    print(markdown)
    print(f"wrote {folder / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
