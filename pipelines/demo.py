"""The embedded demo data set: ten learnable image classes written as real files.

Each class is a texture in a colour of its own (red horizontal stripes, blue checkerboard,
...), filling the whole image, so a random-resized crop of any scale still shows the class;
photo-like extras (a neutral background tone, a lighting gradient, sensor noise, a few shapes
in random colours) vary per image and carry no label. Most files are JPEGs (quality 90), a
few are grayscale JPEGs and a few are PNGs, in varied sizes and aspect ratios.

Layout: ``ROOT/train/<class>/*``, ``ROOT/val/<class>/*``, and the lists beside them
(``ROOT/Train.txt``, ``ROOT/Test.txt``, ``ROOT/classes.txt``, paths relative) written by
``pipelines.scan``. A marker file, written last, records the preset, seed and format version:
``ensure_demo_data`` reuses a tree whose marker matches and finishes one whose generation was
cut. It never deletes what it did not write: a folder holding anything without the marker is
refused, and a generated tree of another preset, seed or format is replaced only when asked
(``replace=True``, ``tools/make_demo_data.py --replace``).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
from PIL import Image

from pipelines.fileio import atomic_write_text
from pipelines.lists import CLASSES_FILE, TRAIN_LIST, VAL_LIST
from pipelines.scan import make_lists

FORMAT_VERSION = 1
MARKER_FILE = ".demo_data.json"
PARTIAL_FILE = ".demo_data.partial"  # present while a generation is under way (or was cut)
LOCK_FILE = ".demo_data.lock"
ENV_DIR = "DEMO_DATA_DIR"

# (class name, texture, hue in degrees): texture and colour each tell the class apart.
CLASS_STYLES: tuple[tuple[str, str, float], ...] = (
    ("red_horizontal_stripes", "horizontal_stripes", 0.0),
    ("orange_blotches", "blotches", 28.0),
    ("yellow_dots", "dots", 55.0),
    ("lime_waves", "waves", 90.0),
    ("green_vertical_stripes", "vertical_stripes", 125.0),
    ("cyan_rings", "rings", 180.0),
    ("blue_checkerboard", "checkerboard", 220.0),
    ("violet_zigzag", "zigzag", 260.0),
    ("magenta_diagonal_stripes", "diagonal_stripes", 295.0),
    ("pink_grid", "grid", 330.0),
)
CLASS_NAMES = tuple(sorted(name for name, _, _ in CLASS_STYLES))

PHOTO_SIZES = ((500, 375), (375, 500), (640, 480), (480, 640), (512, 512), (600, 400))


@dataclass(frozen=True)
class Preset:
    train_per_class: int
    val_per_class: int
    sizes: tuple[tuple[int, int], ...] = ()  # (width, height) choices; empty: random sides
    side_range: tuple[int, int] = (40, 96)  # inclusive, used when ``sizes`` is empty
    parallel: bool = True  # a process pool pays off only for many large images


PRESETS = {
    "default": Preset(train_per_class=160, val_per_class=40, sizes=PHOTO_SIZES),
    "tiny": Preset(train_per_class=12, val_per_class=4, side_range=(40, 96), parallel=False),
}


@dataclass(frozen=True)
class DemoData:
    root: str
    train_list: str
    val_list: str
    classes_file: str
    num_classes: int
    preset: str = "default"
    seed: int = 0
    reused: bool = False  # found complete from an earlier call; nothing written


class DemoDataError(RuntimeError):
    """The demo folder cannot be used (it holds data the generator did not write)."""


def default_demo_root() -> str:
    """``$DEMO_DATA_DIR`` if set, else ``<repo>/data/demo`` (git-ignored)."""
    env = os.environ.get(ENV_DIR)
    if env:
        return os.path.abspath(env)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(repo, "data", "demo")


# --------------------------------------------------------------------------------------------
# Drawing: every function works on whole arrays (float32, values in [0, 1]).


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    h = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    return np.array(rgb, dtype=np.float32) + (v - c)


def _square_wave(z: np.ndarray, sharpness: float = 3.0) -> np.ndarray:
    # A sine pushed into saturation: a square wave with anti-aliased edges.
    return np.clip(0.5 + sharpness * np.sin(2 * np.pi * z), 0.0, 1.0)


def _rotated(x, y, degrees: float):
    a = math.radians(degrees)
    return x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)


def _texture(kind: str, x, y, w: int, h: int, period: float, rng) -> np.ndarray:
    """Texture coverage in [0, 1], shape (h, w)."""
    phase = rng.uniform(0, 1)
    if kind in ("horizontal_stripes", "vertical_stripes", "diagonal_stripes"):
        normal = {"horizontal_stripes": 90.0, "vertical_stripes": 0.0}.get(
            kind, float(rng.choice([45.0, 135.0]))
        )
        u, _ = _rotated(x, y, normal + rng.uniform(-12, 12))
        return _square_wave(u / period + phase)
    if kind == "checkerboard":
        u, v = _rotated(x, y, rng.uniform(-20, 20))
        a, b = _square_wave(u / period + phase), _square_wave(v / period + rng.uniform(0, 1))
        return a + b - 2 * a * b  # soft xor
    if kind == "dots":
        u, v = _rotated(x, y, rng.uniform(0, 90))
        du = (u / period + phase) % 1.0 - 0.5
        dv = (v / period + rng.uniform(0, 1)) % 1.0 - 0.5
        distance = np.sqrt(du * du + dv * dv) * period  # pixels from the nearest dot centre
        radius = period * rng.uniform(0.22, 0.34)
        return np.clip(radius - distance + 0.5, 0.0, 1.0)
    if kind == "rings":
        cx, cy = rng.uniform(-0.3, 1.3) * w, rng.uniform(-0.3, 1.3) * h
        r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        return _square_wave(r / period + phase)
    if kind == "grid":
        u, v = _rotated(x, y, rng.uniform(-15, 15))
        half = period * rng.uniform(0.08, 0.12)
        fu = np.abs((u / period + phase) % 1.0 - 0.5) * period  # pixels from the line
        fv = np.abs((v / period + rng.uniform(0, 1)) % 1.0 - 0.5) * period
        return np.clip(half - np.minimum(fu, fv) + 0.5, 0.0, 1.0)
    if kind in ("waves", "zigzag"):
        u, v = _rotated(x, y, rng.uniform(0, 180))
        wavelength = period * rng.uniform(2.5, 4.0)
        amplitude = period * rng.uniform(0.5, 0.9)
        z = u / wavelength + rng.uniform(0, 1)
        sine, triangle = np.sin(2 * np.pi * z), 4 * np.abs(z % 1.0 - 0.5) - 1
        shift = sine if kind == "waves" else triangle
        return _square_wave((v + amplitude * shift) / period + phase)
    if kind == "blotches":
        cells = (max(2, math.ceil(h / period) + 1), max(2, math.ceil(w / period) + 1))
        coarse = rng.standard_normal(cells).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse, "F").resize((w, h), Image.BICUBIC))
        return np.clip(0.5 + 2.5 * smooth, 0.0, 1.0)
    raise ValueError(f"unknown texture {kind!r}")


def _paint_shape(image: np.ndarray, rng, size_ref: int) -> None:
    """One shape (circle, square, triangle, cross or star) in a random colour, in place."""
    h, w, _ = image.shape
    radius = size_ref * rng.uniform(0.08, 0.18)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    x0, x1 = max(0, int(cx - radius) - 1), min(w, int(cx + radius) + 2)
    y0, y1 = max(0, int(cy - radius) - 1), min(h, int(cy + radius) + 2)
    if x0 >= x1 or y0 >= y1:
        return
    y, x = np.ogrid[y0:y1, x0:x1]
    u, v = _rotated((x - cx).astype(np.float32), (y - cy).astype(np.float32), rng.uniform(0, 90))
    kind = rng.choice(["circle", "square", "triangle", "cross", "star"])
    if kind == "circle":
        mask = u * u + v * v <= radius * radius
    elif kind == "square":
        mask = np.maximum(np.abs(u), np.abs(v)) <= radius * 0.8
    elif kind == "triangle":  # three half-planes at 120 degrees
        mask = np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
        for k in range(3):
            a = math.radians(90 + 120 * k)
            mask &= u * math.cos(a) + v * math.sin(a) <= radius * 0.5
    elif kind == "cross":
        arm = radius * 0.3
        mask = ((np.abs(u) <= arm) & (np.abs(v) <= radius)) | (
            (np.abs(v) <= arm) & (np.abs(u) <= radius)
        )
    else:
        angle = np.arctan2(v, u)
        reach = radius * (0.45 + 0.55 * np.abs(np.cos(2.5 * angle)))
        mask = np.sqrt(u * u + v * v) <= reach
    colour = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.3, 1), rng.uniform(0.2, 1))
    image[y0:y1, x0:x1][mask] = colour


def render_image(texture: str, hue: float, *, size: tuple[int, int], rng) -> np.ndarray:
    """One demo image of ``size`` (width, height) as uint8 HWC RGB."""
    w, h = size
    y, x = np.ogrid[0:h, 0:w]
    x, y = x.astype(np.float32), y.astype(np.float32)
    short = min(w, h)
    period = max(6.0, short * rng.uniform(0.06, 0.12))
    coverage = _texture(texture, x, y, w, h, period, rng)[..., None]
    dark_background = rng.uniform() < 0.5
    bg_value = rng.uniform(0.05, 0.35) if dark_background else rng.uniform(0.7, 0.95)
    # On a light background a full-value yellow or cyan would all but vanish: darken it.
    fg_value = rng.uniform(0.7, 1.0) if dark_background else rng.uniform(0.55, 0.8)
    fg = _hsv_to_rgb(hue + rng.uniform(-6, 6), rng.uniform(0.7, 1.0), fg_value)
    bg = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0, 0.15), bg_value)
    image = bg + (fg - bg) * coverage
    for _ in range(int(rng.integers(0, 4))):
        _paint_shape(image, rng, short)
    gx, gy = rng.uniform(-0.35, 0.35, size=2)
    light = 1.0 + gx * (x / w - 0.5) + gy * (y / h - 0.5)
    image = image * light[..., None]
    noise = rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(0.005, 0.02)
    return (np.clip(image + noise, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Generation.


@dataclass(frozen=True)
class _ImageJob:
    path: str
    texture: str
    hue: float
    seed: tuple[int, ...]
    fmt: str  # "JPEG" or "PNG"
    grayscale: bool
    preset: str


def _plan(root: str, preset_name: str, seed: int) -> list[_ImageJob]:
    """Every file to write; each image's randomness comes from its own seed sequence, so the
    bytes do not depend on the order or the process it is drawn in."""
    preset = PRESETS[preset_name]
    per_class = preset.train_per_class + preset.val_per_class
    styles = {name: (texture, hue) for name, texture, hue in CLASS_STYLES}
    jobs = []
    for class_index, name in enumerate(CLASS_NAMES):
        texture, hue = styles[name]
        for i in range(per_class):
            split, n = (
                ("train", i) if i < preset.train_per_class else ("val", i - preset.train_per_class)
            )
            serial = class_index * per_class + i  # decides the odd file types, spread out
            grayscale = serial % 29 == 5
            fmt = "PNG" if serial % 31 == 11 and not grayscale else "JPEG"
            ext = ".png" if fmt == "PNG" else ".jpg"
            path = os.path.join(root, split, name, f"{split}_{n:04d}{ext}")
            jobs.append(
                _ImageJob(path, texture, hue, (seed, class_index, i), fmt, grayscale, preset_name)
            )
    return jobs


def _write_image(job: _ImageJob) -> None:
    preset = PRESETS[job.preset]
    rng = np.random.default_rng(np.random.SeedSequence(job.seed))
    if preset.sizes:
        size = preset.sizes[int(rng.integers(len(preset.sizes)))]
    else:
        lo, hi = preset.side_range
        size = (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))
    image = Image.fromarray(render_image(job.texture, job.hue, size=size, rng=rng), "RGB")
    if job.grayscale:
        image = image.convert("L")
    if job.fmt == "JPEG":
        image.save(job.path, "JPEG", quality=90)
    else:
        image.save(job.path, "PNG")


def _write_chunk(jobs: list[_ImageJob]) -> int:
    for job in jobs:
        _write_image(job)
    return len(jobs)


@contextmanager
def _locked(root: str) -> Iterator[None]:
    # Several ranks (or test workers) may ask for the same folder at once: one generates,
    # the others wait and then find the marker.
    with open(os.path.join(root, LOCK_FILE), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_marker(root: str) -> dict | None:
    try:
        with open(os.path.join(root, MARKER_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _result(root: str, preset: str, seed: int, *, reused: bool = False) -> DemoData:
    return DemoData(
        root=root,
        train_list=os.path.join(root, TRAIN_LIST),
        val_list=os.path.join(root, VAL_LIST),
        classes_file=os.path.join(root, CLASSES_FILE),
        num_classes=len(CLASS_NAMES),
        preset=preset,
        seed=seed,
        reused=reused,
    )


def _generate(root: str, preset_name: str, seed: int, workers: int | None) -> None:
    for split in ("train", "val"):
        shutil.rmtree(os.path.join(root, split), ignore_errors=True)
    jobs = _plan(root, preset_name, seed)
    for folder in sorted({os.path.dirname(job.path) for job in jobs}):
        os.makedirs(folder, exist_ok=True)
    if workers is None:
        workers = (os.cpu_count() or 1) if PRESETS[preset_name].parallel else 1
    if workers <= 1:
        _write_chunk(jobs)
        return
    chunk = max(1, min(64, len(jobs) // (workers * 4)))
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    # spawn, not fork: the caller may already run threads (torch, DALI) that fork would copy
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        written = sum(pool.map(_write_chunk, chunks))
    assert written == len(jobs)


def ensure_demo_data(
    root: str | os.PathLike | None = None,
    *,
    preset: str = "default",
    seed: int = 0,
    workers: int | None = None,
    replace: bool = False,
) -> DemoData:
    """The demo data set under ``root`` (default: ``default_demo_root()``), generated on the
    first call and reused while its marker matches ``preset``, ``seed`` and the format.

    ``workers`` processes draw the images (default: ``os.cpu_count()``, but in-process for
    the tiny preset; the files are the same bytes either way). Raises DemoDataError, deleting
    nothing, when ``root`` is a file, holds anything the generator did not write (no marker),
    or holds a generated tree of another preset, seed or format and ``replace`` is False.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; choose from {sorted(PRESETS)}")
    root = os.path.abspath(os.fspath(root) if root is not None else default_demo_root())
    if os.path.exists(root) and not os.path.isdir(root):
        raise DemoDataError(f"{root} is a file, not a folder: choose a folder for the demo data")
    _refuse_foreign(root)  # before the lock file is created in a folder that is not ours
    os.makedirs(root, exist_ok=True)
    expected = {"format": FORMAT_VERSION, "preset": preset, "seed": seed}
    with _locked(root):
        marker = _read_marker(root)
        result = _result(root, preset, seed)
        lists = (result.train_list, result.val_list, result.classes_file)
        matches = marker is not None and all(marker.get(k) == v for k, v in expected.items())
        if matches and all(os.path.isfile(p) for p in lists):
            return _result(root, preset, seed, reused=True)
        _refuse_foreign(root)  # again under the lock: another caller may have written meanwhile
        if marker is not None and not replace:
            raise DemoDataError(_other_tree_message(root, marker, expected, lists))
        open(os.path.join(root, PARTIAL_FILE), "w").close()
        for name in (MARKER_FILE, *lists):
            if os.path.exists(os.path.join(root, name)):
                os.remove(os.path.join(root, name))
        _generate(root, preset, seed, workers)
        report = make_lists(root, out_dir=root)
        if report.classes != list(CLASS_NAMES) or len(report.train) + len(report.val) != len(
            _plan(root, preset, seed)
        ):
            raise DemoDataError(f"{root}: generated tree does not match the plan")
        marker = {
            **expected,
            "classes": list(CLASS_NAMES),
            "train": len(report.train),
            "val": len(report.val),
        }
        # Last: the marker says the tree is complete.
        atomic_write_text(os.path.join(root, MARKER_FILE), json.dumps(marker, indent=2))
        os.remove(os.path.join(root, PARTIAL_FILE))
        return result


