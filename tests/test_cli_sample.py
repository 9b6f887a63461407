"""``fastddpm sample`` and the PNG / npz writers in fastddpm.imaging."""
import json
import sys

import numpy as np
import pytest
import torch

from fastddpm import NoiseSchedule
from fastddpm.checkpoint import Pretrained
from fastddpm.cli import main
from fastddpm.imaging import images_to_uint8, make_grid, save_image_grid, save_samples_npz
from fastddpm.sampling import sample

PIL = pytest.importorskip("PIL.Image")

T_TRAIN = 20


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory, tiny_unet):
    """A UNet2DModel saved with save_pretrained, with a DDPM scheduler config beside it."""
    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path_factory.mktemp("unet")
    tiny_unet.save_pretrained(folder)
    diffusers.DDPMScheduler(num_train_timesteps=T_TRAIN, beta_end=0.2).save_config(folder)
    return folder


def _run(*argv):
    """The command with DDPM unless a test names a sampler (the default has its own test)."""
    argv = list(map(str, argv))
    pinned = [] if "--sampler" in argv else ["--sampler", "ddpm"]
    return main(["sample", *argv, *pinned, "--no-progress"])


def test_the_default_is_unipc_at_20_steps(unet_dir, tmp_path):
    out = tmp_path / "default.png"
    assert main(["sample", "--checkpoint", str(unet_dir), "--num-samples", "2", "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    data = np.load(out.with_suffix(".npz"))
    assert str(data["sampler"]) == "unipc" and int(data["num_steps"]) == 20


def test_writes_png_grid_and_npz(unet_dir, tmp_path, capsys):
    out = tmp_path / "grid" / "samples.png"
    assert _run("--checkpoint", unet_dir, "--num-samples", 5, "--steps", 3, "--batch-size", 2, "--out", out) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and str(out.with_suffix(".npz")) in printed and " s" in printed

    data = np.load(out.with_suffix(".npz"))
    samples = data["samples"]
    assert samples.shape == (5, 1, 8, 8) and samples.dtype == np.float32
    assert np.isfinite(samples).all() and samples.min() >= -1.0 and samples.max() <= 1.0
    assert samples.std() > 0.05
    assert int(data["seed"]) == 0 and str(data["sampler"]) == "ddpm" and int(data["num_steps"]) == 3
    assert int(data["num_train_timesteps"]) == T_TRAIN
    assert data["timesteps"].tolist() == NoiseSchedule.linear(T_TRAIN).respace_evenly(3).timesteps.tolist()

    # 5 samples: a 3 x 2 grid of 8x8 images upscaled 8x (64 px tiles) with 2 px gaps.
    image = PIL.open(out)
    assert image.mode == "L" and image.size == (3 * 66 + 2, 2 * 66 + 2)
    pixels = np.asarray(image)
    first_tile = pixels[2:66, 2:66]
    expected = images_to_uint8(samples[:1])[0, :, :, 0].repeat(8, axis=0).repeat(8, axis=1)
    assert np.array_equal(first_tile, expected)


# These compare the command with fastddpm.sample on the CPU, so the command runs there too (on a
# GPU machine its default device would be CUDA: TF32 convolutions and fast-math noise, which
# test_sampling's CUDA tests compare with the CPU at the tolerance that follows from them).
def test_cli_samples_are_fastddpm_sample_at_their_global_index(unet_dir, tiny_unet, tmp_path):
    out = tmp_path / "s.png"
    assert _run("--checkpoint", unet_dir, "--num-samples", 3, "--steps", 4, "--batch-size", 2, "--seed", 9,
                "--device", "cpu", "--out", out) == 0
    got = np.load(out.with_suffix(".npz"))["samples"]
    schedule = NoiseSchedule.linear(T_TRAIN, beta_end=0.2)
    first_batch = sample(tiny_unet, (2, 1, 8, 8), schedule=schedule, num_steps=4, seed=9, progress=False, sampler="ddpm")
    np.testing.assert_allclose(got[:2], first_batch.numpy(), atol=1e-5)
    # The second batch starts at sample 2 of the same seed's stream, not at another seed.
    second_batch = sample(tiny_unet, (1, 1, 8, 8), schedule=schedule, num_steps=4, seed=9, first_index=2,
                          progress=False, sampler="ddpm")
    np.testing.assert_allclose(got[2:], second_batch.numpy(), atol=1e-5)
    assert not np.allclose(got[2], got[0], atol=1e-3)

    again = tmp_path / "again.png"
    assert _run("--checkpoint", unet_dir, "--num-samples", 3, "--steps", 4, "--batch-size", 2, "--seed", 9,
                "--device", "cpu", "--out", again) == 0
    assert np.array_equal(np.load(again.with_suffix(".npz"))["samples"], got)


def test_ddim_and_a_saved_pipeline_directory(tiny_unet, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=30, beta_schedule="squaredcos_cap_v2",
                                        prediction_type="v_prediction", clip_sample=False)
    diffusers.DDPMPipeline(unet=tiny_unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "ddim.png"
    assert _run("--checkpoint", tmp_path / "pipe", "--num-samples", 2, "--steps", 3, "--sampler", "ddim",
                "--eta", 0.5, "--device", "cpu", "--out", out) == 0
    data = np.load(out.with_suffix(".npz"))
    assert data["samples"].shape == (2, 1, 8, 8)
    assert int(data["num_train_timesteps"]) == 30 and str(data["prediction_type"]) == "v_prediction"
    want = sample(tiny_unet, (2, 1, 8, 8), schedule=NoiseSchedule.cosine(30), num_steps=3,
                  sampler="ddim", eta=0.5, prediction_type="v_prediction", clip_denoised=False, seed=0,
                  progress=False)
    np.testing.assert_allclose(data["samples"], want.numpy(), atol=1e-5)


class _ConvIgnoringTime(torch.nn.Module):
    def __init__(self, channels=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1)

    def forward(self, x, t):
        return self.conv(x)


def test_default_checkpoint_and_fastddpm_paths_go_through_load_pretrained(monkeypatch, tmp_path):
    calls = []

    def load_pretrained(path=None, *, device="cpu"):
        calls.append((path, torch.device(device)))
        model = _ConvIgnoringTime().to(device)
        return Pretrained(model=model.eval(), schedule=NoiseSchedule.linear(10), sample_shape=(3, 4, 4))

    monkeypatch.setattr("fastddpm.checkpoint.load_pretrained", load_pretrained)
    assert _run("--num-samples", 2, "--steps", 2, "--device", "cpu", "--out", tmp_path / "d.png") == 0
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    assert _run("--checkpoint", checkpoint, "--num-samples", 2, "--out", tmp_path / "f.png") == 0
    assert calls[0] == (None, torch.device("cpu")) and calls[1][0] == str(checkpoint)
    rgb = PIL.open(tmp_path / "f.png")
    assert rgb.mode == "RGB"
    assert np.load(tmp_path / "f.npz")["samples"].shape == (2, 3, 4, 4)
    assert int(np.load(tmp_path / "f.npz")["num_steps"]) == 10


def test_samples_without_an_image_mode_still_get_their_npz(monkeypatch, tmp_path, capsys):
    def load_pretrained(path=None, *, device="cpu"):
        return Pretrained(model=_ConvIgnoringTime(2).to(device).eval(), schedule=NoiseSchedule.linear(5),
                          sample_shape=(2, 3, 3))

    monkeypatch.setattr("fastddpm.checkpoint.load_pretrained", load_pretrained)
    assert _run("--num-samples", 2, "--out", tmp_path / "two.png") == 0
    assert np.load(tmp_path / "two.npz")["samples"].shape == (2, 2, 3, 3)
    assert not (tmp_path / "two.png").exists()
    assert "no image grid" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--checkpoint", "/no/such/checkpoint"], "no such file or directory"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--num-samples", "0"], "--num-samples"),
    (["--batch-size", "0"], "--batch-size"),
    (["--eta", "0.5"], "--eta applies to --sampler ddim"),
    (["--seed", "-1"], "--seed"),
    (["--out", "samples.npz"], "--out"),
    (["--out", "samples.xyz"], "--out"),
    (["--device", "tpu:x"], "--device"),
])
def test_bad_arguments_exit_non_zero_with_a_message(argv, message, capsys, tmp_path):
    assert main(["sample", *argv, "--no-progress"]) != 0
    assert message in capsys.readouterr().err


