"""Training: the loss falls, resume equals an uninterrupted run, DDP equals one process, losses."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import requires_cuda

from fastddpm import NoiseSchedule, q_sample
from fastddpm.checkpoint import CheckpointError, load_checkpoint
from fastddpm.cli import main as cli_main
from fastddpm.losses import (discretized_gaussian_log_likelihood, normal_kl, training_losses, training_target,
                             vlb_term)
from fastddpm.training import derive_seed, learning_rate, train

TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
QUIET = dict(progress=False, sample_every=0, log_every=1)


def _assert_same_tensors(a, b, **tolerance):
    assert a.keys() == b.keys()
    for key in a:
        if tolerance:
            torch.testing.assert_close(a[key], b[key], **tolerance, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def test_normal_kl_matches_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(50, generator=generator, dtype=torch.float64) for _ in range(4))
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-12


@pytest.mark.parametrize("num_bins", [256, 17])
def test_discretized_gaussian_probabilities_sum_to_one(num_bins):
    centers = torch.linspace(-1, 1, num_bins, dtype=torch.float64)
    for mean, log_scale in ((0.0, -1.0), (0.7, -4.0), (-1.2, 0.5)):
        log_p = discretized_gaussian_log_likelihood(centers, torch.full_like(centers, mean),
                                                    torch.full_like(centers, log_scale), num_bins=num_bins)
        assert torch.isfinite(log_p).all()
        torch.testing.assert_close(log_p.exp().sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-6)


def test_vlb_term_is_zero_for_a_perfect_noise_prediction_and_decoder_at_t0():
    schedule = NoiseSchedule.linear(100)
    generator = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (4, 1, 4, 4), generator=generator) / 127.5 - 1).double()
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 1, 50, 99])
    x_t = q_sample(x0, t, schedule, noise=noise)
    terms = vlb_term(noise, x0, x_t, t, schedule)
    assert terms[1:].abs().max() < 1e-6  # exact x0 -> exact posterior mean, same variance
    assert terms[0] > 0  # the decoder's -log p(x0 | x1) in bits
    wrong = vlb_term(noise + 0.5, x0, x_t, t, schedule)
    assert (wrong[1:] > 1e-3).all()


def test_training_targets_and_loss_choices():
    schedule = NoiseSchedule.linear(10)
    x0, noise = torch.randn(3, 2), torch.randn(3, 2)
    t = torch.tensor([0, 4, 9])
    v = training_target(x0, noise, t, schedule, "v_prediction")
    a = schedule.alphas_cumprod[t].float()[:, None]
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)
    x_t = q_sample(x0, t, schedule, noise=noise)
    with pytest.raises(ValueError, match="needs loss_type"):
        training_losses(torch.zeros(3, 4), x0, x_t, noise, t, schedule, variance_type="learned_range")
    with pytest.raises(ValueError, match="learned variance"):
        training_losses(torch.zeros(3, 2), x0, x_t, noise, t, schedule, loss_type="hybrid")
    # hybrid: the bound term reaches only the variance half of the output.
    output = torch.randn(3, 4, requires_grad=True)
    loss, parts = training_losses(output, x0, x_t, noise, t, schedule, loss_type="hybrid",
                                  variance_type="learned_range", vlb_weight=1.0)
    loss.sum().backward()
    torch.testing.assert_close(output.grad[:, :2], (output[:, :2] - noise).detach())  # d/dpred of the MSE
    assert output.grad[:, 2:].abs().sum() > 0 and set(parts) == {"mse", "vlb"}


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def test_loss_falls_on_digits_and_leaves_global_rng_alone():
    rng_before = torch.get_rng_state()
    result = train("digits", "digits", steps=40, batch_size=16, lr=3e-3, warmup_steps=5, seed=0,
                   model_overrides=TINY, progress=False, log_every=10)
    assert torch.equal(torch.get_rng_state(), rng_before)
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    # A fresh model predicts zero noise (loss ~1); a few dozen steps must cut that well down.
    assert losses[0] > 0.6 and losses[-1] < 0.5 * losses[0], losses
    assert result.step == 40 and not result.ema_model.training


@pytest.fixture
def deterministic_cudnn():
    """cuDNN's default backward kernels add in a nondeterministic order on a GPU; its deterministic
    ones (and no autotuning) make two runs of the same steps bitwise equal."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


