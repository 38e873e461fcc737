"""The embedded demo data set (pipelines/demo.py): valid, varied, deterministic, reused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.demo import (
    CLASS_NAMES,
    MARKER_FILE,
    PARTIAL_FILE,
    PHOTO_SIZES,
    PRESETS,
    DemoDataError,
    default_demo_root,
    ensure_demo_data,
    render_image,
)
from pipelines.lists import read_classes, read_list

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image_files(root) -> list[str]:
    found = []
    for split in ("train", "val"):
        for dirpath, _, names in os.walk(os.path.join(root, split)):
            found += [os.path.join(dirpath, n) for n in names]
    return sorted(found)


def digest(paths) -> dict[str, str]:
    """``split/class/file`` -> sha256 of the bytes."""
    return {
        "/".join(Path(p).parts[-3:]): hashlib.sha256(Path(p).read_bytes()).hexdigest()
        for p in paths
    }


def test_tiny_lists_are_valid_and_match_the_files(tiny_data):
    classes = read_classes(tiny_data.classes_file)
    assert classes == list(CLASS_NAMES) and tiny_data.num_classes == len(classes) == 10
    train = read_list(tiny_data.train_list, num_classes=len(classes))
    val = read_list(tiny_data.val_list, num_classes=len(classes))
    assert Counter(s.label for s in train) == dict.fromkeys(range(10), 12)
    assert Counter(s.label for s in val) == dict.fromkeys(range(10), 4)
    assert sorted(s.path for s in train + val) == image_files(tiny_data.root)
    for sample in train + val:  # each file sits in its class's folder
        assert os.path.basename(os.path.dirname(sample.path)) == classes[sample.label]
    text = Path(tiny_data.train_list).read_text(encoding="utf-8")
    assert text.startswith("train/blue_checkerboard/")  # relative to the list's folder


def test_tiny_has_varied_sizes_grayscale_and_png(tiny_data):
    modes, formats, sizes, val_modes = Counter(), Counter(), set(), set()
    for path in image_files(tiny_data.root):
        with Image.open(path) as image:
            modes[image.mode] += 1
            if f"{os.sep}val{os.sep}" in path:
                val_modes.add(image.mode)
            formats[(image.format, os.path.splitext(path)[1])] += 1
            sizes.add(image.size)
            assert min(image.size) >= 40 and max(image.size) <= 96
    assert modes["L"] >= 2 and modes["RGB"] >= 140
    assert formats[("PNG", ".png")] >= 2 and formats[("JPEG", ".jpg")] >= 140
    assert set(formats) == {("PNG", ".png"), ("JPEG", ".jpg")}
    assert len(sizes) >= 50
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)
    assert val_modes == {"RGB", "L"}, "validation holds grayscale files too"


def test_classes_are_separable_by_a_nearest_colour_centroid(tiny_data):
    """A floor on learnability: coarse colour histograms of the train images classify the
    val images well above chance (a ResNet also sees the textures)."""

    def features(path):
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB").resize((32, 32)), dtype=np.int64) // 64
        codes = rgb[..., 0] * 16 + rgb[..., 1] * 4 + rgb[..., 2]
        return np.bincount(codes.ravel(), minlength=64) / codes.size

    train = read_list(tiny_data.train_list)
    val = read_list(tiny_data.val_list)
    x = np.stack([features(s.path) for s in train])
    y = np.array([s.label for s in train])
    centroids = np.stack([x[y == k].mean(axis=0) for k in range(10)])
    xv = np.stack([features(s.path) for s in val])
    predicted = np.argmin(((xv[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (predicted == np.array([s.label for s in val])).mean()
    assert accuracy >= 0.6, accuracy


def test_same_seed_same_bytes_other_seed_other_bytes(tiny_data, tmp_path):
    again = ensure_demo_data(tmp_path / "again", preset="tiny", seed=0)
    other = ensure_demo_data(tmp_path / "other", preset="tiny", seed=1)
    reference = digest(image_files(tiny_data.root))
    assert digest(image_files(again.root)) == reference
    for name in ("Train.txt", "Test.txt", "classes.txt"):
        assert Path(again.root, name).read_bytes() == Path(tiny_data.root, name).read_bytes()
    different = digest(image_files(other.root))
    assert different.keys() == reference.keys()  # same names...
    assert sum(different[k] != reference[k] for k in reference) == len(reference)  # ...new pixels


def test_process_pool_draws_the_same_bytes(tiny_data, tmp_path):
    pooled = ensure_demo_data(tmp_path / "pooled", preset="tiny", seed=0, workers=2)
    assert digest(image_files(pooled.root)) == digest(image_files(tiny_data.root))


def test_second_call_reuses_without_rewriting(tiny_data):
    files = image_files(tiny_data.root)[::15] + [
        tiny_data.train_list,
        os.path.join(tiny_data.root, MARKER_FILE),
    ]
    before = {p: os.stat(p).st_mtime_ns for p in files}
    again = ensure_demo_data(tiny_data.root, preset="tiny", seed=0)
    assert again.reused and dataclasses.replace(again, reused=False) == tiny_data
    assert {p: os.stat(p).st_mtime_ns for p in files} == before
    marker = json.loads(Path(tiny_data.root, MARKER_FILE).read_text())
    assert marker["preset"] == "tiny" and marker["seed"] == 0 and marker["train"] == 120


def test_interrupted_or_changed_trees_are_regenerated(tmp_path):
    root = tmp_path / "demo"
    data = ensure_demo_data(root, preset="tiny", seed=0)
    victim = image_files(root)[7]
    # A cut run: marker gone, a partial flag left, one image half written.
    os.remove(root / MARKER_FILE)
    (root / PARTIAL_FILE).write_bytes(b"")
    with open(victim, "r+b") as f:
        f.truncate(10)
    stray = root / "train" / CLASS_NAMES[0] / "stray.jpg"
    stray.write_bytes(b"left over")
    data = ensure_demo_data(root, preset="tiny", seed=0)
    assert os.path.getsize(victim) > 10 and not stray.exists()
    assert not (root / PARTIAL_FILE).exists() and (root / MARKER_FILE).exists()
    assert len(read_list(data.train_list)) == 120
    # Another seed on the same folder is refused, naming what is there and how to replace it,
    # and replaces the set only when asked (the marker then says so).
    before = digest([victim])
    with pytest.raises(
        DemoDataError,
        match=r"holds demo data of the tiny preset, seed 0 \(format 1\), not the tiny preset, seed 5 .* --seed 5 --replace$",
    ):
        ensure_demo_data(root, preset="tiny", seed=5)
    assert digest([victim]) == before and (root / MARKER_FILE).exists()
    data = ensure_demo_data(root, preset="tiny", seed=5, replace=True)
    assert data.seed == 5 and digest([victim]) != before
    assert json.loads((root / MARKER_FILE).read_text())["seed"] == 5


def test_concurrent_callers_share_one_generation(tmp_path):
    # Each call opens the lock file itself, so two threads contend like two ranks would.
    root = tmp_path / "shared"
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: ensure_demo_data(root, preset="tiny"), range(3)))
    assert sorted(r.reused for r in results) == [False, True, True]  # one generation
    assert len({dataclasses.replace(r, reused=False) for r in results}) == 1
    assert len(image_files(root)) == 160
    assert len(read_list(results[0].train_list, num_classes=10)) == 120


def test_foreign_train_folder_is_not_overwritten(tmp_path, make_image):
    mine = make_image(tmp_path / "photos" / "train" / "cats" / "precious.jpg")
    with pytest.raises(DemoDataError, match="not overwriting"):
        ensure_demo_data(tmp_path / "photos", preset="tiny")
    assert os.path.isfile(mine)


@pytest.mark.parametrize("name", ["Train.txt", "Test.txt", "classes.txt", "photo.jpg", "notes"])
def test_a_folder_holding_anything_of_the_users_is_not_touched(tmp_path, name):
    root = tmp_path / "mine"
    root.mkdir()
    (root / name).write_text("mine\n")
    with pytest.raises(DemoDataError, match=f"did not write \\({name}\\) and no demo marker"):
        ensure_demo_data(root, preset="tiny")
    assert os.listdir(root) == [name] and (root / name).read_text() == "mine\n"


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown demo preset 'huge'"):
        ensure_demo_data(tmp_path, preset="huge")


def test_default_root_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DEMO_DATA_DIR", str(tmp_path / "cache"))
    assert default_demo_root() == str(tmp_path / "cache")
    monkeypatch.delenv("DEMO_DATA_DIR")
    assert default_demo_root() == os.path.join(REPO, "data", "demo")


def test_default_preset_shape():
    preset = PRESETS["default"]
    assert (preset.train_per_class, preset.val_per_class) == (160, 40)
    assert set(preset.sizes) == set(PHOTO_SIZES)
    rng = np.random.default_rng(0)
    for w, h in PHOTO_SIZES[:2]:
        pixels = render_image("rings", 180.0, size=(w, h), rng=rng)
        assert pixels.shape == (h, w, 3) and pixels.dtype == np.uint8
        assert pixels.std() > 20  # a texture, not a flat fill


def test_cli_prints_a_summary(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "make_demo_data.py"), str(tmp_path / "d")]
        + ["--preset", "tiny", "--seed", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "tiny preset, seed 2" in result.stdout and ": generated [" in result.stdout
    assert "train: 120 images" in result.stdout and "val: 40 images" in result.stdout


def test_cli_reuses_refuses_and_replaces_in_one_line(tiny_data, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_demo_data_cli", os.path.join(REPO, "tools", "make_demo_data.py")
    )
    make_demo_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_demo_data)
    assert make_demo_data.main([tiny_data.root, "--preset", "tiny"]) == 0
    assert ": reused, generated earlier (nothing written)" in capsys.readouterr().out
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert make_demo_data.main([str(a_file), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {a_file} is a file, not a folder: choose a folder for the demo data\n"
    with pytest.raises(SystemExit) as stopped:
        make_demo_data.main([str(tmp_path / "d"), "--workers", "0"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith("error: argument --workers: 0 is below")
    for flag in ("--preset", "--seed", "--workers", "--replace"):
        text = make_demo_data.build_parser().format_help().split(flag, 1)[1].split("\n  -")[0]
        assert "default" in text, flag
