"""NoiseSchedule against independent float64 derivations and against diffusers' schedulers."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastddpm import reference
from fastddpm.schedule import BETA_SCHEDULES, MIN_ALPHA_CUMPROD, TABLE_ROWS, NoiseSchedule, make_betas, table_row

T = 1000


# ---------------------------------------------------------------------------------------------
# betas of every named schedule, derived element by element with Python floats
# ---------------------------------------------------------------------------------------------
def linear_betas(n, start, end):
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def scaled_linear_betas(n, start, end):
    return [(math.sqrt(start) + (math.sqrt(end) - math.sqrt(start)) * i / (n - 1)) ** 2 for i in range(n)]


def cosine_betas(n, s=0.008, max_beta=0.999):
    # Nichol & Dhariwal eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2),
    # beta_t = 1 - alpha_bar(t + 1) / alpha_bar(t), capped at max_beta.
    def f(i):
        return math.cos((i / n + s) / (1 + s) * math.pi / 2) ** 2

    return [min(1 - f(i + 1) / f(i), max_beta) for i in range(n)]


def sigmoid_betas(n, start, end):
    return [start + (end - start) / (1 + math.exp(-(-6 + 12 * i / (n - 1)))) for i in range(n)]


INDEPENDENT_BETAS = {
    "linear": lambda n: linear_betas(n, 1e-4, 0.02),
    "scaled_linear": lambda n: scaled_linear_betas(n, 1e-4, 0.02),
    "quadratic": lambda n: scaled_linear_betas(n, 1e-4, 0.02),
    "cosine": lambda n: cosine_betas(n),
    "squaredcos_cap_v2": lambda n: cosine_betas(n),
    "sigmoid": lambda n: sigmoid_betas(n, 1e-4, 0.02),
}


@pytest.mark.parametrize("name", BETA_SCHEDULES)
@pytest.mark.parametrize("num_timesteps", [T, 37])
def test_named_betas_match_independent_formula(name, num_timesteps):
    betas = make_betas(name, num_timesteps, 1e-4, 0.02)
    assert betas.dtype == torch.float64 and betas.shape == (num_timesteps,)
    expected = torch.tensor(INDEPENDENT_BETAS[name](num_timesteps), dtype=torch.float64)
    # Both sides are float64; only the order of a handful of operations differs.
    torch.testing.assert_close(betas, expected, rtol=1e-12, atol=0)


def test_constructors_match_make_betas():
    assert torch.equal(NoiseSchedule.linear().betas, make_betas("linear"))
    assert torch.equal(NoiseSchedule.cosine().betas, make_betas("cosine"))
    assert torch.equal(NoiseSchedule.sigmoid().betas, make_betas("sigmoid"))
    assert torch.equal(NoiseSchedule.scaled_linear().betas, make_betas("scaled_linear", T, 0.00085, 0.012))
    # "quadratic" (an alias of scaled_linear): linear in sqrt(beta), spelled out here.
    root = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64)
    torch.testing.assert_close(NoiseSchedule.quadratic().betas, root**2, rtol=1e-14, atol=0)
    # Paper default: T = 1000, betas 1e-4 .. 0.02.
    paper = NoiseSchedule.linear()
    assert paper.num_timesteps == len(paper) == 1000
    assert paper.betas[0].item() == pytest.approx(1e-4, rel=1e-15)
    assert paper.betas[-1].item() == pytest.approx(0.02, rel=1e-15)


def test_cosine_is_capped():
    betas = make_betas("cosine", 1000)
    assert betas.max().item() == 0.999
    capped = make_betas("cosine", 1000, max_beta=0.5)
    assert capped.max().item() == 0.5


def test_user_betas():
    betas = [0.1, 0.2, 0.3]
    schedule = NoiseSchedule(betas)
    assert schedule.betas.dtype == torch.float64
    torch.testing.assert_close(schedule.alphas_cumprod, torch.tensor([0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7], dtype=torch.float64))
    assert torch.equal(schedule.timesteps, torch.arange(3))


# ---------------------------------------------------------------------------------------------
# against diffusers (float32 tables: state tolerance)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("diffusers_name, ours", [
    ("linear", "linear"), ("scaled_linear", "scaled_linear"), ("squaredcos_cap_v2", "cosine"), ("sigmoid", "sigmoid")])
@pytest.mark.parametrize("beta_start, beta_end", [(1e-4, 0.02), (0.00085, 0.012)])
def test_betas_match_diffusers(diffusers_name, ours, beta_start, beta_end):
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=diffusers_name,
                                     beta_start=beta_start, beta_end=beta_end)
    schedule = NoiseSchedule.from_name(ours, T, beta_start, beta_end)
    # diffusers computes and stores the tables in float32: betas differ by float32 rounding
    # (a few 1e-7 relative); alphas_cumprod is a float32 cumprod over 1000 factors, so its
    # relative error grows along the chain (up to ~1.5e-5 where cosine's alpha_bar is ~1e-8).
    # alphas = 1 - betas in float32 carries betas' absolute rounding (~3e-8 near beta = 0.999).
    torch.testing.assert_close(schedule.betas, theirs.betas.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(schedule.alphas, theirs.alphas.double(), rtol=1e-6, atol=6e-8)
    torch.testing.assert_close(schedule.alphas_cumprod, theirs.alphas_cumprod.double(), rtol=3e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# derived tables against per-element formulas
# ---------------------------------------------------------------------------------------------
def per_element_tables(betas):
    """Every derived table, element by element with Python floats (the DDPM paper's formulas)."""
    rows = {name: [] for name in TABLE_ROWS}
    rows.update(alphas=[], alphas_cumprod=[], alphas_cumprod_prev=[])
    alpha_bar_prev = 1.0
    posterior_variances = []
    for beta in betas:
        alpha = 1.0 - beta
        alpha_bar = alpha_bar_prev * alpha
        posterior_variances.append(beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar))  # beta-tilde, eq. 7
        rows["alphas"].append(alpha)
        rows["alphas_cumprod"].append(alpha_bar)
        rows["alphas_cumprod_prev"].append(alpha_bar_prev)
        rows["sqrt_alphas_cumprod"].append(math.sqrt(alpha_bar))
        rows["sqrt_one_minus_alphas_cumprod"].append(math.sqrt(1.0 - alpha_bar))
        rows["sqrt_recip_alphas_cumprod"].append(1.0 / math.sqrt(alpha_bar))
        rows["sqrt_recipm1_alphas_cumprod"].append(math.sqrt(1.0 / alpha_bar - 1.0))
        rows["posterior_mean_coef1"].append(math.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar))
        rows["posterior_mean_coef2"].append(math.sqrt(alpha) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
        rows["posterior_variance"].append(posterior_variances[-1])
        rows["log_betas"].append(math.log(beta))
        rows["sqrt_alphas_cumprod_prev"].append(math.sqrt(alpha_bar_prev))
        rows["one_minus_alphas_cumprod_prev"].append(1.0 - alpha_bar_prev)
        alpha_bar_prev = alpha_bar
    # beta-tilde_0 is 0; its log is clipped to beta-tilde_1 (the original DDPM code's choice).
    rows["posterior_log_variance_clipped"] = [math.log(posterior_variances[1])] + [math.log(v) for v in posterior_variances[1:]]
    # DPM-Solver++(2M) (Lu et al. 2022): lambda = log(alpha / sigma), h_t = lambda_{t-1} - lambda_t
    # (infinite into x_0 at t = 0), r_t = h_{t+1} / h_t; first order at t = T - 1 and t = 0.
    lam = [0.5 * math.log(ab / (1.0 - ab)) for ab in rows["alphas_cumprod"]]
    h = [math.inf] + [lam[t - 1] - lam[t] for t in range(1, len(lam))]
    rows["dpmpp_sigma_ratio"] = [math.sqrt((1.0 - prev) / (1.0 - ab))
                                 for ab, prev in zip(rows["alphas_cumprod"], rows["alphas_cumprod_prev"])]
    data = [math.sqrt(prev) * -math.expm1(-h_t) for prev, h_t in zip(rows["alphas_cumprod_prev"], h)]
    diff = [0.0] + [h[t] / (2.0 * h[t + 1]) for t in range(1, len(h) - 1)] + [0.0]  # 1 / (2 r)
    # x_{t-1} = ratio x_t + data (D0 + diff (D0 - D0_prev)): D0's and D0_prev's coefficients
    rows["dpmpp_x0_coef"] = [d * (1.0 + c) for d, c in zip(data, diff)]
    rows["dpmpp_prev_coef"] = [-d * c for d, c in zip(data, diff)]
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in rows.items()}


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid", "scaled_linear"])
def test_derived_tables_match_per_element_formulas(name):
    schedule = NoiseSchedule.from_name(name, T)
    expected = per_element_tables(schedule.betas.tolist())
    dpmpp = reference.dpmpp_coefficients(schedule)  # DPM-Solver++'s own rows live beside its reference
    for row, values in expected.items():
        actual = dpmpp[row] if row.startswith("dpmpp_") else getattr(schedule, row)
        assert actual.dtype == torch.float64, row
        # float64 on both sides; the cumulative product and 1 - alpha_bar near 0 (t = 0) amplify
        # rounding to ~1e-13 relative at most.
        torch.testing.assert_close(actual, values, rtol=1e-11, atol=0, msg=lambda m: f"{row}: {m}")