def test_steps_beyond_the_trained_chain(unet_dir, tmp_path, capsys):
    assert _run("--checkpoint", unet_dir, "--steps", T_TRAIN + 1, "--out", tmp_path / "x.png") == 2
    assert f"T={T_TRAIN}" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_unsupported_diffusers_folders(tmp_path, capsys):
    other = tmp_path / "cond"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert _run("--checkpoint", other) == 2
    assert "only UNet2DModel" in capsys.readouterr().err


def test_unsupported_scheduler_option(unet_dir, tmp_path, capsys):
    folder = tmp_path / "thresholded"
    folder.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (folder / name).write_bytes((unet_dir / name).read_bytes())
    (folder / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", "thresholding": True}))
    assert _run("--checkpoint", folder, "--out", tmp_path / "t.png") == 2
    assert "thresholding" in capsys.readouterr().err


def test_missing_diffusers_is_a_clear_error(unet_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    assert _run("--checkpoint", unet_dir) == 2
    assert "pip install diffusers" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# fastddpm.imaging
# ---------------------------------------------------------------------------------------------
def test_images_to_uint8_maps_minus_one_one_to_0_255_and_clips():
    images = torch.tensor([-1.0, 0.0, 1.0, -3.0, 2.0, float("nan")]).reshape(1, 1, 2, 3)
    assert images_to_uint8(images)[0, :, :, 0].tolist() == [[0, 128, 255], [0, 255, 0]]


def test_make_grid_places_tiles_row_by_row():
    images = np.stack([np.full((3, 2, 2), value, dtype=np.float32) for value in (-1.0, 0.0, 1.0)])
    grid = make_grid(images, nrow=2, scale=3, padding=1, pad_value=7)
    assert grid.shape == (2 * 7 + 1, 2 * 7 + 1, 3)
    assert (grid[1:7, 1:7] == 0).all() and (grid[1:7, 8:14] == 128).all() and (grid[8:14, 1:7] == 255).all()
    assert (grid[8:14, 8:14] == 7).all() and (grid[0] == 7).all()
    assert make_grid(images).shape[1] == 2 * (2 * 32 + 2) + 2  # default: ceil(sqrt(3)) columns, 64 px tiles


@pytest.mark.parametrize("bad,error", [
    (np.zeros((2, 2, 4, 4)), "channels"),
    (np.zeros((4, 4)), "shape"),
])
def test_grid_rejects_bad_images(bad, error, tmp_path):
    with pytest.raises(ValueError, match=error):
        save_image_grid(bad, tmp_path / "x.png")


def test_npz_round_trip_without_pickle(tmp_path):
    path = save_samples_npz(tmp_path / "deep" / "s.npz", torch.zeros(2, 1, 3, 3, dtype=torch.float64),
                            sampler="ddim", seed=3, skipped=None, timesteps=torch.arange(4))
    data = np.load(path, allow_pickle=False)
    assert set(data.files) == {"samples", "sampler", "seed", "timesteps"}
    assert data["samples"].dtype == np.float32 and str(data["sampler"]) == "ddim"
    with pytest.raises(TypeError, match="metadata"):
        save_samples_npz(tmp_path / "o.npz", torch.zeros(1, 1, 2, 2), bad={"a": 1})


# ---------------------------------------------------------------------------------------------
# how the model runs: --dtype, --channels-last, --compile, --batch-size auto
# ---------------------------------------------------------------------------------------------
def test_dtype_runs_the_model_in_bf16_and_records_it(tmp_path):
    # The shipped digits model (a trained one: the precision shows in its samples).
    argv = ["--num-samples", 8, "--steps", 5, "--device", "cpu", "--sampler", "dpmpp_2m"]
    assert _run(*argv, "--out", tmp_path / "fp32.png") == 0
    assert _run(*argv, "--dtype", "bf16", "--channels-last", "--out", tmp_path / "bf16.png") == 0
    exact, low = np.load(tmp_path / "fp32.npz"), np.load(tmp_path / "bf16.npz")
    assert str(exact["model_dtype"]) == "fp32" and str(low["model_dtype"]) == "bf16"
    assert low["samples"].dtype == np.float32
    difference = np.abs(low["samples"] - exact["samples"]).max()
    assert 0 < difference <= 0.15, difference  # bf16 rounding over 5 steps (measured <= 0.06)


def test_a_folder_keeps_its_model_precision(tmp_path, capsys):
    argv = ["--num-samples", 4, "--steps", 3, "--device", "cpu", "--out", tmp_path / "run"]
    assert _run(*argv, "--dtype", "bf16") == 0
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["run"]["model_dtype"] == "bf16"
    capsys.readouterr()
    assert _run(*argv) == 2
    assert "model_dtype 'bf16' there, 'fp32' here" in capsys.readouterr().err
    assert _run(*argv, "--dtype", "bf16", "--compile") == 0  # compilation changes no setting of the run


def test_batch_size_auto_on_a_cpu_takes_the_stated_default(tmp_path, capsys):
    assert _run("--num-samples", 70, "--steps", 2, "--device", "cpu", "--batch-size", "auto",
                "--out", tmp_path / "auto") == 0
    captured = capsys.readouterr()
    assert "--batch-size auto: batch size 64" in captured.err
    chunk = np.load(tmp_path / "auto" / "chunk-000000.npz")
    assert int(chunk["batch_size"]) == 64 and chunk["samples"].shape[0] == 64


def test_a_batch_size_neither_a_number_nor_auto_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["sample", "--batch-size", "many", "--no-progress"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--batch-size: must be a positive int or auto, got 'many'" in err and "Traceback" not in err
