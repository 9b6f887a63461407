"""The bounds of tests/test_quality.py: the shipped model's pooled quality over many seed triples,
for each case the test runs, and the bounds derived from their spread by one rule.

    python benchmarks/quality_bounds.py [--triples 6] [--out docs/quality_bounds.json]

For triples (0, 1, 2), (3, 4, 5), ...: the pooled FD / floor, mean max-probability, class deviation
and KID excess of each case (sampler, steps) at NUM_SAMPLES samples a seed. The rule, in
:func:`bounds_of`: the mean over triples plus (FD / floor) or minus (confidence) SPREAD standard
deviations. The JSON holds the cases, every triple, the bounds and the checkpoint's checksum; the
test reads its cases and bounds from it (nothing here imports the tests).
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

ROOT = Path(__file__).resolve().parents[1]
# What the test runs: (sampler, steps) cases, samples a seed, the seeds of the test's triple.
CASES = (("unipc", 20), ("dpmpp_2m", 20), ("ddpm", 100))
NUM_SAMPLES = 500
SEEDS = (0, 1, 2)
# The rule: bounds at the mean over triples -/+ SPREAD standard deviations.
SPREAD = 2.0
# Bounds fixed by the quality targets rather than measured (issue 16): every class within 30 % of
# uniform, the KID excess within 2 standard errors.
FIXED_BOUNDS = dict(max_class_deviation=0.3, max_kid_excess_in_se=2.0)


def bounds_of(ratios, confidences) -> dict:
    """The one rule: FD / floor at most mean + SPREAD sd, confidence at least mean - SPREAD sd."""
    return dict(max_fd_ratio=statistics.fmean(ratios) + SPREAD * statistics.stdev(ratios),
                min_confidence=statistics.fmean(confidences) - SPREAD * statistics.stdev(confidences),
                **FIXED_BOUNDS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triples", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quality_bounds.json")
    args = parser.parse_args(argv)

    import torch

    import fastddpm
    from fastddpm.evaluation import evaluate_digit_samples, pool_digit_quality
    from fastddpm.metrics import load_digit_classifier

    pretrained = fastddpm.load_pretrained()
    classifier = load_digit_classifier(None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    report = dict(command=" ".join(["python benchmarks/quality_bounds.py", *(argv if argv is not None else
                                                                             sys.argv[1:])]),
                  commit=commit, checkpoint_sha256=pretrained.checksum, machine=platform.machine(),
                  torch=torch.__version__, num_samples=NUM_SAMPLES, seeds=list(SEEDS),
                  rule=f"mean over triples +/- {SPREAD} sd (FD / floor: +, confidence: -)", samplers={})
    for sampler, steps in CASES:
        started = time.perf_counter()
        triples = []
        for triple in range(args.triples):
            seeds = [SEEDS[0] + len(SEEDS) * triple + i for i in range(len(SEEDS))]
            results = []
            for seed in seeds:
                samples = fastddpm.sample(pretrained.model, (NUM_SAMPLES, *pretrained.sample_shape),
                                          schedule=pretrained.schedule, sampler=sampler, num_steps=steps, seed=seed,
                                          device="cpu", progress=False)
                results.append(evaluate_digit_samples(samples, seed=seed, classifier=classifier))
            pooled = pool_digit_quality(results)
            triples.append(dict(seeds=seeds, fd_ratio=pooled["fd_ratio"],
                                fd_ratio_with_replacement=pooled["fd_ratio_with_replacement"],
                                confidence=pooled["mean_max_probability"],
                                class_deviation=pooled["class_deviation"],
                                kid_excess_in_se=pooled["kid_excess_in_se"]))
            print(f"{sampler} {steps} seeds {seeds}: FD / floor {pooled['fd_ratio']:.3f}, confidence "
                  f"{pooled['mean_max_probability']:.3f}", flush=True)
        ratios = [t["fd_ratio"] for t in triples]
        confidences = [t["confidence"] for t in triples]
        summary = dict(
            sampler=sampler, steps=steps, triples=triples, seconds=time.perf_counter() - started,
            fd_ratio_mean=statistics.fmean(ratios), fd_ratio_sd=statistics.stdev(ratios),
            confidence_mean=statistics.fmean(confidences), confidence_sd=statistics.stdev(confidences),
            test_fd_ratio=ratios[0], test_confidence=confidences[0], bounds=bounds_of(ratios, confidences))
        report["samplers"][f"{sampler}:{steps}"] = summary
        print(f"{sampler} {steps}: test triple FD / floor {ratios[0]:.3f}, over {args.triples} triples "
              f"{summary['fd_ratio_mean']:.3f} ± {summary['fd_ratio_sd']:.3f} -> bound "
              f"{summary['bounds']['max_fd_ratio']:.3f}; confidence {confidences[0]:.4f}, "
              f"{summary['confidence_mean']:.4f} ± {summary['confidence_sd']:.4f} -> bound "
              f"{summary['bounds']['min_confidence']:.4f}", flush=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
