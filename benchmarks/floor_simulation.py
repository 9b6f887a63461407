"""Which real-data floor does a perfect model's FD match? A simulation where the answer is known.

    python benchmarks/floor_simulation.py [--repeats 400] [--dim 16] [--out docs/floor_simulation.json]

A Gaussian population in ``--dim`` dimensions stands in for the classifier features of digits. Each
repeat draws, afresh, a training set (1497, as the digits' training split), a held-out set (300)
and a "perfect model" sample of N (fresh draws of the population: a model that generalises
exactly), and computes the Frechet distance to the held-out set of:

* the perfect model's N samples;
* N distinct training points (a random subset, without replacement): fastddpm's floor;
* N training points drawn with replacement: the floor used before, and what a model that copies
  training points (with repeats) produces.

The perfect model's mean FD over repeats is the floor a fair ratio divides by. Prints the means
with their standard errors and the perfect model's gap to each floor in standard errors, and writes
them (with every repeat) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def simulate(repeats: int, dim: int, sizes, seed: int = 0):
    import numpy as np

    from fastddpm.metrics import frechet_distance

    rng = np.random.default_rng(seed)
    # an anisotropic population, like features: a random covariance with a spread of scales
    mixing = rng.normal(size=(dim, dim)) / math.sqrt(dim)
    cholesky = np.linalg.cholesky(mixing @ mixing.T + 0.1 * np.eye(dim))

    def draw(count):
        return rng.normal(size=(count, dim)) @ cholesky.T

    results = {}
    for n in sizes:
        rows = {"perfect model": [], "without replacement": [], "with replacement": []}
        for _ in range(repeats):
            train, heldout = draw(1497), draw(300)
            rows["perfect model"].append(frechet_distance(draw(n), heldout))
            rows["without replacement"].append(frechet_distance(train[rng.choice(1497, n, replace=False)], heldout))
            rows["with replacement"].append(frechet_distance(train[rng.choice(1497, n, replace=True)], heldout))
        results[n] = rows
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=400)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 500, 1000])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "floor_simulation.json")
    args = parser.parse_args(argv)
    results = simulate(args.repeats, args.dim, args.sizes)
    summary = {}
    lines = ["| N | perfect model | without replacement (fastddpm) | with replacement (before) | "
             "perfect - without, in se | perfect - with, in se |", "|---|---|---|---|---|---|"]
    for n, rows in results.items():
        stats = {name: (statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values)))
                 for name, values in rows.items()}
        # paired differences (same training / held-out sets): their standard errors
        gaps = {}
        for floor in ("without replacement", "with replacement"):
            differences = [a - b for a, b in zip(rows["perfect model"], rows[floor])]
            gaps[floor] = statistics.fmean(differences) / (statistics.stdev(differences) / math.sqrt(len(differences)))
        summary[n] = dict(means={name: value[0] for name, value in stats.items()},
                          standard_errors={name: value[1] for name, value in stats.items()},
                          gap_in_se=gaps)
        lines.append(f"| {n} | " + " | ".join(f"{stats[name][0]:.4f} ± {stats[name][1]:.4f}" for name in rows)
                     + f" | {gaps['without replacement']:+.1f} | {gaps['with replacement']:+.1f} |")
    args.out.write_text(json.dumps(dict(command="python benchmarks/floor_simulation.py " + " ".join(
        sys.argv[1:] if argv is None else argv), repeats=args.repeats, dim=args.dim, summary=summary,
        raw={n: rows for n, rows in results.items()}), indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
