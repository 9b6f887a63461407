"""FD / floor of earlier results on the floor fastddpm uses now, without drawing samples again.

    python benchmarks/refloor.py docs/quality_vs_steps.json docs/recipe/C_lr.dpmpp_2m20.json ...

A sample set's FD does not depend on the floor; only the floor changed (N distinct training digits
instead of N drawn with replacement: docs/evaluation.md, "Which real-data floor"). For each stored
per-seed result (its seed, sample count, FD and floor) this recomputes both floors of that seed
(:func:`fastddpm.evaluation.digit_fd_floors`, the generator's first use in an evaluation, so the
with-replacement floor it recomputes must equal the stored one: checked, to 1e-6 relative) and
prints the pooled ratios, mean FD over mean floor as ``pool_digit_quality`` pools them, grouped as
the file groups them (sampler and steps). Writes nothing; ``--json`` prints the table as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def _rows(path: Path):
    """(group, seed, num_samples, fd, stored floor) of every per-seed result in a results file."""
    data = json.loads(path.read_text())
    if "rows" in data:  # benchmarks/quality_vs_steps.py
        for row in data["rows"]:
            yield f"{row['sampler']} {row['steps']}", row["seed"], data["samples"], row["fd"], row["fd_floor"]
    elif "quality_per_seed" in data:  # fastddpm eval --out
        group = f"{data['sampler']} {data['steps']}"
        for seed, result in zip(data["seeds"], data["quality_per_seed"]):
            yield group, seed, result["num_samples"], result["fd"], result["fd_floor"]
    else:
        raise ValueError(f"{path}: neither a quality_vs_steps file nor an eval report")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from fastddpm.data import load_digits
    from fastddpm.evaluation import digit_fd_floors
    from fastddpm.metrics import load_digit_classifier

    classifier = load_digit_classifier(None)
    train_features, _ = classifier.embed(load_digits("train")[0])
    heldout_features, _ = classifier.embed(load_digits("test")[0])
    cache = {}
    table = []
    for path in args.files:
        groups = defaultdict(list)
        for group, seed, n, fd, stored in _rows(path):
            if (seed, n) not in cache:
                cache[seed, n] = digit_fd_floors(train_features, heldout_features, n,
                                                 torch.Generator().manual_seed(seed))
            floor, replaced, _ = cache[seed, n]
            if abs(replaced - stored) > 1e-6 * stored:
                raise SystemExit(f"{path}: seed {seed}, N {n}: the recomputed with-replacement floor {replaced:.6f} is "
                                 f"not the stored {stored:.6f} (another classifier or floor code)")
            groups[group].append((fd, floor, replaced))
        for group, values in groups.items():
            fd = statistics.fmean(v[0] for v in values)
            floor = statistics.fmean(v[1] for v in values)
            replaced = statistics.fmean(v[2] for v in values)
            per_seed = [v[0] / v[1] for v in values]
            table.append(dict(file=str(path), group=group, seeds=len(values), fd=fd, floor=floor,
                              fd_ratio=fd / floor, fd_ratio_sd=statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
                              floor_with_replacement=replaced, fd_ratio_with_replacement=fd / replaced))
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    print("| file | sampler, steps | seeds | FD | floor (now) | FD / floor now (per-seed sd) | FD / floor before |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['file']} | {row['group']} | {row['seeds']} | {row['fd']:.2f} | {row['floor']:.2f} | "
              f"{row['fd_ratio']:.3f} ({row['fd_ratio_sd']:.3f}) | {row['fd_ratio_with_replacement']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
