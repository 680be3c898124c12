"""Data sources: ranges, shapes, labels, and clear messages for bad paths and arrays."""

import numpy as np
import pytest
import torch
from PIL import Image

from distributed_ebm.config import ConfigError, DataConfig
from distributed_ebm.data import load_dataset

BUNDLED = ["digits", "texture", "photos", "faces", "ring8", "grid25"]


@pytest.mark.parametrize("source", BUNDLED)
def test_bundled_sources_are_in_unit_range(source):
    data = load_dataset(DataConfig(source=source, image_size=16 if source != "digits" else None))
    assert len(data) > 0
    assert data.x.dtype == torch.float32
    assert float(data.x.min()) >= -1.0 and float(data.x.max()) <= 1.0
    assert float(data.x.max()) - float(data.x.min()) > 0.5


def test_digits_labels_resize_and_few_sample_cut():
    data = load_dataset(DataConfig(source="digits", image_size=16, num_images=20))
    assert data.x.shape == (20, 1, 16, 16)
    assert data.num_classes == 10 and data.y.shape == (20,)
    assert load_dataset(DataConfig(source="digits", labels=False)).y is None


def test_mixture_points_sit_on_their_modes():
    data = load_dataset(DataConfig(source="ring8", mixture_std=0.01))
    radius = data.x.norm(dim=1)
    assert torch.allclose(radius, torch.full_like(radius, 0.7), atol=0.05)
    assert data.num_classes == 8


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw"])
def test_npz_layouts(tmp_path, layout):
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    array = {"nhw": images[..., 0], "nhwc": images, "nchw": images.transpose(0, 3, 1, 2)}[layout]
    np.savez(tmp_path / "d.npz", x=array, y=np.arange(5))
    data = load_dataset(DataConfig(source="npz", path=str(tmp_path / "d.npz")))
    channels = 1 if layout == "nhw" else 3
    assert data.x.shape == (5, channels, 6, 6)
    assert torch.allclose(data.x[0, 0], torch.from_numpy(images[0, ..., 0] / 127.5 - 1).float(), atol=1e-6)
    assert data.y.tolist() == [0, 1, 2, 3, 4]


def test_npz_bad_shape_and_keys_and_range(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 6, 6, 7), dtype=np.uint8))
    with pytest.raises(ConfigError, match=r"shape \(5, 6, 6, 7\).*expected"):
        load_dataset(DataConfig(source="npz", path=str(tmp_path / "bad.npz")))
    np.savez(tmp_path / "nokey.npz", images=np.zeros((5, 6, 6)))
    with pytest.raises(ConfigError, match="no 'x'"):
        load_dataset(DataConfig(source="npz", path=str(tmp_path / "nokey.npz")))
    np.savez(tmp_path / "range.npz", x=np.full((2, 4, 4), 300.0))
    with pytest.raises(ConfigError, match="Rescale"):
        load_dataset(DataConfig(source="npz", path=str(tmp_path / "range.npz")))


def test_bad_path_message():
    with pytest.raises(ConfigError, match="data.path '/no/such/file.npz' does not exist"):
        load_dataset(DataConfig(source="npz", path="/no/such/file.npz"))
    with pytest.raises(ConfigError, match="needs data.path"):
        load_dataset(DataConfig(source="folder"))
    with pytest.raises(ConfigError, match="Unknown data.source 'digitz'. Did you mean 'digits'?"):
        load_dataset(DataConfig(source="digitz"))


def test_folder_with_classes_skips_and_counts_corrupt_images(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    data = load_dataset(DataConfig(source="folder", path=str(tmp_path), image_size=8))
    assert data.x.shape == (6, 3, 8, 8)
    assert data.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.skipped == 1


def test_folder_of_mixed_sizes_needs_image_size(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (9, 8)).save(tmp_path / "b.png")
    with pytest.raises(ConfigError, match="set data.image_size"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path)))
