"""Noise-prediction networks: the DDPM paper's UNet and a small MLP for 2-D toy data.

Every model is called as ``model(x, t)`` with ``t`` an int64 tensor [B] of *trained* timesteps
and returns a tensor shaped like ``x`` (twice the channels with learned variance). Each model
keeps the keyword arguments it was built with in ``model.config`` (plus ``"architecture"``), so
that :func:`model_from_config` rebuilds it from a checkpoint.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .checks import check_int

__all__ = ["UNet", "MLPDenoiser", "PRESETS", "create_model", "model_from_config", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (works on the meta device too)."""
    return sum(p.numel() for p in model.parameters())


def _broadcast_timesteps(t, batch: int, device: torch.device) -> torch.Tensor:
    """``t`` as a [batch] tensor on ``device``; an int or a 0-d tensor is repeated."""
    if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
        raise TypeError(f"t must be an int or an integer tensor of timesteps, got {type(t).__name__}")
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"t must be a scalar or have shape [{batch}] (one timestep per sample), got shape {tuple(t.shape)}")
    return t


def _zero_(module: nn.Module) -> nn.Module:
    # The DDPM code initialises the last layer of every residual branch (and the output layer)
    # at zero, so each block starts as the identity and the network's first output is zero.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in the paper. Narrow models use fewer so that every group keeps at least 4
    # channels: with one channel per group the norm would erase the per-channel shift that
    # carries the timestep embedding.
    groups = math.gcd(channels, max(1, min(32, channels // 4)))
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, add the projected time embedding, GroupNorm -> SiLU -> dropout
    -> conv, plus a 1x1-conv shortcut where the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = _zero_(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width)
        # [B, 1 head, HW, C] each
        q, k, v = (qkv[:, i].transpose(1, 2).unsqueeze(1) for i in range(3))
        h = F.scaled_dot_product_attention(q, k, v)
        # contiguous(): the transposed view would reach proj_out in channels-last layout, whose
        # weight gradient then has other strides than the weight (DDP warns on every rank).
        h = h.squeeze(1).transpose(1, 2).contiguous().view(batch, channels, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """The DDPM paper's UNet (Ho et al. 2020, appendix B; a PixelCNN++-style backbone).

    ``ch_mult[i] * ch`` channels at level ``i``; ``num_res_blocks`` residual blocks per level on
    the way down and one more on the way up (which takes the skip connections); self-attention
    after the residual blocks of every level whose feature-map side is in ``attn_resolutions``
    (sides are counted from ``image_size``) and in the middle; a timestep embedding of width
    ``ch`` through :func:`fastddpm.ops.timestep_embedding` and a two-layer MLP to ``4 * ch``.
    ``learned_variance=True`` doubles the output channels (epsilon, then the variance
    interpolation values of Nichol & Dhariwal). Inputs need sides divisible by
    ``2 ** (len(ch_mult) - 1)``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: Optional[int] = None,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        image_size: int = 32,
        learned_variance: bool = False,
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("ch", ch), ("num_res_blocks", num_res_blocks),
                            ("image_size", image_size)):
            check_int(name, value, 1)
        ch_mult = tuple(int(m) for m in ch_mult)
        if not ch_mult or min(ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult!r}")
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image_size {image_size} must be divisible by 2**(len(ch_mult) - 1) = "
                             f"{2 ** (len(ch_mult) - 1)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        natural_out = in_channels * (2 if learned_variance else 1)
        if out_channels is None:
            out_channels = natural_out
        self.config: Dict[str, Any] = dict(
            architecture="unet", in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=list(ch_mult),
            num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions), dropout=float(dropout),
            image_size=image_size, learned_variance=bool(learned_variance),
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.learned_variance = bool(learned_variance)
        self.ch = ch
        temb_channels = 4 * ch

        self.temb_mlp = nn.Sequential(nn.Linear(ch, temb_channels), nn.SiLU(), nn.Linear(temb_channels, temb_channels))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        # Down path; skip_channels records what every stored activation will hand to the up path.
        self.down = nn.ModuleList()
        skip_channels = [ch]
        channels = ch
        resolution = image_size
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            stage.attns = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.blocks.append(ResBlock(channels, ch * mult, temb_channels, dropout))
                channels = ch * mult
                stage.attns.append(AttnBlock(channels) if resolution in attn_resolutions else nn.Identity())
                skip_channels.append(channels)
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(channels)
                skip_channels.append(channels)
                resolution //= 2
            self.down.append(stage)

        self.mid_block1 = ResBlock(channels, channels, temb_channels, dropout)
        self.mid_attn = AttnBlock(channels)
        self.mid_block2 = ResBlock(channels, channels, temb_channels, dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            stage.attns = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.blocks.append(ResBlock(channels + skip_channels.pop(), ch * mult, temb_channels, dropout))
                channels = ch * mult
                stage.attns.append(AttnBlock(channels) if resolution in attn_resolutions else nn.Identity())
            if level != 0:
                stage.upsample = Upsample(channels)
                resolution *= 2
            self.up.append(stage)

        self.norm_out = _group_norm(channels)
        self.conv_out = _zero_(nn.Conv2d(channels, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        t = _broadcast_timesteps(t, x.shape[0], x.device)
        temb = self.temb_mlp(ops.timestep_embedding(t, self.ch).to(x.dtype))

        hs = [self.conv_in(x)]
        for stage in self.down:
            for block, attn in zip(stage.blocks, stage.attns):
                hs.append(attn(block(hs[-1], temb)))
            if hasattr(stage, "downsample"):
                hs.append(stage.downsample(hs[-1]))

        h = self.mid_block2(self.mid_attn(self.mid_block1(hs[-1], temb)), temb)

        for stage in self.up:
            for block, attn in zip(stage.blocks, stage.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb))
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MLPDenoiser(nn.Module):
    """Noise predictor for low-dimensional data (2-D toy sets): residual MLP blocks, each adding a
    projection of the timestep embedding."""

    def __init__(
        self,
        dim: int = 2,
        *,
        hidden: int = 128,
        num_layers: int = 4,
        temb_dim: int = 64,
        dropout: float = 0.0,
        learned_variance: bool = False,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("num_layers", num_layers)):
            check_int(name, value, 1)
        if isinstance(temb_dim, bool) or not isinstance(temb_dim, int) or temb_dim < 4 or temb_dim % 2:
            raise ValueError(f"temb_dim must be an even int >= 4, got {temb_dim!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.config: Dict[str, Any] = dict(architecture="mlp", dim=dim, hidden=hidden, num_layers=num_layers,
                                           temb_dim=temb_dim, dropout=float(dropout),
                                           learned_variance=bool(learned_variance))
        self.dim = dim
        self.learned_variance = bool(learned_variance)
        self.temb_dim = temb_dim
        self.temb_mlp = nn.Sequential(nn.Linear(temb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.input = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList()
        for _ in range(num_layers):
            self.layers.append(nn.ModuleDict(dict(
                temb_proj=nn.Linear(hidden, hidden),
                norm=nn.LayerNorm(hidden),
                linear1=nn.Linear(hidden, hidden),
                dropout=nn.Dropout(dropout),
                linear2=_zero_(nn.Linear(hidden, hidden)),
            )))
        self.norm_out = nn.LayerNorm(hidden)
        self.output = _zero_(nn.Linear(hidden, dim * (2 if learned_variance else 1)))

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [B, {self.dim}], got {tuple(x.shape)}")
        t = _broadcast_timesteps(t, x.shape[0], x.device)
        temb = self.temb_mlp(ops.timestep_embedding(t, self.temb_dim).to(x.dtype))
        h = self.input(x)
        for layer in self.layers:
            branch = F.silu(layer["norm"](h) + layer["temb_proj"](F.silu(temb)))
            branch = layer["linear2"](layer["dropout"](F.silu(layer["linear1"](branch))))
            h = h + branch
        return self.output(F.silu(self.norm_out(h)))


# name -> (constructor, keyword arguments). Overrides passed to create_model replace these.
PRESETS: Dict[str, Dict[str, Any]] = {
    # Ho et al. 2020, CIFAR-10: 35.7M parameters.
    "ddpm_cifar10": dict(architecture="unet", in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                         attn_resolutions=(16,), dropout=0.1, image_size=32),
    # sklearn's 8x8 digits (kept at 8x8): 8 -> 4 -> 2, attention at 4 and in the middle; trains on a
    # CPU in minutes and samples 1000 steps in seconds.
    "digits": dict(architecture="unet", in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                   attn_resolutions=(4,), dropout=0.1, image_size=8),
    # 2-D toy sets (moons, swiss roll, 8 gaussians).
    "toy2d": dict(architecture="mlp", dim=2, hidden=128, num_layers=4, temb_dim=64, dropout=0.0),
}

_ARCHITECTURES = {"unet": UNet, "mlp": MLPDenoiser}


def model_from_config(config: Dict[str, Any]) -> nn.Module:
    """Build a model from ``model.config`` (as stored in checkpoints)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    kwargs = dict(config)
    architecture = kwargs.pop("architecture", "unet")
    if architecture not in _ARCHITECTURES:
        raise ValueError(f"config['architecture'] must be one of {tuple(_ARCHITECTURES)}, got {architecture!r}")
    cls = _ARCHITECTURES[architecture]
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ValueError(f"model config does not fit {cls.__name__}: {error}") from None


def create_model(name: str, **overrides) -> nn.Module:
    """A model from a preset (``ddpm_cifar10``, ``digits``, ``toy2d``) with keyword overrides,
    e.g. ``create_model("digits", learned_variance=True)`` or ``ch=16`` for a tiny test model."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    config = dict(PRESETS[name])
    if "architecture" in overrides and overrides["architecture"] != config["architecture"]:
        raise ValueError(f"preset {name!r} is a {config['architecture']!r} model; architecture cannot be overridden")
    config.update(overrides)
    return model_from_config(config)