def test_posterior_is_bayes_rule_on_gaussians():
    """q(x_{t-1} | x_t, x_0) from q(x_{t-1} | x_0) = N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}) and
    q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t): precisions add, means weight by precision."""
    schedule = NoiseSchedule.cosine(200)
    for t in [1, 2, 57, 150, 199]:
        beta = schedule.betas[t].item()
        alpha_bar_prev = math.prod(1 - b for b in schedule.betas[:t].tolist())
        precision = 1.0 / (1.0 - alpha_bar_prev) + (1.0 - beta) / beta
        variance = 1.0 / precision
        coef_x0 = variance * math.sqrt(alpha_bar_prev) / (1.0 - alpha_bar_prev)
        coef_xt = variance * math.sqrt(1.0 - beta) / beta
        assert schedule.posterior_variance[t].item() == pytest.approx(variance, rel=1e-10)
        assert schedule.posterior_mean_coef1[t].item() == pytest.approx(coef_x0, rel=1e-10)
        assert schedule.posterior_mean_coef2[t].item() == pytest.approx(coef_xt, rel=1e-10)
    assert schedule.posterior_variance[0].item() == 0.0


def test_table_rows_and_cache():
    schedule = NoiseSchedule.linear(50)
    table = schedule.table("cpu", torch.float32)
    assert table.shape == (len(TABLE_ROWS), 50) and table.dtype == torch.float32 and table.is_contiguous()
    # Cached per (device, dtype): the same object comes back, a different dtype is another table.
    assert schedule.table("cpu", torch.float32) is table
    assert schedule.table(torch.device("cpu"), torch.float32) is table
    table64 = schedule.table("cpu", torch.float64)
    assert table64 is not table and schedule.table("cpu", torch.float64) is table64
    for name in TABLE_ROWS:
        assert torch.equal(table64[table_row(name)], getattr(schedule, name))
        assert torch.equal(table[table_row(name)], getattr(schedule, name).float())
        row = schedule.coefficient(name, "cpu", torch.float32)
        assert row.data_ptr() == table[table_row(name)].data_ptr()  # a view, not a copy


