"""Sample quality against step count on the shipped digits model: DDPM, DDIM, DPM-Solver++(2M) and UniPC.

    python benchmarks/quality_vs_steps.py [--samples 300] [--seeds 0 1 2] [--out DIR]

For each sampler and step count and each seed: draw ``--samples`` digits with
``fastddpm.sample`` (the seed keys the noise), score them with the project's digit classifier
(``fastddpm.evaluation.evaluate_digit_samples``: Frechet distance to the 300 held-out digits, and
the floor: the same number of training digits against them, drawn with the same seed) and time
the sampling (wall clock, this machine). Writes ``quality_vs_steps.json`` (every number, the
command, the machine), a Markdown table and a PNG plot (FD / floor against steps, mean and the
spread over seeds) into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PLAN = {"ddpm": (1000,), "ddim": (5, 10, 20, 50), "dpmpp_2m": (5, 10, 20, 50), "unipc": (5, 10, 20, 50)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--plan", nargs="+", default=None, metavar="SAMPLER:STEPS",
                        help="e.g. ddpm:1000 ddim:10,20,50 (default: " + " ".join(
                            f"{name}:{','.join(map(str, steps))}" for name, steps in PLAN.items()) + ")")
    args = parser.parse_args(argv)

    import torch

    import fastddpm
    from fastddpm.evaluation import evaluate_digit_samples
    from fastddpm.metrics import load_digit_classifier

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = PLAN if args.plan is None else {
        name: tuple(int(n) for n in steps.split(",")) for name, steps in (item.split(":") for item in args.plan)}
    pretrained = fastddpm.load_pretrained()
    classifier = load_digit_classifier(None)
    rows = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    result = dict(command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                  commit=commit, machine=platform.processor() or platform.machine(), torch=torch.__version__,
                  threads=torch.get_num_threads(), samples=args.samples, seeds=args.seeds, rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    for sampler, step_counts in plan.items():
        for steps in step_counts:
            for seed in args.seeds:
                start = time.perf_counter()
                samples = fastddpm.sample(pretrained.model, (args.samples, *pretrained.sample_shape),
                                          schedule=pretrained.schedule, sampler=sampler, num_steps=steps, seed=seed,
                                          progress=False)
                seconds = time.perf_counter() - start
                quality = evaluate_digit_samples(samples, seed=seed, classifier=classifier)
                rows.append(dict(sampler=sampler, steps=steps, seed=seed, seconds=seconds, fd=quality["fd"],
                                 fd_floor=quality["fd_floor"], fd_ratio=quality["fd"] / quality["fd_floor"],
                                 confidence=quality["mean_max_probability"]))
                print(f"{sampler:9s} {steps:5d} seed {seed}: FD {quality['fd']:.2f} floor {quality['fd_floor']:.2f} "
                      f"({seconds:.1f} s)", flush=True)
                # Every row as soon as it is measured (a long run cut short keeps what it has).
                (args.out / "quality_vs_steps.json").write_text(json.dumps(result, indent=1) + "\n")
    table = summarise(rows)
    (args.out / "quality_vs_steps.md").write_text(table)
    plot(rows, args.out / "quality_vs_steps.png")
    print(table)
    return 0


def _sd(values) -> float:
    values = list(values)
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _groups(rows):
    groups = {}
    for row in rows:
        groups.setdefault((row["sampler"], row["steps"]), []).append(row)
    return groups


def summarise(rows) -> str:
    lines = ["| sampler | steps | FD (mean ± sd over seeds) | floor | FD / floor (pooled; sd of the seeds' ratios) "
             "| confidence | seconds per run |",
             "|---|---|---|---|---|---|---|"]
    for (sampler, steps), group in _groups(rows).items():
        fd = [r["fd"] for r in group]
        floor = statistics.mean(r["fd_floor"] for r in group)
        ratio = [r["fd_ratio"] for r in group]
        # pooled as fastddpm.evaluation.pool_digit_quality pools: mean FD over mean floor
        lines.append(f"| {sampler} | {steps} | {statistics.mean(fd):.2f} ± {_sd(fd):.2f} | "
                     f"{floor:.2f} | {statistics.mean(fd) / floor:.2f} ± {_sd(ratio):.2f} | "
                     f"{statistics.mean(r['confidence'] for r in group):.3f} | "
                     f"{statistics.mean(r['seconds'] for r in group):.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        points = [(steps, [r["fd_ratio"] for r in group]) for (name, steps), group in _groups(rows).items()
                  if name == sampler]
        steps = [p[0] for p in points]
        means = [statistics.mean(p[1]) for p in points]
        spreads = [_sd(p[1]) for p in points]
        axis.errorbar(steps, means, yerr=spreads, marker="o", capsize=3, label=sampler)
    axis.set_xscale("log")
    axis.set_xlabel("sampling steps")
    axis.set_ylabel("FD / real-data floor (mean ± sd over seeds)")
    axis.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
