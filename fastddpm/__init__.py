"""fastddpm: Denoising Diffusion Probabilistic Models with the sampling hot path in Triton."""
import importlib

from .ops import ddim_step, ddpm_step, q_sample, timestep_embedding
from .schedule import NoiseSchedule, make_betas

__version__ = "0.1.0"

# Heavier parts import on first use, so that ``import fastddpm`` stays cheap.
_LAZY = {
    "sample": "sampling",
    "DDPMScheduler": "schedulers",
    "DDIMScheduler": "schedulers",
    "DPMSolverMultistepScheduler": "schedulers",
    "UNet": "models",
    "MLPDenoiser": "models",
    "create_model": "models",
    "train": "training",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "load_pretrained": "checkpoint",
    "variational_bound": "evaluation",
    "accelerate": "pipelines",
    "AcceleratedPipeline": "pipelines",
    "auto_batch_size": "acceleration",
}

__all__ = ["NoiseSchedule", "make_betas", "q_sample", "ddpm_step", "ddim_step", "timestep_embedding", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastddpm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
