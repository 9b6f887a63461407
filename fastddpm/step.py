"""The reverse step's rule, defined once.

The vocabularies (what a model predicts, which variance a step uses) and
:class:`StepSpec`, the small immutable description of one step that every path consumes: the
Triton launchers, the reference, :mod:`fastddpm.ops`, sampling, the schedulers, the losses and the
command line. A spec is validated when it is built, so nothing downstream checks it again.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

from .checks import check_choice, is_real

__all__ = ["PREDICTION_TYPES", "VARIANCE_TYPES", "LEARNED_VARIANCE_TYPES", "STEP_RULES", "StepRule", "StepSpec",
           "check_choice", "register_rule"]

# What the model predicts: the noise eps (Ho et al.), x_0 itself, or v = sqrt(ab) eps - sqrt(1 - ab) x_0
# (Salimans & Ho).
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# The reverse step's variance: fixed_small = the posterior variance beta~_t; fixed_small_log = the
# same through its clipped log; fixed_large = beta_t; learned: the model outputs the log-variance;
# learned_range: the model outputs v in [-1, 1] interpolating log beta~_t .. log beta_t (Nichol &
# Dhariwal). The learned ones append C variance channels to the model's C mean channels.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


@dataclasses.dataclass(frozen=True)
class StepRule:
    """What one update rule of the ops is, as every path needs to know it (one home, read through
    the spec: nothing compares a sampler's name).

    ``takes_eta``: the rule has a noise scale (DDIM's eta); ``always_noisy``: it adds noise whatever
    eta is (ancestral sampling); ``noise_at_last_index``: it also adds noise at the chain's last
    index (DDPM adds none there: the posterior at t = 0 is x_0); ``reads_model_variance``: it reads a
    learned variance from the model's extra channels (the others read only the mean channels)."""

    takes_eta: bool = False
    always_noisy: bool = False
    noise_at_last_index: bool = True
    reads_model_variance: bool = False


# The update rules the ops implement, by name: each registered by fastddpm.ops beside its op
# (register_rule), so that a new rule is declared where its op is. The samplers of the registry
# (fastddpm.samplers.SAMPLERS) each name the rule they step with; this layer knows neither.
STEP_RULES: Dict[str, StepRule] = {}


def register_rule(name: str, rule: StepRule) -> StepRule:
    """Declare the update rule ``name`` (an op's), once."""
    if name in STEP_RULES and STEP_RULES[name] != rule:
        raise ValueError(f"step rule {name!r} is already registered as {STEP_RULES[name]}")
    STEP_RULES[name] = rule
    return rule


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """One reverse step: sampler, prediction type, variance type, clipping of x_0 and DDIM's eta.

    ``clip_range=None`` leaves the predicted x_0 unclipped. ``variance_type`` also says whether the
    model's output carries variance channels (DDIM reads only the mean channels: its variance is
    ``eta`` times the posterior's).
    """

    sampler: str = "ddpm"
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_range: Optional[float] = 1.0
    eta: float = 0.0

    def __post_init__(self):
        check_choice("sampler", self.sampler, tuple(STEP_RULES))
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
        if self.clip_range is not None:
            if not (is_real(self.clip_range) and self.clip_range > 0):
                raise ValueError(f"clip_range must be a number > 0 (or None: no clipping), got {self.clip_range!r}")
            object.__setattr__(self, "clip_range", float(self.clip_range))
        if not (is_real(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a finite float >= 0, got {self.eta!r}")
        if not self.rule.takes_eta and self.eta != 0:
            takers = [name for name, rule in STEP_RULES.items() if rule.takes_eta]
            raise ValueError(f"eta applies to sampler={' or '.join(map(repr, takers))} only, got eta={self.eta} with "
                             f"sampler={self.sampler!r}")
        object.__setattr__(self, "eta", float(self.eta))

    @classmethod
    def build(cls, sampler: str = "ddpm", *, prediction_type: str = "epsilon", variance_type: str = "fixed_small",
              clip_denoised: bool = True, clip_range: float = 1.0, eta: float = 0.0) -> "StepSpec":
        """The spec of the public APIs' arguments (``clip_denoised`` and ``clip_range`` apart)."""
        if not isinstance(clip_denoised, bool):
            raise TypeError(f"clip_denoised must be a bool, got {type(clip_denoised).__name__}")
        spec = cls(sampler, prediction_type, variance_type, clip_range, eta)  # checks clip_range either way
        return spec if clip_denoised else dataclasses.replace(spec, clip_range=None)

    @property
    def rule(self) -> StepRule:
        return STEP_RULES[self.sampler]

    @property
    def adds_noise(self) -> bool:
        """Whether the step draws noise (DDPM: at every index but the chain's last; DDIM with
        eta > 0; DPM-Solver++ never)."""
        return self.rule.always_noisy or (self.rule.takes_eta and self.eta > 0)

    def draws_noise_at(self, index: int) -> bool:
        """Whether the step from chain index ``index`` adds noise (and a generator is drawn from)."""
        return self.adds_noise and (index > 0 or self.rule.noise_at_last_index)

    @property
    def learned_variance(self) -> bool:
        return self.variance_type in LEARNED_VARIANCE_TYPES

    @property
    def reads_model_variance(self) -> bool:
        """Whether the step reads the model's variance channels (DDPM with a learned variance)."""
        return self.rule.reads_model_variance and self.learned_variance

    def model_output_shape(self, sample_shape: Sequence[int]) -> Tuple[int, ...]:
        """The shape the model's output must have for samples of ``sample_shape`` [B, C, ...]."""
        shape = tuple(sample_shape)
        if self.learned_variance:
            if len(shape) < 2:
                raise ValueError(f"variance_type={self.variance_type!r} needs samples [B, C, ...], got shape {shape}")
            return (shape[0], 2 * shape[1]) + shape[2:]
        return shape
