"""tools/show_batch.py: one batch drawn as the loader hands it to the model."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "show_batch.py")


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_the_pictures_are_the_images_the_model_gets_de_normalized(tiny_data, backend):
    """A val batch de-normalized is the resized, center-cropped image itself, as PIL makes
    it: the picture shows the pixels, not a normalized or channel-swapped version of them."""
    import torchvision.transforms as T

    from pipelines import build_loader
    from pipelines.common import open_rgb, val_resize_size
    from pipelines.lists import read_list
    from trainer.batch_picture import to_pictures

    size = 32
    loader = build_loader(
        tiny_data.val_list, train=False, backend=backend, batch_size=4, image_size=size,
        num_threads=1,
    )  # fmt: skip
    images, labels = next(iter(loader))
    pictures = to_pictures(images)
    assert pictures.shape == (4, size, size, 3) and pictures.dtype == torch.float32
    samples = read_list(tiny_data.val_list)[:4]
    crop = T.Compose([
        T.Resize(val_resize_size(size), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(size),
    ])  # fmt: skip
    for picture, sample, label in zip(pictures, samples, labels.tolist(), strict=True):
        want = np.asarray(crop(open_rgb(sample.path)), dtype=np.float32) / 255
        assert label == sample.label
        # DALI resizes by its own kernel: within a few levels of PIL's on average.
        assert np.abs(picture.numpy() - want).mean() < (0.02 if backend == "dali" else 0.002)


@pytest.mark.slow
def test_the_command_draws_a_batch_and_says_bad_input_in_one_line(tiny_data, tmp_path):
    out = tmp_path / "batch.png"
    cmd = [sys.executable, TOOL, "--list", tiny_data.train_list, "--out", str(out)]
    done = subprocess.run(
        [*cmd, "--image-size", "32", "--batch-size", "12", "--auto-augment", "trivial"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {out}: 12 train images as the model sees them"
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size[0] > 8 * 32  # 8 tiles a row
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert (
        again.stderr.strip()
        == f"error: --out {out} exists: choose another name or pass --overwrite"
    )
    missing = subprocess.run(
        [sys.executable, TOOL, "--list", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "b.png")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope.txt'}: list file not found"
