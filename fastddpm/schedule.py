"""Noise schedules: betas and every table derived from them, computed once in float64.

Every code path (reference math, Triton kernels, schedulers, training, evaluation) reads its
coefficients from a :class:`NoiseSchedule`; nothing recomputes them elsewhere.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Hashable, Optional, Sequence, Union

import torch

__all__ = ["NoiseSchedule", "make_betas", "BETA_SCHEDULES", "TABLE_ROWS", "table_row", "MIN_ALPHA_CUMPROD"]

BETA_SCHEDULES = ("linear", "scaled_linear", "quadratic", "cosine", "squaredcos_cap_v2", "sigmoid")

# Rows of the packed per-timestep table that kernels gather from (one row per coefficient).
TABLE_ROWS = (
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "log_betas",
    "sqrt_alphas_cumprod_prev",
    "one_minus_alphas_cumprod_prev",
)


# The smallest alpha_bar that NoiseSchedule.from_alphas_cumprod keeps (the smallest normal float32).
# A zero-terminal-SNR schedule (Lin et al. 2023) ends on alpha_bar = 0, where the x_0 of an epsilon
# prediction, sqrt(1/alpha_bar) x_t - sqrt(1/alpha_bar - 1) eps, is inf - inf = NaN wherever x_t and
# eps share a sign. At 2**-126 both factors are exactly 2**63 (in float64 and float32 tables), so
# x_0 is 2**63 (x_t - eps): finite, of the sign diffusers' division by 0 gives, and clipped to the
# same +-clip_range; a v prediction's x_0, sqrt(alpha_bar) x_t - v, moves by 2**-63 |x_t|.
MIN_ALPHA_CUMPROD = 2.0 ** -126
# The dtypes NoiseSchedule derives its per-step coefficients in.
COEFFICIENT_DTYPES = (torch.float64, torch.float32)


def table_row(name: str) -> int:
    """Index of a coefficient in the packed table returned by :meth:`NoiseSchedule.table`."""
    return TABLE_ROWS.index(name)


def _betas_for_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float) -> torch.Tensor:
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    ab = alpha_bar(steps)
    betas = 1.0 - ab[1:] / ab[:-1]
    return betas.clamp(max=max_beta)


def make_betas(
    name: str,
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    *,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """Betas (float64) of a named schedule.

    ``linear`` is the DDPM paper's default (1e-4 to 0.02 over T=1000); ``scaled_linear`` (alias
    ``quadratic``) is linear in sqrt(beta); ``cosine`` (alias diffusers' ``squaredcos_cap_v2``) is
    Nichol & Dhariwal's alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2) with betas capped at
    ``max_beta``; ``sigmoid`` follows GeoDiff / diffusers (sigmoid of linspace(-6, 6)).
    """
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    if name == "linear":
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    elif name in ("scaled_linear", "quadratic"):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    elif name in ("cosine", "squaredcos_cap_v2"):
        betas = _betas_for_alpha_bar(
            num_timesteps,
            lambda u: torch.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2,
            max_beta,
        )
    elif name == "sigmoid":
        ramp = torch.linspace(-6, 6, num_timesteps, dtype=torch.float64)
        betas = torch.sigmoid(ramp) * (beta_end - beta_start) + beta_start
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {name!r}")
    return betas


class NoiseSchedule:
    """A DDPM noise schedule and its derived tables (all float64, on the CPU).

    ``timesteps[i]`` is the timestep of the *trained* chain that index ``i`` of this schedule
    stands for: ``arange(T)`` for a full schedule, a subsequence after :meth:`respace`. Models
    are called with ``timesteps[i]``; tables are indexed by ``i``.
    """

    def __init__(
        self,
        betas: Union[torch.Tensor, Sequence[float]],
        timesteps: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        *,
        final_alpha_cumprod: float = 1.0,
        alphas_cumprod: Optional[Union[torch.Tensor, Sequence[float]]] = None,
        coefficient_dtype: torch.dtype = torch.float64,
    ):
        """``alphas_cumprod``, when given, is used as is instead of the cumulative product of
        ``1 - betas``: :meth:`respace` passes the kept alpha_bar through, because rebuilding it
        from betas that round to 1 would turn an alpha_bar below ~1e-16 into 0.

        ``coefficient_dtype=torch.float32`` derives the coefficients a reverse step reads from
        alpha_bar_t and alpha_bar_{t-1} in float32 arithmetic, operation for operation as
        diffusers' DDPM / DDIM schedulers derive them in each step from their float32 alpha_bar
        (which ``alphas_cumprod`` then holds): their rounding included, so that a step reproduces
        diffusers' to the kernels' rounding (see :meth:`_derive_as_diffusers`). float64 (the
        default) is the accurate choice and what fastddpm's own sampler uses."""
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas > 1).any():
            raise ValueError("betas must all lie in (0, 1]")
        num_timesteps = betas.numel()
        if timesteps is None:
            timesteps = torch.arange(num_timesteps, dtype=torch.int64)
        timesteps = torch.as_tensor(timesteps, dtype=torch.int64).detach().cpu().clone()
        if timesteps.shape != betas.shape:
            raise ValueError(
                f"timesteps must have one entry per beta ({num_timesteps}), got shape {tuple(timesteps.shape)}"
            )
        if not (0.0 < final_alpha_cumprod <= 1.0):
            raise ValueError(f"final_alpha_cumprod must lie in (0, 1], got {final_alpha_cumprod}")
        if coefficient_dtype not in COEFFICIENT_DTYPES:
            raise ValueError(f"coefficient_dtype must be one of {COEFFICIENT_DTYPES}, got {coefficient_dtype!r}")
        self.coefficient_dtype = coefficient_dtype
        self.num_timesteps = num_timesteps
        self.timesteps = timesteps
        self.final_alpha_cumprod = float(final_alpha_cumprod)

        self.betas = betas
        self.alphas = 1.0 - betas
        if alphas_cumprod is None:
            self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        else:
            self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().clone()
            if self.alphas_cumprod.shape != betas.shape:
                raise ValueError(f"alphas_cumprod must have one entry per beta ({num_timesteps}), "
                                 f"got shape {tuple(self.alphas_cumprod.shape)}")
            if (self.alphas_cumprod < 0).any() or (self.alphas_cumprod > 1).any():
                raise ValueError("alphas_cumprod must all lie in [0, 1]")
        # alpha_bar_{t-1}; at the first index this is the "previous" of x_0 (1 for DDPM; DDIM
        # schedulers may set it to alphas_cumprod[0] through final_alpha_cumprod).
        self.alphas_cumprod_prev = torch.cat(
            [torch.tensor([self.final_alpha_cumprod], dtype=torch.float64), self.alphas_cumprod[:-1]]
        )
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log1p(-self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        self.sqrt_alphas_cumprod_prev = self.alphas_cumprod_prev.sqrt()
        self.one_minus_alphas_cumprod_prev = 1.0 - self.alphas_cumprod_prev
        self.sqrt_recip_alphas = (1.0 / self.alphas).sqrt()
        self.log_betas = betas.log()

        # Beta of the step from each index to the one before it: betas[i], except at index 0 when
        # final_alpha_cumprod < 1, where the step goes from alphas_cumprod[0] to final_alpha_cumprod
        # (1 - their ratio; 0 when they are equal, as in DDIM with set_alpha_to_one=False).
        step_betas = betas.clone()
        if self.final_alpha_cumprod != 1.0:
            first_ratio = self.alphas_cumprod[0] / self.final_alpha_cumprod
            if first_ratio > 1.0 + 1e-12:
                raise ValueError(f"final_alpha_cumprod must be >= alphas_cumprod[0] ({self.alphas_cumprod[0].item()}), "
                                 f"got {self.final_alpha_cumprod}")
            step_betas[0] = (1.0 - first_ratio).clamp_min(0.0)

        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance).
        self.posterior_variance = step_betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The variance is 0 at the first index; its log is clipped to the next value (as in the
        # original DDPM code) so that learned_range interpolation and the bound stay finite.
        clip_from = self.posterior_variance[1] if num_timesteps > 1 else self.betas[0]
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([clip_from.reshape(1), self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = step_betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * (1.0 - step_betas).sqrt() / (1.0 - self.alphas_cumprod)

        # A beta of 1 makes alpha_bar 0 from its index on: there x_t is pure noise and x_0 cannot
        # be recovered from a noise prediction (see check_prediction_type).
        zero = (self.alphas_cumprod == 0).nonzero()
        self.first_zero_alpha_bar: Optional[int] = int(zero[0, 0]) if zero.numel() else None

        if coefficient_dtype == torch.float32:
            self._derive_as_diffusers()
        self._device_cache: Dict[Hashable, torch.Tensor] = {}

    def check_prediction_type(self, prediction_type: str) -> None:
        """Raise ``ValueError`` if a reverse step of this schedule is undefined for a model that
        predicts ``prediction_type``: where alpha_bar is 0 (a beta of 1), x_0 = (x_t - sqrt(1 -
        alpha_bar) eps) / sqrt(alpha_bar) divides by zero. ``v_prediction`` and ``sample`` stay
        defined there."""
        index = self.first_zero_alpha_bar
        if index is not None and prediction_type == "epsilon":
            raise ValueError(
                f"schedule: beta = 1 at index {index} (timestep {int(self.timesteps[index])}) makes alpha_bar 0, "
                "where x_0 cannot be recovered from a noise prediction (prediction_type='epsilon'); expected "
                "betas below 1, or prediction_type 'v_prediction' or 'sample'")

    def _derive_as_diffusers(self) -> None:
        """Replace the per-step coefficients by their float32 derivation from alpha_bar_t (a) and
        alpha_bar_{t-1} (p), in the order of operations of diffusers' DDPM/DDIM steps. In float32,
        1 - a and a / p cancel early in the chain (a ~ p ~ 1): their rounding moves the posterior
        coefficients by up to ~2e-4 (relative) at t = 2, and a sampler matching diffusers'
        numbers must carry the same rounding. Kept widened to float64 (exactly)."""
        f32 = torch.float32
        a, p = self.alphas_cumprod.to(f32), self.alphas_cumprod_prev.to(f32)
        one_minus_a, one_minus_p = 1 - a, 1 - p
        step_alpha = a / p
        step_beta = 1 - step_alpha
        sqrt_a = a ** 0.5
        variance = one_minus_p / one_minus_a * step_beta
        rows = {
            "sqrt_alphas_cumprod": sqrt_a,
            "sqrt_one_minus_alphas_cumprod": one_minus_a ** 0.5,
            # diffusers divides by sqrt(a) where the kernels multiply by these quotients.
            "sqrt_recip_alphas_cumprod": 1.0 / sqrt_a.double(),
            "sqrt_recipm1_alphas_cumprod": (one_minus_a ** 0.5).double() / sqrt_a.double(),
            "posterior_mean_coef1": p ** 0.5 * step_beta / one_minus_a,
            "posterior_mean_coef2": step_alpha ** 0.5 * one_minus_p / one_minus_a,
            "posterior_variance": variance,
            # diffusers floors the variance at 1e-20 before its log; the first index keeps its
            # convention (the next index's value), as in float64.
            "posterior_log_variance_clipped": torch.log(torch.cat(
                [variance[1:2] if len(variance) > 1 else variance[:1], variance[1:]]).clamp_min(1e-20)),
            "log_betas": torch.log(step_beta),
            "sqrt_alphas_cumprod_prev": p ** 0.5,
            "one_minus_alphas_cumprod_prev": one_minus_p,
        }
        for name, value in rows.items():
            setattr(self, name, value.to(f32).to(torch.float64))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_name(
        cls,
        name: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        **kwargs,
    ) -> "NoiseSchedule":
        return cls(make_betas(name, num_timesteps, beta_start, beta_end, **kwargs))

    @classmethod
    def from_alphas_cumprod(
        cls,
        alphas_cumprod: Union[torch.Tensor, Sequence[float]],
        *,
        final_alpha_cumprod: float = 1.0,
        coefficient_dtype: torch.dtype = torch.float64,
        timesteps=None,
    ) -> "NoiseSchedule":
        """Schedule whose alpha_bar is ``alphas_cumprod`` as given (e.g. diffusers' float32 table,
        widened to float64 exactly), values below :data:`MIN_ALPHA_CUMPROD` raised to it.

        Each beta is 1 - alpha_bar_t / alpha_bar_{t-1} (alpha_bar_{-1} = 1), the beta a step from
        t to t - 1 implies; so the posterior's coefficients are the ones a sampler working from
        these alpha_bar values computes, not those of betas that would round to them.
        ``coefficient_dtype`` and ``timesteps`` (the model's timestep of each index; default the
        indices) as in the constructor.
        """
        values = torch.as_tensor(alphas_cumprod).detach().to(device="cpu", dtype=torch.float64)
        if values.ndim != 1 or values.numel() < 1:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D sequence, got shape {tuple(values.shape)}")
        if not torch.isfinite(values).all() or (values < 0).any() or (values > 1).any():
            raise ValueError("alphas_cumprod must all lie in [0, 1]")
        values = values.clamp_min(MIN_ALPHA_CUMPROD)
        previous = torch.cat([torch.ones(1, dtype=torch.float64), values[:-1]])
        if (values >= previous).any():
            first = int((values >= previous).nonzero()[0, 0])
            raise ValueError(f"alphas_cumprod must decrease strictly from below 1 (every beta > 0); "
                             f"alphas_cumprod[{first}] = {values[first].item()!r} does not")
        return cls(1.0 - values / previous, timesteps, final_alpha_cumprod=final_alpha_cumprod, alphas_cumprod=values,
                   coefficient_dtype=coefficient_dtype)

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        return cls.from_name("linear", num_timesteps, beta_start, beta_end)

    @classmethod
    def scaled_linear(cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> "NoiseSchedule":
        return cls.from_name("scaled_linear", num_timesteps, beta_start, beta_end)

    quadratic = scaled_linear

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        return cls(make_betas("cosine", num_timesteps, cosine_s=s, max_beta=max_beta))

    @classmethod
    def sigmoid(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        return cls.from_name("sigmoid", num_timesteps, beta_start, beta_end)

    # ------------------------------------------------------------------ respacing
    def respace(self, timesteps: Union[torch.Tensor, Sequence[int]], *, final_alpha_cumprod: float = 1.0) -> "NoiseSchedule":
        """Schedule of a subsequence of this schedule's indices (for fewer-step / DDIM sampling).

        ``timesteps`` are indices into *this* schedule, any order, no repeats. The new betas
        come from the ratio of consecutive alphas_cumprod, so that alpha_bar at every kept step
        is unchanged; the new schedule's ``timesteps`` map back to the trained chain.
        """
        idx = torch.as_tensor(timesteps, dtype=torch.int64).detach().cpu().reshape(-1)
        if idx.numel() < 1:
            raise ValueError("timesteps must not be empty")
        if idx.min() < 0 or idx.max() >= self.num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}], got range "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        idx = torch.sort(idx).values
        if (idx[1:] == idx[:-1]).any():
            raise ValueError("timesteps must not repeat")
        kept = self.alphas_cumprod[idx]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
        return NoiseSchedule(1.0 - kept / prev, self.timesteps[idx], final_alpha_cumprod=final_alpha_cumprod,
                             alphas_cumprod=kept, coefficient_dtype=self.coefficient_dtype)

    def respace_evenly(self, num_steps: int) -> "NoiseSchedule":
        """Respace to ``num_steps`` indices spread evenly over the chain, always keeping the last."""
        if not isinstance(num_steps, int) or not (1 <= num_steps <= self.num_timesteps):
            raise ValueError(f"num_steps must be an int in [1, {self.num_timesteps}], got {num_steps!r}")
        if num_steps == self.num_timesteps:
            return self
        if num_steps == 1:  # linspace(0, T - 1, 1) would keep only the first index
            return self.respace([self.num_timesteps - 1])
        idx = torch.linspace(0, self.num_timesteps - 1, num_steps, dtype=torch.float64).round().to(torch.int64)
        return self.respace(idx)

    # ------------------------------------------------------------------ device tables
    def table(self, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Packed ``[len(TABLE_ROWS), T]`` table on ``device``, cached per (device, dtype)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (device, dtype)
        cached = self._device_cache.get(key)
        if cached is None:
            packed = torch.stack([getattr(self, name) for name in TABLE_ROWS])
            cached = packed.to(device=device, dtype=dtype).contiguous()
            self._device_cache[key] = cached
        return cached

    def derived(self, key: Hashable, derive: Callable[["NoiseSchedule"], Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Coefficients of a solver of its own on this chain (UniPC's, ...): ``derive(self)``, float64
        rows of length T by name, computed once per ``key`` (the solver and its settings) and kept.
        The rows every sampler shares are attributes and :data:`TABLE_ROWS`; a solver's own live
        beside its reference (``fastddpm.reference``) and reach the chain only through here."""
        cache = self.__dict__.setdefault("_derived_cache", {})
        rows = cache.get(key)
        if rows is None:
            rows = cache[key] = {name: value.to(torch.float64) for name, value in derive(self).items()}
        return rows

    def derived_table(self, key: Hashable, derive: Callable[["NoiseSchedule"], Dict[str, torch.Tensor]],
                      rows: Sequence[str], device: Union[str, torch.device] = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """:meth:`derived` packed ``[len(rows), T]`` in the order of ``rows`` on ``device`` (the
        kernels' second table), cached per (key, device, dtype) like :meth:`table`."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        cache_key = (key, tuple(rows), device, dtype)
        cached = self._device_cache.get(cache_key)
        if cached is None:
            values = self.derived(key, derive)
            cached = torch.stack([values[name] for name in rows]).to(device=device, dtype=dtype).contiguous()
            self._device_cache[cache_key] = cached
        return cached

    def coefficient(self, name: str, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One row of :meth:`table` (a view, no copy)."""
        return self.table(device, dtype)[table_row(name)]

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        respaced = "" if torch.equal(self.timesteps, torch.arange(self.num_timesteps)) else ", respaced"
        return (f"NoiseSchedule(T={self.num_timesteps}, beta[0]={self.betas[0].item():.3g}, "
                f"beta[-1]={self.betas[-1].item():.3g}{respaced})")


def as_schedule(schedule) -> NoiseSchedule:
    """Accept a NoiseSchedule, a schedule name, or a sequence of betas."""
    if schedule is None:
        return NoiseSchedule.linear()
    if isinstance(schedule, NoiseSchedule):
        return schedule
    if isinstance(schedule, str):
        return NoiseSchedule.from_name(schedule)
    if isinstance(schedule, (torch.Tensor, list, tuple)):
        return NoiseSchedule(schedule)
    raise TypeError(f"schedule must be a NoiseSchedule, a schedule name or a sequence of betas, got {type(schedule).__name__}")
