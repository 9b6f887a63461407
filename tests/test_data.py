"""Offline data: digits split, toy sets, image folders, arrays, and clear errors for bad paths."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastddpm.data import DIGITS_HELD_OUT, Dataset, load_array, load_dataset, load_digits, load_image_folder, toy2d


def _rows(images):
    return sorted(tuple(row) for row in images.reshape(images.shape[0], -1).tolist())


def test_digits_split_is_fixed_disjoint_and_complete():
    from sklearn.datasets import load_digits as sklearn_digits

    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    assert train_x.shape == (1797 - DIGITS_HELD_OUT, 1, 8, 8) and test_x.shape == (DIGITS_HELD_OUT, 1, 8, 8)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert train_x.min() == -1.0 and train_x.max() == 1.0
    # Train + held-out is exactly sklearn's set, pixels 0..16 mapped to [-1, 1].
    bunch = sklearn_digits()
    everything = torch.from_numpy(bunch.images).float().unsqueeze(1) / 8 - 1
    assert _rows(torch.cat([train_x, test_x])) == _rows(everything)
    assert sorted(torch.cat([train_y, test_y]).tolist()) == sorted(bunch.target.tolist())
    # Every class appears in the held-out split, and the split does not change between calls.
    assert set(test_y.tolist()) == set(range(10))
    again_x, again_y = load_digits("test")
    assert torch.equal(again_x, test_x) and torch.equal(again_y, test_y)


def test_digits_resize_and_split_errors():
    images, _ = load_digits("test", image_size=16)
    assert images.shape == (DIGITS_HELD_OUT, 1, 16, 16)
    assert images.min() >= -1 and images.max() <= 1
    with pytest.raises(ValueError, match="split"):
        load_digits("validation")
    with pytest.raises(ValueError, match="image_size"):
        load_digits(image_size=0)


@pytest.mark.parametrize("name", ["moons", "swiss_roll", "8gaussians"])
def test_toy2d_is_seeded(name):
    a, b, c = toy2d(name, 500, seed=1), toy2d(name, 500, seed=1), toy2d(name, 500, seed=2)
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() < 4.0


def test_eight_gaussians_sit_on_a_circle():
    points = toy2d("8gaussians", 2000, seed=0)
    radius = points.norm(dim=1)
    assert (radius - 2.0).abs().mean() < 0.15
    angles = torch.atan2(points[:, 1], points[:, 0]) / (2 * np.pi / 8)
    assert (angles - angles.round()).abs().max() < 0.25  # near one of the 8 directions


def test_toy2d_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        toy2d("spirals")
    with pytest.raises(ValueError, match="n must"):
        toy2d("moons", 0)


def test_image_folder_resizes_center_crops_and_flips(tmp_path):
    # 40x20 image: left half black, right half white; a 10x10 center crop keeps both halves.
    picture = np.zeros((20, 40, 3), dtype=np.uint8)
    picture[:, 20:] = 255
    Image.fromarray(picture).save(tmp_path / "a.png")
    Image.fromarray(255 - picture).save(tmp_path / "nested_b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_image_folder(tmp_path, image_size=10)
    assert images.shape == (2, 3, 10, 10) and images.dtype == torch.uint8
    assert images[0, :, :, 0].float().mean() < 30 and images[0, :, :, -1].float().mean() > 225
    dataset = load_dataset(tmp_path, image_size=10)
    assert dataset.random_flip and dataset.sample_shape == (3, 10, 10)
    indices = torch.tensor([0] * 32)
    batch = dataset.batch(indices, torch.Generator().manual_seed(0))
    assert batch.dtype == torch.float32 and batch.min() >= -1 and batch.max() <= 1
    flipped = batch[:, 0, 0, 0] > 0  # flipped copies start with the white half
    assert 0 < flipped.sum() < 32
    again = dataset.batch(indices, torch.Generator().manual_seed(0))
    assert torch.equal(batch, again)
    grey = load_dataset(tmp_path, image_size=8, channels=1)
    assert grey.sample_shape == (1, 8, 8)


def test_arrays_npy_and_npz(tmp_path):
    nhwc = np.random.default_rng(0).integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", nhwc)
    data = load_array(tmp_path / "images.npy")
    assert data.shape == (5, 3, 6, 6) and torch.equal(data, torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    dataset = load_dataset(tmp_path / "images.npy")
    batch = dataset.batch(torch.arange(5))
    torch.testing.assert_close(batch, data.float() / 127.5 - 1)
    points = np.random.default_rng(0).uniform(-1, 1, size=(7, 2)).astype(np.float32)
    np.savez(tmp_path / "two.npz", points=points, other=points)
    with pytest.raises(ValueError, match="several arrays"):
        load_array(tmp_path / "two.npz")
    assert torch.equal(load_array(tmp_path / "two.npz", key="points"), torch.from_numpy(points))
    np.savez(tmp_path / "one.npz", x=points)
    assert load_dataset(tmp_path / "one.npz").sample_shape == (2,)


def test_bad_data_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a dataset name"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "missing.npy")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="holds no images"):
        load_dataset(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="bad.png"):
        load_dataset(broken)
    (tmp_path / "file.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="folder of images or a .npy"):
        load_dataset(tmp_path / "file.csv")
    np.save(tmp_path / "wide.npy", np.full((3, 2), 5.0, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        load_dataset(tmp_path / "wide.npy")
    (tmp_path / "garbage.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        load_dataset(tmp_path / "garbage.npy")
    with pytest.raises(TypeError, match="data must be"):
        load_dataset(3)


def test_dataset_front_door_names():
    digits = load_dataset("digits", split="test")
    assert isinstance(digits, Dataset) and len(digits) == DIGITS_HELD_OUT and not digits.random_flip
    assert digits.labels is not None and digits.sample_shape == (1, 8, 8)
    moons = load_dataset("toy2d:moons", num_points=100, seed=3)
    assert moons.sample_shape == (2,) and torch.equal(moons.data, toy2d("moons", 100, 3))


def test_digits_are_read_without_importing_scikit_learn_and_equal_its_own(tmp_path):
    import subprocess
    import sys

    from sklearn.datasets import load_digits as sklearn_digits

    from fastddpm.data import _sklearn_digits

    images, targets = _sklearn_digits()
    reference = sklearn_digits()
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(targets, reference.target)
    done = subprocess.run([sys.executable, "-c", "import sys\nfrom fastddpm.data import load_digits\n"
                           "x, y = load_digits('all')\nassert x.shape == (1797, 1, 8, 8)\n"
                           "print('sklearn' in sys.modules)"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"  # ~2 s of start-up saved in every digits command
