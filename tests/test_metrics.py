"""Frechet distance, point-cloud distances and the digit classifier behind the quality metrics."""
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from fastddpm import metrics
from fastddpm.metrics import (
    ClassifierConfig,
    energy_distance,
    frechet_distance,
    gaussian_statistics,
    load_digit_classifier,
    sliced_wasserstein_distance,
    sqrtm_psd,
)


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook FID formula with scipy's general matrix square root."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root.real))


def correlated_features(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((d, d)) / math.sqrt(d)
    return rng.standard_normal((n, d)) @ mixing + shift


# ---------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------
def test_sqrtm_psd_squares_back_and_matches_scipy():
    a = correlated_features(50, 6, 0)
    cov = torch.as_tensor(np.cov(a, rowvar=False))
    root = sqrtm_psd(cov)
    torch.testing.assert_close(root @ root, cov, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(root.numpy(), scipy.linalg.sqrtm(cov.numpy()).real, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n_a,n_b,d", [(200, 300, 8), (40, 60, 16)])
def test_frechet_distance_matches_scipy_sqrtm(n_a, n_b, d):
    a = correlated_features(n_a, d, 1)
    b = correlated_features(n_b, d, 2, shift=0.3)
    assert frechet_distance(torch.as_tensor(a), torch.as_tensor(b)) == pytest.approx(scipy_frechet(a, b), rel=1e-6)


def test_frechet_distance_with_rank_deficient_covariances():
    # fewer samples than features, as with 300 digits in a wide feature space
    a = correlated_features(10, 30, 3)
    b = correlated_features(12, 30, 4)
    ours = frechet_distance(torch.as_tensor(a), torch.as_tensor(b))
    assert ours == pytest.approx(scipy_frechet(a, b), rel=1e-4)


def test_frechet_distance_of_a_set_to_itself_is_zero_and_it_is_symmetric():
    a = torch.as_tensor(correlated_features(100, 10, 5))
    b = torch.as_tensor(correlated_features(80, 10, 6, shift=-0.5))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 1.0


def test_frechet_distance_of_gaussians_has_its_closed_form():
    # identical covariances: the distance is the squared mean gap
    a = torch.as_tensor(correlated_features(500, 5, 7))
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    # covariances S and 4S: tr(S) + tr(4S) - 2 tr((4 S^2)^(1/2)) = tr(S)
    mean, cov = gaussian_statistics(a)
    scaled = metrics.frechet_distance_from_statistics(mean, cov, mean, 4 * cov)
    assert scaled == pytest.approx(float(torch.trace(cov)), rel=1e-9)


def test_frechet_distance_rejects_bad_input():
    a = torch.randn(20, 4)
    with pytest.raises(ValueError, match="features_b"):
        frechet_distance(a, torch.randn(20, 5))
    with pytest.raises(ValueError, match="features_a"):
        frechet_distance(torch.randn(20), a)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.randn(1, 4), a)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((5, 4), float("nan")), a)


# ---------------------------------------------------------------------------------------------
# sliced Wasserstein and energy distance
# ---------------------------------------------------------------------------------------------
def test_sliced_wasserstein_of_a_translation_is_its_expected_projection():
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([0.6, -0.8], dtype=torch.float64)
    assert sliced_wasserstein_distance(x, x) == 0.0
    # W2 of every 1-D projection is |shift . theta|; the mean of (shift . theta)^2 over the circle is |shift|^2 / 2
    got = sliced_wasserstein_distance(x, x + shift, num_projections=2000, seed=1)
    assert got == pytest.approx(1.0 / math.sqrt(2.0), rel=0.03)


def test_sliced_wasserstein_handles_unequal_sizes_and_is_seeded():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(500, 2, generator=g), torch.randn(700, 2, generator=g) + 1.0
    d1 = sliced_wasserstein_distance(x, y, seed=3)
    assert d1 == sliced_wasserstein_distance(x, y, seed=3)
    assert d1 == pytest.approx(sliced_wasserstein_distance(x, y[:500], seed=3), rel=0.15)
    with pytest.raises(ValueError, match="num_projections"):
        sliced_wasserstein_distance(x, y, num_projections=0)


def test_energy_distance_matches_scipy_in_one_dimension():
    g = np.random.default_rng(0)
    u, v = g.standard_normal(300), g.standard_normal(400) * 1.5 + 0.4
    ours = energy_distance(torch.as_tensor(u[:, None]), torch.as_tensor(v[:, None]))
    # scipy returns sqrt(2 E|X-Y| - E|X-X'| - E|Y-Y'|)
    assert ours == pytest.approx(scipy.stats.energy_distance(u, v) ** 2, rel=1e-9)
    assert energy_distance(torch.as_tensor(u[:, None]), torch.as_tensor(u[:, None])) == pytest.approx(0, abs=1e-12)


def test_toy_distances_separate_distributions_beyond_the_data_floor():
    from fastddpm.data import toy2d

    ref, fresh = toy2d("swiss_roll", 2000, seed=100), toy2d("swiss_roll", 2000, seed=101)
    other = toy2d("moons", 2000, seed=100)
    assert sliced_wasserstein_distance(other, ref) > 4 * sliced_wasserstein_distance(fresh, ref)
    assert energy_distance(other, ref) > 20 * energy_distance(fresh, ref)


# ---------------------------------------------------------------------------------------------
# digit classifier
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    # the same folder test_evaluation.py uses, so one pytest run trains the classifier once
    return tmp_path_factory.getbasetemp() / "fastddpm-classifier-cache"


@pytest.fixture(scope="module")
def digits():
    from fastddpm.data import load_digits

    return load_digits("train"), load_digits("test")


@pytest.fixture(scope="module")
def classifier(classifier_cache, digits):
    (train_x, train_y), _ = digits
    return load_digit_classifier(classifier_cache, images=train_x, labels=train_y)


def _blur(images):
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :]) / 16
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
    return torch.nn.functional.conv2d(padded, kernel[None, None])


