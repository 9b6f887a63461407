"""Checkpoints: round trips, atomic writes, clear errors, and the shipped digits model."""
import os
import random

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import fastddpm
from fastddpm import NoiseSchedule
from fastddpm.checkpoint import (CheckpointError, capture_rng_state, default_pretrained_path, load_checkpoint,
                                 load_pretrained, restore_rng_state, save_checkpoint)
from fastddpm.models import create_model

TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)


def _trained_state():
    torch.manual_seed(0)
    model = create_model("digits", **TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(2):
        loss = model(torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,))).pow(2).mean() + \
            sum(p.pow(2).sum() for p in model.parameters()) * 1e-3
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update_parameters(model)
    config = {"model": model.config, "diffusion": {"prediction_type": "epsilon", "variance_type": "fixed_small"},
              "sample_shape": [1, 8, 8]}
    return model, optimizer, ema, config


def test_round_trip_restores_weights_ema_optimizer_and_step(tmp_path):
    model, optimizer, ema, config = _trained_state()
    schedule = NoiseSchedule.cosine(50)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", config=config, schedule=schedule, model=model,
                           ema=ema.module, optimizer=optimizer, step=7, rng_state=capture_rng_state(),
                           extra={"note": "hi"})
    fresh = create_model("digits", **TINY)
    fresh_ema = create_model("digits", **TINY)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=5.0)
    checkpoint = load_checkpoint(path, model=fresh, ema=fresh_ema, optimizer=fresh_optimizer)
    assert checkpoint.step == 7 and checkpoint.extra == {"note": "hi"}
    assert checkpoint.config["model"] == model.config
    assert torch.equal(checkpoint.schedule.betas, schedule.betas)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.module.state_dict().values(), fresh_ema.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], fresh_optimizer.state[q][key])


def test_rng_states_round_trip_through_a_file(tmp_path):
    model, _, _, config = _trained_state()
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    path = save_checkpoint(tmp_path / "c.safetensors", config=config, schedule=NoiseSchedule.linear(10),
                           model=model, rng_state=capture_rng_state())
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    load_checkpoint(path, restore_rng=True)
    drawn = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(drawn[0], expected[0]) and np.array_equal(drawn[1], expected[1]) and drawn[2] == expected[2]
    state = capture_rng_state()
    first = torch.rand(2)
    restore_rng_state(state)
    assert torch.equal(torch.rand(2), first)


def test_failed_write_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch

    model, _, _, config = _trained_state()
    schedule = NoiseSchedule.linear(10)
    target = tmp_path / "ckpt.safetensors"
    save_checkpoint(target, config=config, schedule=schedule, model=model, step=1)
    before = target.read_bytes()

    def half_written_then_crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 100)  # a partial file, then the "disk" fails
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written_then_crash)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, config=config, schedule=schedule, model=model, step=2)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors"]
    assert load_checkpoint(target).step == 1


def test_corrupt_or_foreign_files_raise_checkpoint_error(tmp_path):
    from safetensors.torch import save_file

    model, _, _, config = _trained_state()
    good = save_checkpoint(tmp_path / "good.safetensors", config=config, schedule=NoiseSchedule.linear(10),
                           model=model)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a fastddpm checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="folder"):
        load_checkpoint(tmp_path)


def test_mismatched_model_or_optimizer_raises_a_clear_error(tmp_path):
    model, optimizer, ema, config = _trained_state()
    path = save_checkpoint(tmp_path / "c.safetensors", config=config, schedule=NoiseSchedule.linear(10),
                           model=model, optimizer=optimizer)
    wider = create_model("digits", **{**TINY, "ch": 32})
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_checkpoint(path, model=wider)
    deeper = create_model("digits", **{**TINY, "num_res_blocks": 2})
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path, model=deeper)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_checkpoint(path, ema=create_model("digits", **TINY))
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(CheckpointError, match="optimizer"):
        load_checkpoint(path, optimizer=other)


def test_load_pretrained_prefers_ema_weights_and_checks_the_config(tmp_path):
    model, optimizer, ema, config = _trained_state()
    path = save_checkpoint(tmp_path / "c.safetensors", config=config, schedule=NoiseSchedule.linear(20),
                           model=model, ema=ema.module, optimizer=optimizer)
    pretrained = load_pretrained(path)
    assert not pretrained.model.training
    assert all(not p.requires_grad for p in pretrained.model.parameters())
    for a, b in zip(pretrained.model.state_dict().values(), ema.module.state_dict().values()):
        assert torch.equal(a, b)
    assert pretrained.sample_shape == (1, 8, 8) and pretrained.schedule.num_timesteps == 20
    broken = dict(config, model={"architecture": "unet", "bogus": 1})
    bad = save_checkpoint(tmp_path / "bad.safetensors", config=broken, schedule=NoiseSchedule.linear(20), model=model)
    with pytest.raises(CheckpointError, match="model config"):
        load_pretrained(bad)


