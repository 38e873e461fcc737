"""Odd but valid images decode to RGB in both backends; broken files stop the run with an
error that names them, never a hang (a watchdog ends the process if one would hang)."""

from __future__ import annotations

import faulthandler
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import build_loader
from pipelines.lists import write_list

IMAGE_SIZE = 32
ONE_GREY_LEVEL = 1 / (255 * 0.224)
GOOD = 11  # good images around the odd one, so it lands in the middle of a batch


@pytest.fixture(autouse=True)
def watchdog():
    """A hang becomes a failure with every thread's traceback, not a stuck CI job."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def write_16bit_png(path: str) -> str:
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(path, format="PNG")
    assert Image.open(path).mode.startswith("I;16")
    return path


def odd_image(kind: str, folder, make_image) -> str:
    path = str(folder / kind)
    if kind == "gray.jpg":
        return make_image(path, mode="L")
    if kind == "cmyk.jpg":
        return make_image(path, mode="CMYK")
    if kind == "rgba.png":
        return make_image(path, mode="RGBA", fmt="PNG")
    if kind == "palette.png":
        return make_image(path, mode="P", fmt="PNG")
    if kind == "png_inside.jpg":
        return make_image(path, fmt="PNG")
    if kind == "16bit.png":
        return write_16bit_png(path)
    raise AssertionError(kind)


def list_around(folder, make_image, odd_path: str, position: int = 5) -> str:
    good = [make_image(str(folder / f"good{i}.jpg"), size=(60 + i, 50)) for i in range(GOOD)]
    paths = good[:position] + [odd_path] + good[position:]
    list_file = str(folder / "list.txt")
    write_list(list_file, [(p, 1 if p == odd_path else 0) for p in paths])
    return list_file


def run_epoch(list_file, *, backend, train, **kwargs):
    ld = build_loader(
        list_file,
        train=train,
        backend=backend,
        batch_size=4,
        image_size=IMAGE_SIZE,
        num_threads=kwargs.pop("num_threads", 0 if backend == "pil" else 2),
        **kwargs,
    )
    return [(x.clone(), y.clone()) for x, y in ld]


ODD_KINDS = ["gray.jpg", "cmyk.jpg", "rgba.png", "palette.png", "png_inside.jpg", "16bit.png"]


@pytest.mark.parametrize("kind", ODD_KINDS)
def test_odd_images_decode_to_the_same_rgb_in_both_backends(tmp_path, make_image, kind):
    path = odd_image(kind, tmp_path, make_image)
    list_file = str(tmp_path / "one.txt")
    write_list(list_file, [(path, 0)])
    dali = run_epoch(list_file, backend="dali", train=False)[0][0]
    pil = run_epoch(list_file, backend="pil", train=False)[0][0]
    assert dali.shape == pil.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    # Same colours: 16-bit scaled to 8 bits (not clamped), CMYK and alpha converted alike.
    assert float((dali - pil).abs().max()) <= 1.01 * ONE_GREY_LEVEL
    if kind in ("gray.jpg", "16bit.png"):  # grey stays grey: the three channels agree
        pixels = dali[0] * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        pixels = pixels + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        assert float((pixels[0] - pixels[1]).abs().max()) < 1.5 / 255


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_odd_images_in_a_training_epoch(tmp_path, make_image, backend):
    odd = [odd_image(kind, tmp_path, make_image) for kind in ODD_KINDS]
    list_file = str(tmp_path / "list.txt")
    write_list(list_file, [(p, i % 3) for i, p in enumerate(odd * 2)])
    batches = run_epoch(list_file, backend=backend, train=True)
    assert sum(len(y) for _, y in batches) == 12
    assert all(x.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) for x, _ in batches)


def write_broken(kind: str, folder, make_image) -> str:
    path = str(folder / kind)
    if kind == "truncated.jpg":
        with open(make_image(str(folder / "whole.jpg"), size=(64, 48)), "rb") as f:
            whole = f.read()
        with open(path, "wb") as f:
            f.write(whole[: len(whole) // 2])
    elif kind == "garbage.jpg":  # DALI's error does not name this one: the loader finds it
        with open(path, "wb") as f:
            f.write(b"this is not an image " * 20)
    elif kind == "jpeg_header_garbage.jpg":  # passes the header check, fails decoding
        with open(path, "wb") as f:
            f.write(b"\xff\xd8\xff\xe0" + os.urandom(500))
    elif kind == "animation.gif":  # PIL decodes GIF, DALI does not
        make_image(path, fmt="GIF")
    return path


BROKEN = ["truncated.jpg", "garbage.jpg", "jpeg_header_garbage.jpg"]


@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
@pytest.mark.parametrize("backend", ["dali", "pil"])
@pytest.mark.parametrize("kind", BROKEN)
def test_undecodable_file_is_named(tmp_path, make_image, kind, backend, train):
    bad = write_broken(kind, tmp_path, make_image)
    list_file = list_around(tmp_path, make_image, bad)
    with pytest.raises(RuntimeError) as info:  # 12 files, batch 4: train reads them all too
        run_epoch(list_file, backend=backend, train=train)
    assert bad in str(info.value)


def test_dali_names_a_format_it_cannot_decode(tmp_path, make_image):
    gif = write_broken("animation.gif", tmp_path, make_image)
    list_file = list_around(tmp_path, make_image, gif)
    with pytest.raises(RuntimeError, match="a format DALI does not decode") as info:
        run_epoch(list_file, backend="dali", train=False)
    assert gif in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)  # DALI's own error, chained
    run_epoch(list_file, backend="pil", train=False)  # PIL reads GIF: no error


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_pil_workers_and_dali_threads_report_the_file(tmp_path, make_image, backend):
    bad = write_broken("garbage.jpg", tmp_path, make_image)
    list_file = list_around(tmp_path, make_image, bad, position=9)
    with pytest.raises(RuntimeError) as info:
        run_epoch(list_file, backend=backend, train=False, num_threads=2)
    assert bad in str(info.value)


@pytest.mark.parametrize("kind", ["missing", "empty"])
@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_missing_or_empty_file_fails_before_the_first_step(tmp_path, make_image, kind, backend):
    bad = str(tmp_path / f"{kind}.jpg")
    if kind == "empty":
        open(bad, "wb").close()
    list_file = list_around(tmp_path, make_image, bad)
    with pytest.raises((FileNotFoundError, ValueError)) as info:
        build_loader(list_file, train=True, backend=backend, batch_size=4, image_size=IMAGE_SIZE)
    assert bad in str(info.value) and "list.txt" in str(info.value)


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_file_removed_after_the_check_is_named_during_the_epoch(tmp_path, make_image, backend):
    bad = make_image(str(tmp_path / "vanishing.jpg"))
    list_file = list_around(tmp_path, make_image, bad)
    os.remove(bad)
    with pytest.raises(RuntimeError) as info:
        run_epoch(list_file, backend=backend, train=False, check_files=False)
    assert bad in str(info.value)


def test_dali_error_leaves_no_pipeline_to_the_garbage_collector(tmp_path, make_image):
    """The failed pipeline is freed at once, in this process: left in a reference cycle, it
    would be destroyed by whichever process collects it, e.g. a DataLoader worker forked
    later, which crashes (DALI's threads live in the parent)."""
    import gc

    from nvidia.dali.pipeline import Pipeline

    def pipelines_alive() -> int:
        return sum(1 for o in gc.get_objects() if issubclass(type(o), Pipeline))

    def fail_and_keep_the_error() -> str:
        # Returns with `info` among its locals: its frame, the error and the error's
        # traceback (which holds that frame) form a cycle, as in any caller that keeps it.
        with pytest.raises(RuntimeError) as info:
            run_epoch(list_file, backend="dali", train=False)
        return str(info.value)

    bad = write_broken("garbage.jpg", tmp_path, make_image)
    list_file = list_around(tmp_path, make_image, bad)
    gc.collect()
    before = pipelines_alive()
    gc.disable()
    try:
        assert bad in fail_and_keep_the_error()
        assert pipelines_alive() == before
    finally:
        gc.enable()
