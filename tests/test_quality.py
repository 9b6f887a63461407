"""The shipped digits model keeps its sample quality: a change to sampling, the kernels or the
checkpoint that hurts samples fails here (slow-marked, part of CI).

Pooled over three fixed seeds, 500 samples each, with the sampler the README uses by default
(DPM-Solver++(2M), 20 steps) and with ancestral DDPM on 100 respaced steps (the fused
reverse step's path). Each bound is the mean over six seed triples (0-2, 3-5, ..., 15-17) of
the shipped checkpoint's pooled figure, plus (FD) or minus (confidence) two standard deviations
over those triples, measured by ``python benchmarks/quality_bounds.py --triples 6``
(docs/quality_bounds.json). The seeds are fixed, so on an unchanged stack the figures repeat up
to round-off; a change that redraws the noise (a new noise layout) passes as a fresh triple
would, and a change that hurts samples by more than seed luck can explain fails. Confidence is
the sharp guard (its spread over triples is 0.002-0.003); FD, whose spread is 0.1-0.2, catches
gross damage.
"""
import json
from pathlib import Path

import pytest
import torch

import fastddpm
from fastddpm.evaluation import evaluate_digit_samples, pool_digit_quality
from fastddpm.metrics import load_digit_classifier

SEEDS = (0, 1, 2)
NUM_SAMPLES = 500
# sampler, steps -> (largest pooled FD / floor, smallest mean max-probability)
BOUNDS = {
    # measured: FD / floor 1.124 ± 0.200 over triples (test triple 0.809), confidence 0.9703 ± 0.0015
    ("dpmpp_2m", 20): (1.52, 0.967),
    # measured: FD / floor 1.006 ± 0.100 (test triple 0.980), confidence 0.9750 ± 0.0027
    ("ddpm", 100): (1.21, 0.969),
}


SPREAD_FILE = Path(__file__).resolve().parents[1] / "docs" / "quality_bounds.json"


def _pooled_quality(sampler, steps, tmp_path_factory, model_dtype=None):
    # the folder test_metrics.py uses, so one pytest run trains the classifier once
    classifier = load_digit_classifier(tmp_path_factory.getbasetemp() / "fastddpm-classifier-cache")
    pretrained = fastddpm.load_pretrained()
    results = []
    for seed in SEEDS:
        samples = fastddpm.sample(pretrained.model, (NUM_SAMPLES, *pretrained.sample_shape),
                                  schedule=pretrained.schedule, sampler=sampler, num_steps=steps, seed=seed,
                                  device="cpu", progress=False, model_dtype=model_dtype)
        assert torch.isfinite(samples).all()
        results.append(evaluate_digit_samples(samples, seed=seed, classifier=classifier))
    return pool_digit_quality(results)


@pytest.mark.slow
@pytest.mark.parametrize("sampler, steps", list(BOUNDS))
def test_shipped_model_holds_its_sample_quality(sampler, steps, tmp_path_factory):
    pooled = _pooled_quality(sampler, steps, tmp_path_factory)
    max_ratio, min_confidence = BOUNDS[sampler, steps]
    summary = (f"{sampler} {steps}: FD / floor {pooled['fd_ratio']:.3f}, confidence "
               f"{pooled['mean_max_probability']:.3f}, classes {pooled['class_histogram']}")
    assert pooled["fd_ratio"] <= max_ratio, summary
    assert pooled["mean_max_probability"] >= min_confidence, summary
    assert pooled["class_deviation"] <= 0.3, summary  # every class within 30 % of uniform
    assert pooled["kid_excess_in_se"] <= 2.0, summary


@pytest.mark.slow
def test_bf16_model_scores_within_the_seed_spread_of_float32(tmp_path_factory):
    """model_dtype=bfloat16 (the model in bf16, the sampler in float32) on the default sampler: the
    pooled FD / floor and confidence move by less than two standard deviations of the float32
    figures over seed triples (docs/quality_bounds.json), paired on the same seeds, and the bf16 run
    passes the float32 bounds. Measured: FD / floor 0.803 against 0.809, confidence 0.96990 against
    0.96978 (float16 scored 0.810 / 0.96977 but runs ~30x slower than float32 on a CPU: not in CI)."""
    spread = json.loads(SPREAD_FILE.read_text())["samplers"]["dpmpp_2m:20"]
    exact = _pooled_quality("dpmpp_2m", 20, tmp_path_factory)
    low = _pooled_quality("dpmpp_2m", 20, tmp_path_factory, model_dtype=torch.bfloat16)
    summary = (f"bf16: FD / floor {low['fd_ratio']:.3f}, confidence {low['mean_max_probability']:.4f}; float32: "
               f"{exact['fd_ratio']:.3f}, {exact['mean_max_probability']:.4f}")
    assert low["fd_ratio"] != exact["fd_ratio"], summary  # the model really ran in another precision
    assert abs(low["fd_ratio"] - exact["fd_ratio"]) <= 2 * spread["fd_ratio_sd"], summary
    assert abs(low["mean_max_probability"] - exact["mean_max_probability"]) <= 2 * spread["confidence_sd"], summary
    max_ratio, min_confidence = BOUNDS["dpmpp_2m", 20]
    assert low["fd_ratio"] <= max_ratio and low["mean_max_probability"] >= min_confidence, summary