def test_classifier_is_accurate_and_the_metric_separates_real_from_noise_and_blur(classifier, digits):
    (train_x, _), (test_x, test_y) = digits
    test_features, test_probs = classifier.embed(test_x)
    stats = metrics.classifier_statistics(test_probs, test_y)
    assert stats["accuracy"] > 0.95
    assert sum(stats["class_histogram"]) == test_x.shape[0]
    subset = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(0))[: test_x.shape[0]]
    floor = frechet_distance(classifier.embed(train_x[subset])[0], test_features)
    noise = torch.rand(test_x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise_fd = frechet_distance(classifier.embed(noise)[0], test_features)
    blur_fd = frechet_distance(classifier.embed(_blur(test_x))[0], test_features)
    assert blur_fd > 2 * floor
    assert noise_fd > 2 * blur_fd
    # noise is not recognised as digits with confidence
    noise_stats = metrics.classifier_statistics(classifier.embed(noise)[1])
    assert noise_stats["mean_max_probability"] < stats["mean_max_probability"]


def test_classifier_is_cached_and_reloaded_without_training(classifier, classifier_cache, digits, monkeypatch):
    (train_x, train_y), (test_x, _) = digits
    assert len(list(classifier_cache.glob("digit_classifier_*.pt"))) >= 1

    def refuse(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(metrics, "train_digit_classifier", refuse)
    reloaded = load_digit_classifier(classifier_cache, images=train_x, labels=train_y)
    torch.testing.assert_close(reloaded.embed(test_x[:20])[0], classifier.embed(test_x[:20])[0], rtol=0, atol=0)


def test_classifier_training_is_deterministic_and_cache_keys_follow_config_and_data(digits):
    (train_x, train_y), (test_x, _) = digits
    config = ClassifierConfig(epochs=1, width=8, feature_dim=16)
    a = metrics.train_digit_classifier(train_x[:300], train_y[:300], config)
    b = metrics.train_digit_classifier(train_x[:300], train_y[:300], config)
    torch.testing.assert_close(a.embed(test_x)[0], b.embed(test_x)[0], rtol=0, atol=0)
    digest = metrics._digest(train_x, train_y)
    assert config.key(digest) != ClassifierConfig(epochs=2, width=8, feature_dim=16).key(digest)
    assert config.key(digest) != config.key(metrics._digest(train_x[:-1], train_y[:-1]))


def test_classifier_rejects_bad_input(classifier):
    with pytest.raises(ValueError, match="images"):
        classifier.embed(torch.zeros(3, 1, 5, 5))
    with pytest.raises(ValueError, match="together"):
        load_digit_classifier(False, images=torch.zeros(3, 1, 8, 8))
    with pytest.raises(TypeError, match="config"):
        load_digit_classifier(False, config={"epochs": 1})


# ---------------------------------------------------------------------------------------------
# kernel distance (KID)
# ---------------------------------------------------------------------------------------------
def _mmd2_by_pairs(a: np.ndarray, b: np.ndarray) -> float:
    """The unbiased MMD^2 written out pair by pair (Binkowski et al. 2018, eq. 3)."""
    d = a.shape[1]
    k = lambda x, y: (float(x @ y) / d + 1.0) ** 3  # noqa: E731
    n, m = len(a), len(b)
    within_a = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    within_b = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    cross = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
    return within_a + within_b - 2 * cross


def test_kernel_distance_is_the_unbiased_mmd_of_all_pairs():
    a, b = correlated_features(23, 5, seed=1), correlated_features(31, 5, seed=2, shift=0.3)
    result = metrics.kernel_distance(a, b, num_subsets=4, seed=0)
    assert result.value == pytest.approx(_mmd2_by_pairs(a, b), rel=1e-10)
    # The value uses every pair: the seed of the jackknife's subsets changes only the error.
    other = metrics.kernel_distance(a, b, num_subsets=4, seed=5)
    assert other.value == pytest.approx(result.value, rel=1e-12)
    assert other.standard_error != result.standard_error
    assert metrics.kernel_distance(a, b, num_subsets=4, seed=0) == result


def _one_distribution(n, d, seed, shift=0.0):
    """n draws of one fixed correlated Gaussian (the mixing matrix does not depend on seed)."""
    mixing = np.random.default_rng(12345).standard_normal((d, d)) / math.sqrt(d)
    return np.random.default_rng(seed).standard_normal((n, d)) @ mixing + shift


def test_kernel_distance_is_unbiased_and_its_standard_error_matches_the_spread_of_repeats():
    """Over 300 independent pairs of samples of one distribution the mean value is 0 within its
    error (the biased V-statistic, with the diagonals, is positive: the check can fail), and the
    jackknife error of one draw matches the spread of the values over the repeats."""
    values, errors, biased = [], [], []
    for repeat in range(300):
        a = _one_distribution(40, 4, seed=2 * repeat)
        b = _one_distribution(60, 4, seed=2 * repeat + 1)
        result = metrics.kernel_distance(a, b, num_subsets=10, seed=repeat)
        values.append(result.value)
        errors.append(result.standard_error)
        kernel = lambda x, y: (x @ y.T / 4 + 1.0) ** 3  # noqa: E731
        biased.append(kernel(a, a).mean() + kernel(b, b).mean() - 2 * kernel(a, b).mean())
    spread = np.std(values)
    assert abs(np.mean(values)) < 3 * spread / math.sqrt(len(values))
    assert np.mean(biased) > 3 * spread / math.sqrt(len(values))
    # The jackknife errs on the large side for a U-statistic (Efron & Stein 1981); between equal
    # distributions, where the statistic is degenerate, by about 1.4x here (1.37 with these seeds,
    # 1.45-1.52 with others): a conservative error, never a small one.
    assert 1.0 * spread < np.sqrt(np.mean(np.square(errors))) < 1.7 * spread


def test_kernel_distance_separates_shifted_distributions():
    a = _one_distribution(200, 8, seed=3)
    same = metrics.kernel_distance(a, _one_distribution(200, 8, seed=4))
    shifted = metrics.kernel_distance(a, _one_distribution(200, 8, seed=4, shift=1.0))
    assert abs(same.value) < 3 * same.standard_error
    assert shifted.value > 5 * shifted.standard_error


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_subsets=1), "num_subsets"),
    (dict(num_subsets=True), "num_subsets"),
    (dict(num_subsets=8), "at least 16 samples"),
])
def test_kernel_distance_rejects_bad_input(kwargs, message):
    a, b = correlated_features(12, 3, seed=0), correlated_features(20, 3, seed=1)
    with pytest.raises(ValueError, match=message):
        metrics.kernel_distance(a, b, **kwargs)
    with pytest.raises(ValueError, match="same width"):
        metrics.kernel_distance(a, correlated_features(20, 4, seed=1))
    with pytest.raises(ValueError, match="NaN"):
        metrics.kernel_distance(np.full((12, 3), np.nan), b)