# On the CPU bitwise equality holds as is. On a GPU it holds in float32 with cuDNN's deterministic
# kernels (the fixture); with bf16 autocast and the default kernels it does not (cuDNN's backward
# accumulates in a nondeterministic order), so the CUDA case asks for those settings.
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_kill_and_resume_ends_with_exactly_the_uninterrupted_weights(tmp_path, device, deterministic_cudnn):
    settings = dict(steps=6, batch_size=16, lr=2e-3, warmup_steps=2, ema_decay=0.5, seed=3, ckpt_every=2,
                    model_overrides={**TINY, "dropout": 0.2}, device=device,
                    precision="fp32" if device == "cuda" else "auto", **QUIET)
    train("digits", "digits", out=tmp_path / "straight", **settings)

    class Killed(Exception):
        pass

    def kill_after_step_5(step, loss):
        if step == 5:
            raise Killed  # dies between checkpoints: the last one is at step 4

    with pytest.raises(Killed):
        train("digits", "digits", out=tmp_path / "interrupted", callback=kill_after_step_5, **settings)
    assert load_checkpoint(tmp_path / "interrupted" / "checkpoint.safetensors").step == 4
    resumed = train("digits", "digits", out=tmp_path / "interrupted", resume=True, **settings)
    assert resumed.step == 6

    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.safetensors")
    again = load_checkpoint(tmp_path / "interrupted" / "checkpoint.safetensors")
    assert straight.step == again.step == 6
    _assert_same_tensors(straight.model_state, again.model_state)
    _assert_same_tensors(straight.ema_state, again.ema_state)
    for param_id, state in straight.optimizer_state["state"].items():
        _assert_same_tensors(state, again.optimizer_state["state"][param_id])
    # The interrupted run's log shows steps 5 and 6 twice (before and after the restart).
    steps = [json.loads(line)["step"] for line in (tmp_path / "interrupted" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 5, 6]


def test_resume_refuses_a_different_configuration(tmp_path):
    settings = dict(steps=2, batch_size=8, seed=0, model_overrides=TINY, **QUIET)
    train("digits", "digits", out=tmp_path, **settings)
    with pytest.raises(CheckpointError, match="training.seed"):
        train("digits", "digits", out=tmp_path, resume=True, **{**settings, "seed": 1, "steps": 3})
    with pytest.raises(CheckpointError, match="model"):
        train("digits", "digits", out=tmp_path, resume=True, **{**settings, "model_overrides": {**TINY, "ch": 8}})
    with pytest.raises(FileNotFoundError):
        train("digits", "digits", resume=tmp_path / "nope.safetensors", **settings)


def _torchrun(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastddpm", "train", *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)


def test_ddp_with_two_gloo_processes_equals_one_process(tmp_path):
    model_args = ["--model-arg", "ch=16", "--model-arg", "ch_mult=[1,2]", "--model-arg", "num_res_blocks=1",
                  "--model-arg", "attn_resolutions=[4]", "--model-arg", "dropout=0.0"]
    common = ["--preset", "digits", "--data", "digits", "--train-steps", "3", "--batch-size", "16", "--lr", "2e-3",
              "--warmup-steps", "1", "--ema-decay", "0.5", "--seed", "5", "--sample-every", "0", "--no-progress",
              "--device", "cpu", *model_args]
    done = _torchrun([*common, "--out", str(tmp_path / "ddp")], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    single = train("digits", "digits", steps=3, batch_size=16, lr=2e-3, warmup_steps=1, ema_decay=0.5, seed=5,
                   model_overrides=TINY, out=tmp_path / "single", device="cpu", progress=False, sample_every=0)
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoint.safetensors")
    one = load_checkpoint(tmp_path / "single" / "checkpoint.safetensors")
    assert ddp.config["training"]["world_size"] == 2 and one.config["training"]["world_size"] == 1
    assert ddp.step == one.step == single.step == 3
    # Same global batch, same noise: only the order of the gradient sums differs.
    _assert_same_tensors(ddp.model_state, one.model_state, rtol=1e-4, atol=1e-6)
    _assert_same_tensors(ddp.ema_state, one.ema_state, rtol=1e-4, atol=1e-6)
    first = train("digits", "digits", steps=1, batch_size=16, lr=2e-3, warmup_steps=1, ema_decay=0.5, seed=5,
                  model_overrides=TINY, device="cpu", progress=False)
    # ... and the comparison has teeth: two more steps move the weights by far more than that.
    moved = max((first.model.state_dict()[k] - one.model_state[k]).abs().max() for k in one.model_state)
    assert moved > 1e-3


@pytest.mark.parametrize("variance_type,loss_type", [("learned_range", "hybrid"), ("fixed_small", "vlb")])
def test_hybrid_and_bound_losses_train_the_right_outputs(variance_type, loss_type):
    result = train("digits", "digits", steps=4, batch_size=8, lr=1e-3, warmup_steps=0, variance_type=variance_type,
                   loss_type=loss_type, model_overrides=TINY, progress=False, log_every=1)
    assert all(math.isfinite(loss) for _, loss in result.losses)
    out_channels = 2 if variance_type == "learned_range" else 1
    assert result.model.conv_out.weight.shape[0] == out_channels
    # The output layer starts at zero; every output channel must have been trained.
    assert all(result.model.conv_out.weight[c].abs().sum() > 0 for c in range(out_channels))
    assert result.config["diffusion"]["loss_type"] == loss_type


def test_toy2d_trains_with_the_mlp():
    result = train("toy2d", "8gaussians", steps=30, batch_size=64, lr=3e-3, warmup_steps=0, **QUIET)
    losses = [loss for _, loss in result.losses]
    assert result.config["sample_shape"] == [2]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_cli_train_writes_checkpoints_log_and_sample_grid(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["train", "--preset", "digits", "--train-steps", "2", "--batch-size", "4", "--out", str(out),
                     "--sample-every", "2", "--sample-steps", "3", "--no-progress", "--model-arg", "ch=16",
                     "--model-arg", "ch_mult=[1,2]", "--model-arg", "num_res_blocks=1"])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"checkpoint.safetensors", "ema.safetensors", "log.jsonl", "samples"}
    assert (out / "samples" / "step_0000002.png").exists()
    import fastddpm

    pretrained = fastddpm.load_pretrained(out / "ema.safetensors")
    assert pretrained.model.config["ch"] == 16 and pretrained.step == 2
    code = cli_main(["train", "--data", str(tmp_path / "no_such_folder"), "--train-steps", "1", "--out", str(out)])
    assert code == 2 and "no_such_folder" in capsys.readouterr().err


def test_train_rejects_bad_arguments_before_working(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        train("gpt", "digits")
    with pytest.raises(ValueError, match="steps"):
        train("digits", "digits", steps=0)
    with pytest.raises(ValueError, match="lr"):
        train("digits", "digits", lr=-1.0)
    with pytest.raises(ValueError, match="hybrid"):
        train("digits", "digits", loss_type="hybrid")
    with pytest.raises(ValueError, match="contradicts"):
        train("digits", "digits", variance_type="fixed_small", model_overrides={"learned_variance": True})
    with pytest.raises(ValueError, match="image model"):
        train("digits", "moons")
    with pytest.raises(ValueError, match="precision"):
        train("digits", "digits", precision="fp8")
    with pytest.raises(ValueError, match="autocast"):
        train("digits", "digits", precision="bf16", device="cpu", steps=1)
    with pytest.raises(FileNotFoundError):
        train("digits", tmp_path / "missing")
    assert not list(tmp_path.iterdir())


def test_learning_rate_warms_up_then_stays_or_follows_half_a_cosine():
    settings = dict(steps=110, lr=1e-3, warmup_steps=10)
    warmup = [learning_rate(step, **settings, schedule="cosine") for step in range(10)]
    assert warmup == pytest.approx([1e-4 * (step + 1) for step in range(10)])
    assert [learning_rate(step, **settings) for step in (10, 60, 109)] == [1e-3] * 3
    cosine = [learning_rate(step, **settings, schedule="cosine") for step in range(10, 110)]
    assert cosine[0] == pytest.approx(1e-3) and cosine[50] == pytest.approx(0.5e-3)  # half-way: half the rate
    assert all(later < earlier for earlier, later in zip(cosine, cosine[1:])) and 0 < cosine[-1] < 1e-6
    assert learning_rate(3, steps=5, lr=1e-3, warmup_steps=0, schedule="cosine") == pytest.approx(
        1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 5)))


def test_lr_schedule_and_ema_start_reach_the_optimizer_the_average_and_the_checkpoint(tmp_path):
    """The logged rates follow learning_rate(); before ema_start the EMA is the weights; the
    settings are recorded, and a cosine run resumes only with its own total step count."""
    settings = dict(steps=4, batch_size=8, lr=2e-3, warmup_steps=1, ema_decay=0.9, seed=0, model_overrides=TINY,
                    lr_schedule="cosine", **QUIET)
    copied = train("digits", "digits", ema_start=4, out=tmp_path / "copied", **settings)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "copied" / "log.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([learning_rate(step, steps=4, lr=2e-3, warmup_steps=1, schedule="cosine")
                                    for step in range(4)])
    _assert_same_tensors(copied.model.state_dict(), copied.ema_model.state_dict())
    averaged = train("digits", "digits", ema_start=2, **settings)
    assert not all(torch.equal(averaged.model.state_dict()[key], value)
                   for key, value in averaged.ema_model.state_dict().items())
    saved = load_checkpoint(tmp_path / "copied" / "checkpoint.safetensors").config["training"]
    assert saved["lr_schedule"] == "cosine" and saved["ema_start"] == 4
    with pytest.raises(CheckpointError, match="training.steps is 4 but this run has 6 .the cosine learning rate"):
        train("digits", "digits", ema_start=4, out=tmp_path / "copied", resume=True, **{**settings, "steps": 6})
    with pytest.raises(CheckpointError, match="training.ema_start"):
        train("digits", "digits", ema_start=3, out=tmp_path / "copied", resume=True, **settings)
    with pytest.raises(ValueError, match="lr_schedule"):
        train("digits", "digits", lr_schedule="step", **QUIET)
    with pytest.raises(ValueError, match="ema_start"):
        train("digits", "digits", ema_start=-1, **QUIET)


