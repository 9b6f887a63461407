"""The cost of one call of each sampler on the shipped digits model: does a sampler's step cost
more than another's at the same step count? (docs/evaluation.md, "Quality against step count".)

    python benchmarks/sampler_cost.py [--samples 1000] [--repeats 5] [--plan unipc:10,20 dpmpp_2m:10,20]

Each case is ``fastddpm.sample`` of ``--samples`` digits in this process (after one warm-up call
of each), the cases interleaved within each round so that a change of load touches them alike.
Writes ``OUT/<cpu>/<date>-<commit>-sampler-cost.{json,md}`` (every run, the load average before
it) and prints the median [min-max] per case.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from readme_timings import summary  # noqa: E402

PLAN = {"dpmpp_2m": (10, 20), "unipc": (10, 20)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plan", nargs="+", default=None, metavar="SAMPLER:STEPS")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)

    import common

    import fastddpm

    plan = PLAN if args.plan is None else {
        name: tuple(int(n) for n in steps.split(",")) for name, steps in (item.split(":") for item in args.plan)}
    cases = [(sampler, steps) for sampler, counts in plan.items() for steps in counts]
    pretrained = fastddpm.load_pretrained()
    shape = (args.samples, *pretrained.sample_shape)

    def call(sampler, steps, seed):
        fastddpm.sample(pretrained.model, shape, schedule=pretrained.schedule, sampler=sampler, num_steps=steps,
                        seed=seed, progress=False)

    for sampler, steps in cases:  # warm-up: first-call costs out of the timings
        call(sampler, steps, 0)
    runs = []
    for index in range(args.repeats):
        for sampler, steps in cases:
            load = os.getloadavg()[0]
            started = time.perf_counter()
            call(sampler, steps, index)
            runs.append(dict(sampler=sampler, steps=steps, seconds=time.perf_counter() - started, load_before=load))
            print(f"  {runs[-1]}", file=sys.stderr, flush=True)
    table = {f"{sampler}:{steps}": dict(
        seconds=summary([r["seconds"] for r in runs if (r["sampler"], r["steps"]) == (sampler, steps)]),
        load_before=summary([r["load_before"] for r in runs if (r["sampler"], r["steps"]) == (sampler, steps)]))
        for sampler, steps in cases}
    meta = common.run_metadata("cpu", ["benchmarks/sampler_cost.py", *(argv if argv is not None else sys.argv[1:])])
    meta["samples"] = args.samples
    result = dict(meta=meta, runs=runs, table=table)
    folder = args.out / common.device_slug("cpu")
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{meta['git_commit']}-sampler-cost"
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Sampler cost: {meta['cpu']}, torch {meta['torch']}, {meta['torch_threads']} threads, "
             f"{args.samples} samples a call", "",
             f"- date {meta['date']}, commit {meta['git_commit']}; command `{meta['command']}`", "",
             "| sampler:steps | seconds a call: median [min-max] | load average before | runs |", "|---|---|---|---|"]
    for case, row in table.items():
        s, load = row["seconds"], row["load_before"]
        lines.append(f"| {case} | {s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}] | "
                     f"{load['min']:.1f}-{load['max']:.1f} | {s['n']} |")
    markdown = "\n".join(lines) + "\n"
    (folder / f"{stem}.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
