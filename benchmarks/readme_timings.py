"""The timings the README quotes, measured the way a user meets them: the command line, in a fresh
process each time, several runs, with the machine's load beside each.

    python benchmarks/readme_timings.py [--repeats 5] [--ddpm-repeats 3] [--out benchmarks/results]

Cases (the shipped digits model, 64 samples, seed 0):

* ``default``: ``fastddpm sample --out samples.png`` (the default sampler, UniPC, 20 steps): the command's own
  "sampled in" figure and the wall time of the whole command (start-up, loading, writing);
* ``ddpm``: the same with ``--sampler ddpm`` (1000 steps), torch's default threads;
* ``ddpm-1-thread``: the same with ``OMP_NUM_THREADS=1``.

Writes ``OUT/<cpu>/<date>-<commit>-readme-timings.json`` (every run: wall, sampled-in, load average
before it) and ``.md`` (median and min-max per case), and prints the table. The README's figures
are copied from that table, ranges and load included.
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

CASES = {
    "default": dict(argv=[], env={}),
    "ddpm": dict(argv=["--sampler", "ddpm"], env={}),
    "ddpm-1-thread": dict(argv=["--sampler", "ddpm"], env={"OMP_NUM_THREADS": "1"}),
}


def one_run(case: str, folder: Path) -> dict:
    spec = CASES[case]
    load = os.getloadavg()[0]
    env = dict(os.environ, **spec["env"])
    command = [sys.executable, "-m", "fastddpm", "sample", "--out", str(folder / f"{case}.png"), "--overwrite",
               "--no-progress", *spec["argv"]]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{case}: {done.stderr.strip().splitlines()[-1:]}")
    sampled = float(re.search(r"sampled in ([0-9.]+) s", done.stdout).group(1))
    return dict(case=case, wall_s=wall, sampled_s=sampled, load_before=load)


def summary(values):
    return dict(median=statistics.median(values), min=min(values), max=max(values), n=len(values))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of the default case (default 5)")
    parser.add_argument("--ddpm-repeats", type=int, default=3, help="runs of each 1000-step case (default 3)")
    parser.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)

    import common

    runs = []
    with tempfile.TemporaryDirectory() as folder:
        # interleaved, so that a change of load touches every case alike
        rounds = max(args.repeats, args.ddpm_repeats)
        for index in range(rounds):
            for case in args.cases:
                if index < (args.repeats if case == "default" else args.ddpm_repeats):
                    runs.append(one_run(case, Path(folder)))
                    print(f"  {runs[-1]}", file=sys.stderr, flush=True)
    table = {}
    for case in args.cases:
        mine = [run for run in runs if run["case"] == case]
        table[case] = dict(sampled_s=summary([r["sampled_s"] for r in mine]), wall_s=summary([r["wall_s"] for r in mine]),
                           load_before=summary([r["load_before"] for r in mine]))
    meta = common.run_metadata("cpu", ["benchmarks/readme_timings.py", *(argv if argv is not None else sys.argv[1:])])
    meta["cores"] = os.cpu_count()
    result = dict(meta=meta, runs=runs, table=table)
    folder = args.out / common.device_slug("cpu")
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{meta['git_commit']}-readme-timings"
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# README timings: {meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}", "",
             f"- date {meta['date']}, commit {meta['git_commit']}; command `{meta['command']}`", "",
             "| case | sampled in s: median [min-max] | whole command s: median [min-max] | load average before | runs |",
             "|---|---|---|---|---|"]
    for case, row in table.items():
        s, w, load = row["sampled_s"], row["wall_s"], row["load_before"]
        lines.append(f"| {case} | {s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}] | {w['median']:.2f} "
                     f"[{w['min']:.2f}-{w['max']:.2f}] | {load['min']:.1f}-{load['max']:.1f} | {s['n']} |")
    markdown = "\n".join(lines) + "\n"
    (folder / f"{stem}.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