def _refuse_foreign(root: str) -> None:
    """A folder without the marker or the partial flag must hold nothing but the lock file:
    the generator would delete its train/, val/ and lists, and scan every other folder as a
    class."""
    if not os.path.isdir(root):
        return
    names = set(os.listdir(root))
    if names & {MARKER_FILE, PARTIAL_FILE}:
        return
    foreign = sorted(names - {LOCK_FILE})
    if foreign:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise DemoDataError(
            f"{root} holds files the demo generator did not write ({shown}) and no demo marker "
            f"({MARKER_FILE}); not overwriting it, choose an empty or new folder"
        )


def _other_tree_message(root: str, marker: dict, expected: dict, lists) -> str:
    """What the existing generated tree is, and how to replace it."""
    wanted = f"the {expected['preset']} preset, seed {expected['seed']}"
    if all(marker.get(k) == v for k, v in expected.items()):
        missing = ", ".join(os.path.basename(p) for p in lists if not os.path.isfile(p))
        what = f"holds demo data of {wanted} whose {missing} is missing"
    else:
        what = (
            f"holds demo data of the {marker.get('preset')} preset, seed {marker.get('seed')} "
            f"(format {marker.get('format')}), not {wanted} (format {expected['format']})"
        )
    return (
        f"{root} {what}: choose another folder, or replace it (its train/ and val/ are "
        f"deleted, files added there too) with: python tools/make_demo_data.py {root} "
        f"--preset {expected['preset']} --seed {expected['seed']} --replace"
    )