def test_save_rejects_bad_arguments(tmp_path):
    model, _, _, config = _trained_state()
    with pytest.raises(ValueError, match="model and/or ema"):
        save_checkpoint(tmp_path / "x", config=config, schedule=NoiseSchedule.linear(10))
    with pytest.raises(TypeError, match="schedule"):
        save_checkpoint(tmp_path / "x", config=config, schedule="linear", model=model)
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path / "x", config=config, schedule=NoiseSchedule.linear(10), model=model, step=-1)
    assert not list(tmp_path.iterdir())


def test_shipped_digits_checkpoint_loads_small_and_denoises_held_out_digits():
    from fastddpm.data import load_digits

    path = default_pretrained_path()
    assert path.exists() and path.stat().st_size < 5 * 2**20
    pretrained = fastddpm.load_pretrained()
    assert pretrained.sample_shape == (1, 8, 8)
    assert pretrained.prediction_type == "epsilon" and pretrained.variance_type == "fixed_small"
    assert pretrained.schedule.num_timesteps == 1000 and not pretrained.model.training
    # The model has learned something: on held-out digits its noise prediction beats the trivial
    # "predict zero noise" (MSE 1) by far at moderate noise levels.
    images, _ = load_digits("test")
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=generator)
    t = torch.full((images.shape[0],), 300)
    x_t = fastddpm.q_sample(images, t, pretrained.schedule, noise=noise)
    with torch.no_grad():
        predicted = pretrained.model(x_t, t)
    assert predicted.shape == images.shape
    assert (predicted - noise).pow(2).mean() < 0.3


# ---------------------------------------------------------------------------------------------
# one loader: diffusers folders
# ---------------------------------------------------------------------------------------------
def test_load_pretrained_reads_a_diffusers_model_folder_and_a_pipeline(tiny_unet, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path / "unet"
    tiny_unet.save_pretrained(folder)
    diffusers.DDPMScheduler(num_train_timesteps=30, beta_end=0.1, prediction_type="v_prediction",
                            variance_type="fixed_large_log", clip_sample_range=2.0).save_config(folder)
    pretrained = load_pretrained(folder)
    assert pretrained.kind == "diffusers" and pretrained.source == str(folder) and pretrained.notes == []
    assert pretrained.sample_shape == (1, 8, 8)
    assert pretrained.prediction_type == "v_prediction" and pretrained.variance_type == "fixed_large"
    assert pretrained.clip_denoised is True and pretrained.clip_range == 2.0
    assert torch.equal(pretrained.schedule.betas, NoiseSchedule.linear(30, beta_end=0.1).betas)
    loaded_state, saved_state = pretrained.model.state_dict(), tiny_unet.state_dict()
    assert loaded_state.keys() == saved_state.keys()
    assert all(torch.equal(loaded_state[key], saved_state[key]) for key in saved_state)
    assert not pretrained.model.training
    assert pretrained.checksum.startswith("sha256:") and load_pretrained(folder).checksum == pretrained.checksum

    # A pipeline folder (unet/ + scheduler/); without a scheduler config, DDPM's defaults and a note.
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=40, clip_sample=False)
    diffusers.DDPMPipeline(unet=tiny_unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    pipe = load_pretrained(tmp_path / "pipe")
    assert pipe.schedule.num_timesteps == 40 and pipe.clip_denoised is False
    bare = tmp_path / "bare"
    tiny_unet.save_pretrained(bare)
    defaults = load_pretrained(bare)
    assert defaults.schedule.num_timesteps == 1000 and "no scheduler config" in defaults.notes[0]
    assert len({pretrained.checksum, pipe.checksum, defaults.checksum}) == 3

    # Other weights in the same folder layout: another checksum.
    other = tmp_path / "other"
    torch.manual_seed(1)
    type(tiny_unet)(**tiny_unet.config).save_pretrained(other)
    (other / "scheduler_config.json").write_bytes((folder / "scheduler_config.json").read_bytes())
    assert load_pretrained(other).checksum != pretrained.checksum


def test_load_pretrained_refuses_unusable_folders_and_paths(tiny_unet, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="without a diffusers model"):
        load_pretrained(tmp_path / "empty")
    folder = tmp_path / "thresholded"
    tiny_unet.save_pretrained(folder)
    (folder / "scheduler_config.json").write_text('{"thresholding": true}')
    with pytest.raises(CheckpointError, match="thresholding=True is not supported"):
        load_pretrained(folder)


def test_the_fastddpm_checkpoint_checksum_is_the_files_sha256(tmp_path):
    import hashlib

    model, optimizer, ema, config = _trained_state()
    path = save_checkpoint(tmp_path / "c.safetensors", config=config, schedule=NoiseSchedule.linear(20), ema=ema.module)
    pretrained = load_pretrained(path)
    assert pretrained.kind == "fastddpm" and pretrained.clip_denoised is True
    digest = hashlib.sha256()
    name = b"c.safetensors"
    digest.update(len(name).to_bytes(8, "little") + name + path.stat().st_size.to_bytes(8, "little") + path.read_bytes())
    assert pretrained.checksum == "sha256:" + digest.hexdigest()
