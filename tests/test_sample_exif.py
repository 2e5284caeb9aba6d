"""sample.py's input pictures (image=, mask=) are read upright by their EXIF orientation, as diffusers'
load_image and AUTOMATIC1111 read them: a phone photo stored sideways is not painted over sideways."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from helpers import model_config, randomize_
from PIL import Image

from ldm.models.stable_diffusion import StableDiffusion
from ldm.sampling import SamplerSettings, generate_images, output_size, read_picture


def sideways_photo(path: Path) -> Image.Image:
    """A 64x48 JPEG whose EXIF says 'turn 90 degrees clockwise to show it' (orientation 6); returns the
    picture as it is meant to be seen (48x64)."""
    rng = np.random.default_rng(0)
    stored = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=95)
    with Image.open(path) as reread:
        return reread.convert("RGB").transpose(Image.Transpose.ROTATE_270)


def test_an_exif_rotated_image_is_read_upright(tmp_path: Path) -> None:
    upright = sideways_photo(tmp_path / "phone.jpg")
    read = read_picture(tmp_path / "phone.jpg", "image")
    assert read.size == (48, 64)
    np.testing.assert_array_equal(np.asarray(read.convert("RGB")), np.asarray(upright))
    torch.manual_seed(0)
    model = randomize_(StableDiffusion.from_config(model_config("tiny")), std=0.05).eval()
    assert output_size(model, tmp_path / "phone.jpg", None, None) == (64, 48)  # height, width: upright
    settings = SamplerSettings(steps=2)
    (from_file,) = generate_images(model, ["a cat"], image=tmp_path / "phone.jpg", strength=0.5, settings=settings)
    (from_upright,) = generate_images(model, ["a cat"], image=upright, strength=0.5, settings=settings)
    assert from_file[0].size == (48, 64)
    np.testing.assert_array_equal(np.asarray(from_file[0]), np.asarray(from_upright[0]))


def test_metric_image_sets_read_pictures_as_the_loaders_do(tmp_path: Path) -> None:
    """FID/CLIP reference folders: upright by EXIF and transparency on white, the training loaders' reading."""
    from ldm.data.transforms import load_rgb
    from ldm.metrics import ImageSet

    folder = tmp_path / "reference"
    folder.mkdir()
    upright = sideways_photo(folder / "a.jpg")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red where opaque, hidden red under the transparent half
    rgba[:8, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(folder / "b.png")
    arrays = dict((item.name, a) for item, a in ImageSet.from_folder(folder).iter_arrays())
    np.testing.assert_array_equal(arrays["a.jpg"], np.asarray(upright))
    np.testing.assert_array_equal(arrays["b.png"], np.asarray(load_rgb(folder / "b.png")))
    assert (arrays["b.png"][8:] == 255).all() and (arrays["b.png"][:8, :, 0] == 200).all()