# ---------------------------------------------------------------------------------------------
# respacing
# ---------------------------------------------------------------------------------------------
# Respaced alpha_bars go through 1 - (1 - ratio) in float64, which loses ~eps64 / alpha_bar
# relative precision (alpha_bar_999 ~ 4e-5 for the linear schedule): 1e-10 relative covers it.
RESPACE_RTOL = 1e-10


def test_respace_keeps_alpha_bar_at_kept_steps():
    full = NoiseSchedule.linear()
    kept = [999, 0, 3, 250, 251, 700]  # any order is accepted
    respaced = full.respace(kept)
    order = sorted(kept)
    assert torch.equal(respaced.timesteps, torch.tensor(order))
    torch.testing.assert_close(respaced.alphas_cumprod, full.alphas_cumprod[order], rtol=RESPACE_RTOL, atol=0)
    # New betas come from the ratio of consecutive kept alpha_bars.
    ratios = [full.alphas_cumprod[order[0]].item()] + [
        full.alphas_cumprod[b].item() / full.alphas_cumprod[a].item() for a, b in zip(order, order[1:])]
    torch.testing.assert_close(respaced.betas, 1 - torch.tensor(ratios, dtype=torch.float64), rtol=1e-10, atol=0)


@settings(max_examples=25, deadline=None)
@given(kept=st.sets(st.integers(0, 199), min_size=1, max_size=40), name=st.sampled_from(["linear", "cosine", "sigmoid"]))
def test_respace_random_subsets(kept, name):
    full = NoiseSchedule.from_name(name, 200)
    order = sorted(kept)
    respaced = full.respace(order)
    assert respaced.timesteps.tolist() == order
    torch.testing.assert_close(respaced.alphas_cumprod, full.alphas_cumprod[order], rtol=RESPACE_RTOL, atol=0)
    assert ((respaced.betas > 0) & (respaced.betas <= 1)).all()
    # every derived table stays finite and the posterior variance lies between 0 and beta
    assert torch.isfinite(respaced.posterior_log_variance_clipped).all()
    assert (respaced.posterior_variance <= respaced.betas).all() and (respaced.posterior_variance >= 0).all()


