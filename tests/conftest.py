"""Shared fixtures: the tiny demo data set, a one-image writer, and GPU-test skipping."""

from __future__ import annotations

import contextlib
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


# --- a real S3-compatible server on 127.0.0.1 (moto's, from the test extra) ----------------


class S3Server:
    """moto's S3 server in its own process, on a free port of 127.0.0.1."""

    def __init__(self, port: int, process):
        self.port = port
        self.process = process
        self.endpoint = f"http://127.0.0.1:{port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 and DALI's SDK at this server, and
        away from any real credentials or config files of the machine."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing-key-id",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-never-shown",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def upload_tree(self, folder, url: str) -> None:
        """Every file under ``folder`` to ``url`` (s3://bucket/prefix), the bucket made."""
        from pipelines import s3

        bucket, prefix = s3.split(url)
        client = s3.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
        for dirpath, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, folder).replace(os.sep, "/")
                client.upload_file(path, bucket, f"{prefix}/{rel}".lstrip("/"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3_server(port: int | None = None) -> S3Server:
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    port = port or free_port()
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    process = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
            return S3Server(port, process)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto_server did not start on port {port}") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_server():
    server = start_s3_server()
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Server:
    """This test, and the processes it starts, talk to the session's S3 server."""
    from pipelines import s3

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    s3._clients.clear()  # made again with this environment
    yield s3_server
    s3._clients.clear()
