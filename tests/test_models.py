"""Models: the paper's parameter count, forward shapes of every preset, config round trips."""
import pytest
import torch

from fastddpm.models import PRESETS, MLPDenoiser, UNet, count_parameters, create_model, model_from_config

# Ho et al. 2020, appendix B: "Our CIFAR10 model has 35.7 million parameters".
PAPER_CIFAR10_PARAMETERS = 35.7e6


def _randomize_(model):
    # Zero-initialised output layers make a fresh model return zeros; give every weight a value.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def test_ddpm_cifar10_has_the_papers_parameter_count():
    with torch.device("meta"):
        model = create_model("ddpm_cifar10")
    count = count_parameters(model)
    assert abs(count - PAPER_CIFAR10_PARAMETERS) < 0.05e6, count


def test_ddpm_cifar10_matches_diffusers_ddpm_configuration_exactly():
    # diffusers' UNet2DModel in the google/ddpm-cifar10-32 configuration is an independent build
    # of the same architecture.
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = create_model("ddpm_cifar10")
        theirs = diffusers.UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
            layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_eps=1e-6)
    assert count_parameters(ours) == sum(p.numel() for p in theirs.parameters())


def test_ddpm_cifar10_attends_only_at_16x16_and_in_the_middle():
    with torch.device("meta"):
        model = create_model("ddpm_cifar10")
    attention = [name for name, m in model.named_modules() if type(m).__name__ == "AttnBlock"]
    # 2 blocks down + 3 up at 16x16 (level 1), plus the middle block.
    assert len(attention) == 6
    assert sum(name.startswith("down.1.") for name in attention) == 2
    assert sum(name.startswith("up.2.") for name in attention) == 3  # up path runs levels 3, 2, 1, 0


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_forward_with_the_right_shape(preset):
    model = create_model(preset).eval()
    config = PRESETS[preset]
    if config["architecture"] == "unet":
        shape = (1, config["in_channels"], config["image_size"], config["image_size"])
    else:
        shape = (3, config["dim"])
    x = torch.randn(shape)
    t = torch.randint(0, 1000, (shape[0],))
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("preset", ["digits", "toy2d"])
def test_learned_variance_doubles_the_output_channels(preset):
    model = create_model(preset, learned_variance=True)
    x = torch.randn((2, 1, 8, 8) if preset == "digits" else (2, 2))
    out = model(x, torch.tensor([0, 999]))
    assert out.shape[0] == 2 and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]


def test_zero_initialised_output_and_time_dependence():
    model = create_model("digits", ch=16, ch_mult=(1, 2), dropout=0.0).eval()
    x = torch.randn(2, 1, 8, 8)
    # A fresh model predicts zero noise (zero-initialised output layer, as in the DDPM code).
    assert torch.count_nonzero(model(x, torch.tensor([3, 3]))) == 0
    _randomize_(model)
    with torch.no_grad():
        early, late = model(x, torch.tensor([3, 3])), model(x, torch.tensor([900, 900]))
        scalar = model(x, 900)
    assert not torch.allclose(early, late)
    torch.testing.assert_close(scalar, late)
    # Samples are independent: changing one input leaves the other output alone.
    x2 = x.clone()
    x2[1] += 1.0
    with torch.no_grad():
        changed = model(x2, torch.tensor([900, 900]))
    torch.testing.assert_close(changed[0], late[0])
    assert not torch.allclose(changed[1], late[1])


def test_unet_runs_at_other_sizes_divisible_by_its_depth():
    model = create_model("digits", ch=16)
    assert model(torch.randn(1, 1, 16, 16), torch.tensor([5])).shape == (1, 1, 16, 16)


def test_mlp_denoiser_depends_on_time():
    model = _randomize_(MLPDenoiser(dim=2, hidden=32, num_layers=2)).eval()
    x = torch.randn(4, 2)
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.zeros(4, dtype=torch.long)), model(x, torch.full((4,), 500)))


def test_config_rebuilds_an_identical_model():
    model = create_model("digits", ch=16, learned_variance=True)
    rebuilt = model_from_config(model.config)
    assert rebuilt.config == model.config
    assert [(k, v.shape) for k, v in rebuilt.state_dict().items()] == [(k, v.shape) for k, v in model.state_dict().items()]


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="preset"):
        create_model("imagenet")
    with pytest.raises(ValueError, match="image_size"):
        UNet(image_size=12, ch_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="dropout"):
        UNet(dropout=1.5)
    with pytest.raises(ValueError, match="architecture"):
        model_from_config({"architecture": "transformer"})
    with pytest.raises(ValueError, match="does not fit"):
        model_from_config({"architecture": "unet", "channels": 3})
    model = create_model("digits", ch=16)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t must be"):
        model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3]))