def test_respace_of_full_set_is_identity():
    full = NoiseSchedule.cosine(300)
    same = full.respace(range(300))
    assert torch.equal(same.timesteps, full.timesteps)
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        # Betas are recomputed as 1 - alpha_bar_t / alpha_bar_{t-1}: float64 rounding only.
        torch.testing.assert_close(getattr(same, name), getattr(full, name), rtol=1e-9, atol=1e-15)


def test_respace_of_respaced_maps_back_to_trained_chain():
    full = NoiseSchedule.linear()
    coarse = full.respace(range(0, 1000, 10))
    finer = coarse.respace([0, 5, 99])
    assert finer.timesteps.tolist() == [0, 50, 990]
    torch.testing.assert_close(finer.alphas_cumprod, full.alphas_cumprod[[0, 50, 990]], rtol=RESPACE_RTOL, atol=0)


@pytest.mark.parametrize("num_steps", [1, 2, 10, 50, 999, 1000])
def test_respace_evenly_keeps_last_step(num_steps):
    full = NoiseSchedule.linear()
    respaced = full.respace_evenly(num_steps)
    steps = respaced.timesteps
    assert len(respaced) == num_steps
    assert steps[-1].item() == 999
    assert (steps[1:] > steps[:-1]).all()
    if num_steps > 1:
        assert steps[0].item() == 0
        gaps = (steps[1:] - steps[:-1]).float()
        assert gaps.max() - gaps.min() <= 1  # evenly spread
    torch.testing.assert_close(respaced.alphas_cumprod, full.alphas_cumprod[steps], rtol=RESPACE_RTOL, atol=0)


@pytest.mark.parametrize("timesteps, match", [
    ([], "empty"), ([0, 1000], r"\[0, 999\]"), ([-1, 3], r"\[0, 999\]"), ([3, 5, 3], "repeat")])
