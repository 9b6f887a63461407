"""The spread behind the bounds of tests/test_quality.py: the shipped model's pooled quality over
many seed triples, for each sampler the test runs.

    python benchmarks/quality_bounds.py [--triples 10] [--out docs/quality_bounds.json]

For triples (0, 1, 2), (3, 4, 5), ...: the pooled FD / floor and mean max-probability of the test's
sampler, step count and sample count (imported from the test, so they cannot drift apart). Prints
the test triple's figures, the mean and standard deviation over the triples, and the bound that
test uses: the test triple's value plus two standard deviations (minus, for the confidence).
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triples", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quality_bounds.json")
    args = parser.parse_args(argv)

    import torch

    import fastddpm
    from fastddpm.evaluation import evaluate_digit_samples, pool_digit_quality
    from fastddpm.metrics import load_digit_classifier

    sys.path.insert(0, str(ROOT / "tests"))
    from test_quality import BOUNDS, NUM_SAMPLES, SEEDS

    pretrained = fastddpm.load_pretrained()
    classifier = load_digit_classifier(None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    report = dict(command=" ".join(["python benchmarks/quality_bounds.py", *(argv if argv is not None else
                                                                             sys.argv[1:])]),
                  commit=commit, checkpoint_sha256=pretrained.checksum, machine=platform.machine(),
                  torch=torch.__version__, num_samples=NUM_SAMPLES, samplers={})
    for sampler, steps in BOUNDS:
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
                                confidence=pooled["mean_max_probability"],
                                class_deviation=pooled["class_deviation"],
                                kid_excess_in_se=pooled["kid_excess_in_se"]))
            print(f"{sampler} {steps} seeds {seeds}: FD / floor {pooled['fd_ratio']:.3f}, confidence "
                  f"{pooled['mean_max_probability']:.3f}", flush=True)
        ratios = [t["fd_ratio"] for t in triples]
        confidences = [t["confidence"] for t in triples]
        summary = dict(
            triples=triples, seconds=time.perf_counter() - started,
            fd_ratio_mean=statistics.fmean(ratios), fd_ratio_sd=statistics.stdev(ratios),
            confidence_mean=statistics.fmean(confidences), confidence_sd=statistics.stdev(confidences),
            test_fd_ratio=ratios[0], test_confidence=confidences[0],
            suggested_max_fd_ratio=ratios[0] + 2 * statistics.stdev(ratios),
            suggested_min_confidence=confidences[0] - 2 * statistics.stdev(confidences))
        report["samplers"][f"{sampler}:{steps}"] = summary
        print(f"{sampler} {steps}: test triple FD / floor {ratios[0]:.3f}, over {args.triples} triples "
              f"{summary['fd_ratio_mean']:.3f} ± {summary['fd_ratio_sd']:.3f} -> bound "
              f"{summary['suggested_max_fd_ratio']:.3f}; confidence {confidences[0]:.4f}, "
              f"{summary['confidence_mean']:.4f} ± {summary['confidence_sd']:.4f} -> bound "
              f"{summary['suggested_min_confidence']:.4f}", flush=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
