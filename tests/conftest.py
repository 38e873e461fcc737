"""Shared fixtures: the tiny demo data set, a one-image writer, and GPU-test skipping."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from pipelines.demo import DemoData, ensure_demo_data


def pytest_collection_modifyitems(config, items):
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in gpu_tests:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> DemoData:
    """The tiny demo preset (10 classes, 12 train + 4 val each, 40-96 px sides, a few
    grayscale JPEGs and PNGs), generated once per test session. Treat it as read-only."""
    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "tiny", preset="tiny")


def _pattern(size: tuple[int, int], mode: str, color) -> Image.Image:
    if color is not None:
        return Image.new(mode, size, color)
    # A gradient rather than a flat colour, so decoders and resizers have something to do.
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack(
        [x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) * 255 // max(1, w + h - 2)],
        axis=-1,
    ).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    return image if mode == "RGB" else image.convert(mode)


@pytest.fixture
def make_image():
    """``make_image(path, *, size=(w, h), mode="RGB", fmt="JPEG", color=None) -> str``.

    Writes one image file (creating its folders) and returns its path. ``mode`` is any PIL
    mode the format can hold ("RGB", "L", "CMYK" for JPEG; also "RGBA", "P" for PNG);
    ``fmt`` is independent of the file name, so a PNG inside a ``.jpg`` is one call.
    ``color=None`` draws a gradient, otherwise a flat fill of that colour.
    """

    def make(
        path: str | os.PathLike,
        *,
        size: tuple[int, int] = (64, 48),
        mode: str = "RGB",
        fmt: str = "JPEG",
        color=None,
    ) -> str:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        image = _pattern(size, mode, color)
        image.save(path, fmt, **({"quality": 90} if fmt.upper() in ("JPEG", "JPG") else {}))
        return path

    return make