def test_respace_bad_arguments(timesteps, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.linear().respace(timesteps)


@pytest.mark.parametrize("num_steps", [0, 1001, -3, 2.0, "10"])
def test_respace_evenly_bad_arguments(num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        NoiseSchedule.linear().respace_evenly(num_steps)


def test_final_alpha_cumprod_makes_first_step_empty():
    """DDIM's set_alpha_to_one=False: the step from index 0 goes to alpha_bar_0 itself, so it has
    no variance and its mean is x_t."""
    full = NoiseSchedule.linear()
    respaced = full.respace(range(0, 1000, 100), final_alpha_cumprod=full.alphas_cumprod[0].item())
    assert respaced.alphas_cumprod_prev[0].item() == full.alphas_cumprod[0].item()
    assert respaced.posterior_variance[0].item() == 0.0
    assert respaced.posterior_mean_coef1[0].item() == 0.0
    assert respaced.posterior_mean_coef2[0].item() == pytest.approx(1.0, rel=1e-12)
    # Later steps are untouched by final_alpha_cumprod.
    plain = full.respace(range(0, 1000, 100))
    for name in ("posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        assert torch.equal(getattr(respaced, name)[1:], getattr(plain, name)[1:])


# ---------------------------------------------------------------------------------------------
# bad construction
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("betas", [[], [[0.1, 0.2]], [0.0, 0.1], [0.1, 1.5], [0.1, float("nan")], [-0.1]])
def test_bad_betas(betas):
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule(betas)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="timesteps"):
        NoiseSchedule([0.1, 0.2], timesteps=[0])
    with pytest.raises(ValueError, match="final_alpha_cumprod"):
        NoiseSchedule([0.1, 0.2], final_alpha_cumprod=0.0)
    with pytest.raises(ValueError, match="final_alpha_cumprod"):
        NoiseSchedule([0.1, 0.2], final_alpha_cumprod=0.5)  # below alphas_cumprod[0] = 0.9
    with pytest.raises(ValueError, match="beta_schedule"):
        make_betas("exponential", 10)
    with pytest.raises(ValueError, match="num_timesteps"):
        make_betas("linear", 0)


def test_respace_keeps_tiny_alpha_bar_finite():
    """An alpha_bar below ~1e-16 must survive respacing (1 - alpha_bar rounds to 1 in float64)."""
    schedule = NoiseSchedule.linear(1000, beta_end=0.1)
    assert schedule.alphas_cumprod[999] < 1e-16
    respaced = schedule.respace([500, 999])
    assert torch.equal(respaced.alphas_cumprod, schedule.alphas_cumprod[[500, 999]])
    for name in ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
                 "posterior_mean_coef2", "posterior_variance"):
        assert torch.isfinite(getattr(respaced, name)).all(), name


# ---------------------------------------------------------------------------------------------
# from_alphas_cumprod: a schedule of given alpha_bar values (diffusers' float32 table)
# ---------------------------------------------------------------------------------------------
def test_from_alphas_cumprod_recovers_the_betas_of_its_alpha_bar():
    betas = NoiseSchedule.cosine(300).betas
    given = NoiseSchedule.from_alphas_cumprod(torch.cumprod(1 - betas, 0))
    # betas come back as 1 - alpha_bar_t / alpha_bar_{t-1}: float64 rounding of the ratio only
    # (relative ~1e-16 / beta, ~1e-12 at the smallest cosine beta 4e-5)
    torch.testing.assert_close(given.betas, betas, rtol=1e-10, atol=0)
    expected = per_element_tables(betas.tolist())
    for row in ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance", "sqrt_recipm1_alphas_cumprod"):
        torch.testing.assert_close(getattr(given, row), expected[row], rtol=1e-10, atol=0, msg=lambda m: f"{row}: {m}")
    assert given.coefficient_dtype == torch.float64


def test_from_alphas_cumprod_keeps_values_as_given():
    values = torch.tensor([0.9, 0.5, 0.25, 1e-3], dtype=torch.float32)
    schedule = NoiseSchedule.from_alphas_cumprod(values)
    assert torch.equal(schedule.alphas_cumprod, values.double())  # widened exactly, not re-multiplied
    assert schedule.alphas_cumprod_prev.tolist() == [1.0] + values.double().tolist()[:-1]


def test_zero_terminal_alpha_bar_is_raised_to_the_floor():
    # A zero-SNR schedule ends on alpha_bar = 0; 1 / sqrt(alpha_bar) must stay finite, and exactly a
    # power of two so that x_0 = 2**63 (x_t - eps) keeps the sign of x_t - eps.
    schedule = NoiseSchedule.from_alphas_cumprod([0.9, 0.3, 0.0])
    assert schedule.alphas_cumprod[-1].item() == MIN_ALPHA_CUMPROD == 2.0 ** -126
    table = schedule.table("cpu", torch.float32)
    assert table[table_row("sqrt_recip_alphas_cumprod"), -1].item() == 2.0 ** 63
    assert table[table_row("sqrt_recipm1_alphas_cumprod"), -1].item() == 2.0 ** 63
    assert table[table_row("sqrt_alphas_cumprod"), -1].item() == 2.0 ** -63
    assert schedule.betas[-1].item() == 1.0
    assert torch.isfinite(table).all()


@pytest.mark.parametrize("values, match", [
    ([0.9, 0.9, 0.5], "alphas_cumprod\\[1\\]"),     # a step with beta = 0
    ([1.0, 0.5], "alphas_cumprod\\[0\\]"),          # beta_0 = 0
    ([0.5, 0.0, 0.0], "alphas_cumprod\\[2\\]"),     # two zeros: equal once floored
    ([0.9, 1.5], "\\[0, 1\\]"),
    ([0.9, float("nan")], "\\[0, 1\\]"),
    ([[0.9, 0.5]], "1-D"),
])
def test_from_alphas_cumprod_refuses_values_that_do_not_decrease(values, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_alphas_cumprod(values)


# ---------------------------------------------------------------------------------------------
# coefficient_dtype=float32: the coefficients as diffusers derives them in its steps
# ---------------------------------------------------------------------------------------------
def float32_step_coefficients(alpha_bar, alpha_bar_prev):
    """One index's coefficients with numpy float32 scalars, each operation rounded to float32."""
    f = np.float32
    a, p = f(alpha_bar), f(alpha_bar_prev)
    step_alpha = a / p
    step_beta = f(1) - step_alpha
    variance = (f(1) - p) / (f(1) - a) * step_beta
    with np.errstate(divide="ignore"):  # log(0) at DDIM's empty first step, skipped by the caller
        log_beta = np.log(step_beta)
    return {
        "posterior_mean_coef1": np.sqrt(p) * step_beta / (f(1) - a),
        "posterior_mean_coef2": np.sqrt(step_alpha) * (f(1) - p) / (f(1) - a),
        "posterior_variance": variance,
        "log_betas": log_beta,
        "sqrt_one_minus_alphas_cumprod": np.sqrt(f(1) - a),
        "sqrt_alphas_cumprod_prev": np.sqrt(p),
        "one_minus_alphas_cumprod_prev": f(1) - p,
    }


@pytest.mark.parametrize("final_alpha_cumprod", [1.0, None])
def test_float32_coefficients_match_a_per_element_float32_derivation(final_alpha_cumprod):
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), 0)
    final = alpha_bar[0].item() if final_alpha_cumprod is None else final_alpha_cumprod
    schedule = NoiseSchedule.from_alphas_cumprod(alpha_bar, coefficient_dtype=torch.float32)
    respaced = schedule.respace([0, 1, 2, 500, 999], final_alpha_cumprod=final)
    assert respaced.coefficient_dtype == torch.float32
    table = respaced.table("cpu", torch.float32)
    kept = [0, 1, 2, 500, 999]
    for i, t in enumerate(kept):
        prev = alpha_bar[kept[i - 1]].item() if i > 0 else final
        for row, value in float32_step_coefficients(alpha_bar[t].item(), prev).items():
            if i == 0 and row == "log_betas" and final != 1.0:
                continue  # log(0): DDIM's empty first step (set_alpha_to_one=False) has no noise
            actual = table[table_row(row), i].item()
            # numpy's and torch's float32 sqrt / log may round the last bit differently
            assert actual == pytest.approx(float(value), rel=2.5e-7, abs=0), (row, t)


def test_float32_coefficients_differ_from_float64_where_float32_cancels():
    # At t = 1, 1 - alpha_bar_1 / alpha_bar_0 loses ~12 bits in float32: the two derivations of the
    # same alpha_bar values differ there by ~1e-4 relative (measured 1.0e-4), and by a few float32
    # ulps late in the chain (measured <= 2.7e-6 over t >= 500).
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), 0)
    exact = NoiseSchedule.from_alphas_cumprod(alpha_bar)
    as_diffusers = NoiseSchedule.from_alphas_cumprod(alpha_bar, coefficient_dtype=torch.float32)
    relative = (as_diffusers.posterior_mean_coef1 / exact.posterior_mean_coef1 - 1).abs()
    assert 3e-5 < relative[1].item() < 1e-3
    assert relative[500:].max().item() < 1e-5


def test_bad_coefficient_dtype():
    with pytest.raises(ValueError, match="coefficient_dtype"):
        NoiseSchedule([0.1, 0.2], coefficient_dtype=torch.float16)
