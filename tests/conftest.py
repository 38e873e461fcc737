"""Shared fixtures: the tiny demo data set, a one-image writer, and GPU-test skipping."""

from __future__ import annotations

import contextlib
import os
import pathlib

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
    grayscale JPEGs and PNGs), generated once per test session (by one of its xdist workers,
    so that every worker trains on the same paths). Treat it as read-only."""
    import dataclasses

    def generate(folder):
        return dataclasses.asdict(ensure_demo_data(folder / "tiny", preset="tiny"))

    _, fields = build_once(tmp_path_factory, "tiny_data", generate)
    return DemoData(**fields)


def build_once(tmp_path_factory, name: str, build) -> tuple[pathlib.Path, object]:
    """``build(folder)`` once per test session, also when pytest-xdist splits the session
    over worker processes: the first worker to ask builds (a whole training run, say) while
    the others wait on a lock file, then all read the same folder. ``build`` returns what the
    tests want besides the folder (JSON: a run's printed output); returns ``(folder, that)``.
    Treat the folder as read-only."""
    import fcntl
    import json
    import shutil

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's folder, above each worker's own
    folder, done = root / "shared" / name, root / "shared" / f"{name}.json"
    folder.parent.mkdir(exist_ok=True)
    with open(root / "shared" / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():  # nobody built it yet, or the build failed
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            done.write_text(json.dumps(build(folder)))
        return folder, json.loads(done.read_text())


@pytest.fixture(scope="session")
def shard_set(tiny_data, tmp_path_factory) -> pathlib.Path:
    """tiny_data's train list as a WebDataset shard set (``tools/make_shards.py``, 150 KB
    shards: 5 of them), made once per session. Treat it as read-only."""
    import subprocess
    import sys

    def make(folder):
        tool = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "make_shards.py")
        flags = ["--out-dir", str(folder / "set"), "--shard-size", "150KB", "--workers", "2"]
        done = subprocess.run(
            [sys.executable, tool, tiny_data.train_list, *flags], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return None

    folder, _ = build_once(tmp_path_factory, "shard_set", make)
    return folder / "set"


@pytest.fixture(scope="session")
def shard_reference(tiny_data, shard_set, tmp_path_factory) -> pathlib.Path:
    """The output folder of an uninterrupted 2-rank, 2-epoch run on ``shard_set`` (validating
    on the tiny val list), made once per session: where a run on the same set that stopped and
    resumed must end, bit for bit, whether it reads the set from its folder or from a bucket."""
    from test_trainer import run, tiny_flags, torchrun

    def train(out):
        flags = ["--train-list", str(shard_set), "--val-list", tiny_data.val_list, "--epochs", "2"]
        proc = run(torchrun(2) + tiny_flags(tiny_data, out, *flags), cwd=out.parent)
        assert "120 train / 40 val images" in proc.stdout
        return None

    folder, _ = build_once(tmp_path_factory, "shard_reference", train)
    return folder


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