def test_derived_seeds_are_distinct_and_stable():
    seeds = {derive_seed(0, stream, step) for stream in range(4) for step in range(100)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(7, 1, 2) != derive_seed(8, 1, 2)
    # Stable across processes (no per-process hash randomisation): a fresh interpreter with
    # another PYTHONHASHSEED derives the same seed.
    code = "from fastddpm.training import derive_seed; print(derive_seed(7, 1, 2))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(other.stdout) == derive_seed(7, 1, 2)


def test_clipping_of_x0_is_recorded_per_data_kind_and_read_by_the_loader(tmp_path):
    """Point sets span more than [-1, 1], so their checkpoints must not clip x_0 when sampled."""
    from fastddpm.checkpoint import load_pretrained

    toy = train("toy2d", "moons", steps=2, batch_size=16, out=tmp_path / "toy", **QUIET)
    digits = train("digits", "digits", steps=1, batch_size=4, out=tmp_path / "digits",
                   model_overrides=dict(ch=16, ch_mult=[1, 2], num_res_blocks=1), **QUIET)
    assert toy.config["diffusion"]["clip_denoised"] is False
    assert digits.config["diffusion"]["clip_denoised"] is True
    assert load_pretrained(tmp_path / "toy" / "ema.safetensors").clip_denoised is False
    assert load_pretrained(tmp_path / "digits" / "ema.safetensors").clip_denoised is True


def test_a_resumed_run_logs_the_loss_over_the_same_steps_as_an_uninterrupted_one(tmp_path):
    # Log every 3 steps, checkpoint every 2: the checkpoint of step 4 falls inside the window of
    # steps 4..6; the resumed run takes that window's part back from the checkpoint.
    settings = dict(steps=6, batch_size=8, lr=2e-3, warmup_steps=1, seed=5, ckpt_every=2, log_every=3,
                    model_overrides=TINY, progress=False, sample_every=0)
    train("digits", "digits", out=tmp_path / "straight", **settings)

    class Killed(Exception):
        pass

    def kill_after_step_5(step, loss):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train("digits", "digits", out=tmp_path / "resumed", callback=kill_after_step_5, **settings)
    resumed = train("digits", "digits", out=tmp_path / "resumed", resume=True, **settings)
    assert resumed.start_step == 4 and resumed.step == 6

    def logged(folder):
        return {record["step"]: record["loss"] for record in
                map(json.loads, (tmp_path / folder / "log.jsonl").read_text().splitlines())}

    straight, again = logged("straight"), logged("resumed")
    assert sorted(straight) == sorted(again) == [3, 6]
    assert again[6] == straight[6]  # the same mean over steps 4..6, not over 5..6


def test_the_train_command_says_how_many_steps_this_process_trained(tmp_path, capsys):
    from fastddpm.cli import main

    argv = ["train", "--preset", "digits", "--batch-size", "8", "--sample-every", "0", "--no-progress",
            "--out", str(tmp_path / "run"), "--model-arg", "ch=16", "--lr-schedule", "constant"]
    assert main([*argv, "--train-steps", "3"]) == 0
    assert "trained 3 steps in" in capsys.readouterr().out
    assert main([*argv, "--train-steps", "5", "--resume", str(tmp_path / "run" / "checkpoint.safetensors")]) == 0
    assert "trained 2 steps (4..5, resumed at step 3)" in capsys.readouterr().out


def test_the_run_log_is_appended_in_whole_lines_and_a_torn_tail_is_cut_or_skipped(tmp_path):
    from fastddpm.training import RunLog, read_log

    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')  # a run that died mid-line
    with pytest.warns(UserWarning, match="torn last line"):
        assert read_log(path) == [{"step": 1, "loss": 0.5}]
    log = RunLog(path)  # a resumed run: the torn tail goes before its first record
    log.append({"step": 2, "loss": 0.25})
    log.close()
    assert read_log(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_log(path)
