"""Class-per-folder image trees -> ``Train.txt`` / ``Test.txt`` / ``classes.txt``.

Two layouts are understood:

* **split**: ``ROOT/train/<class>/...`` and ``ROOT/val/<class>/...`` (or ``ROOT/test/``). Each
  becomes its own list; the class map comes from ``train/`` and a class folder under ``val/``
  that ``train/`` lacks is an error.
* **flat**: ``ROOT/<class>/...`` (torchvision ``ImageFolder``). Each class is split into train
  and val by a fraction, stratified and deterministic for a seed (see ``val_count``).

As in ``ImageFolder``: class index = position in the sorted class folder names, files in nested
folders of a class folder belong to that class, symlinks are followed. Unlike it, dot-prefixed
files and folders (``.DS_Store``, ``.ipynb_checkpoints``) are skipped and counted. A class
folder without images still gets its label index (so adding images later does not renumber the
others), and is reported.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

from pipelines.lists import CLASSES_FILE, TRAIN_LIST, VAL_LIST, Sample, write_classes, write_list

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

# Reasons a file is left out of the lists while scanning (``verify`` adds decode failures).
SKIP_HIDDEN = "hidden"
SKIP_NOT_IMAGE = "not an image file"
SKIP_OUTSIDE = "outside the class folders"
SKIP_OUTPUT = "the output folder"
SKIP_LINE_BREAK = "line break in the name (a list cannot hold it)"


class ScanError(ValueError):
    """An image tree that cannot become lists; the message names the folder or file."""


@dataclass
class FolderScan:
    """What one class-folder root holds."""

    root: str
    classes: list[str]  # label k = classes[k]
    samples: list[Sample]  # sorted by (label, path)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), sorted
    empty_classes: list[str] = field(default_factory=list)  # class names without images


@dataclass
class ListsReport:
    """The outcome of ``make_lists``: what was written and what was left out, and why."""

    root: str
    layout: str  # "split" (train/ + val/) or "flat" (class folders, split by fraction)
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    train_list: str
    val_list: str
    classes_file: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    empty_classes: list[str] = field(default_factory=list)  # "train/<name>", "val/<name>"...
    excluded: list[tuple[str, str]] = field(default_factory=list)  # failed --verify
    notes: list[str] = field(default_factory=list)


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def find_classes(root: str | os.PathLike) -> list[str]:
    """Sorted names of the non-hidden subfolders of ``root`` (symlinks to folders count)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ScanError(f"{root}: not a folder")
    with os.scandir(root) as entries:
        names = sorted(e.name for e in entries if not _is_hidden(e.name) and e.is_dir())
    for name in names:
        if "\n" in name or "\r" in name:
            raise ScanError(f"{os.path.join(root, name)!r}: a class name cannot hold a line break")
    return names


def _walk_class_folder(folder: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under ``folder`` (recursively, sorted) and the skipped entries."""
    images: list[str] = []
    skipped: list[tuple[str, str]] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop: walk each real folder once
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        for name in dirnames:
            if _is_hidden(name):
                skipped.append((os.path.join(dirpath, name), SKIP_HIDDEN))
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if _is_hidden(name):
                skipped.append((path, SKIP_HIDDEN))
            elif not is_image_file(name):
                skipped.append((path, SKIP_NOT_IMAGE))
            elif "\n" in path or "\r" in path:
                skipped.append((path, SKIP_LINE_BREAK))
            else:
                images.append(path)
    return images, skipped


def scan_folders(
    root: str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
    ignore: Collection[str] = (),
) -> FolderScan:
    """Find the images under ``root/<class>/``.

    With ``classes`` (the class map of a train tree), every class folder under ``root`` must be
    one of them and labels follow that map; otherwise the map is ``find_classes(root)``.
    Files directly in ``root`` are skipped (counted as outside the class folders), and so are
    the subfolders named in ``ignore`` (the lists' own output folder).
    """
    root = os.path.abspath(os.fspath(root))
    folders = [name for name in find_classes(root) if name not in ignore]
    if classes is None:
        class_names = folders
    else:
        class_names = list(classes)
        known = set(class_names)
        unknown = [name for name in folders if name not in known]
        if unknown:
            raise ScanError(
                f"{os.path.join(root, unknown[0])}: class {unknown[0]!r} is not among the "
                f"{len(class_names)} training classes"
                + (
                    f" (nor are {len(unknown) - 1} more: {unknown[1:4]})"
                    if len(unknown) > 1
                    else ""
                )
            )
    label_of = {name: k for k, name in enumerate(class_names)}
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    empty: list[str] = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name in folders:
                continue
            if entry.name in ignore:
                reason = SKIP_OUTPUT
            else:
                reason = SKIP_HIDDEN if _is_hidden(entry.name) else SKIP_OUTSIDE
            skipped.append((entry.path, reason))
    for name in folders:
        images, skipped_here = _walk_class_folder(os.path.join(root, name))
        skipped.extend(skipped_here)
        if not images:
            empty.append(name)
        samples.extend(Sample(os.path.normpath(p), label_of[name]) for p in images)
    samples.sort(key=lambda s: (s.label, s.path))
    return FolderScan(root, class_names, samples, sorted(skipped), empty)


def val_count(n: int, fraction: float) -> int:
    """How many of a class's ``n`` images go to val: ``round(n * fraction)`` (halves up),
    but at least 1 when ``n >= 2`` and ``fraction > 0``, and never all of them (a class with
    one image stays in train). ``fraction == 0`` gives 0."""
    if fraction <= 0 or n < 2:
        return 0
    k = math.floor(n * fraction + 0.5)
    return min(max(k, 1), n - 1)


def split_train_val(
    samples: Iterable[Sample], *, val_fraction: float, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Stratified split: per label, ``val_count`` images chosen by a shuffle seeded with
    ``(seed, label)`` over the sorted paths, so a result depends only on the files and seed."""
    if not 0 <= val_fraction < 1:
        raise ScanError(f"val fraction must be in [0, 1), got {val_fraction}")
    by_label: dict[int, list[Sample]] = {}
    for sample in samples:
        by_label.setdefault(sample.label, []).append(sample)
    train: list[Sample] = []
    val: list[Sample] = []
    for label, group in by_label.items():
        group = sorted(group, key=lambda s: s.path)
        random.Random(f"{seed}:{label}").shuffle(group)
        k = val_count(len(group), val_fraction)
        val.extend(group[:k])
        train.extend(group[k:])
    order = lambda s: (s.label, s.path)  # noqa: E731
    return sorted(train, key=order), sorted(val, key=order)


def check_image(path: str) -> str | None:
    """Decode ``path`` fully; None when it is a usable image, else the reason it is not."""
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode grey
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as image:
            image.load()
            image.convert("RGB")
    except Image.UnidentifiedImageError:
        return "not an image PIL can identify"
    except Exception as error:  # any failure to decode makes the file unusable
        return f"{type(error).__name__}: {error}"
    return None


def _check_chunk(paths: list[str]) -> list[tuple[str, str]]:
    return [(p, reason) for p in paths if (reason := check_image(p)) is not None]


def verify_images(
    paths: Sequence[str], *, workers: int | None = None, chunk_size: int | None = None
) -> list[tuple[str, str]]:
    """Decode every image, in ``workers`` processes; returns sorted ``(path, reason)`` of
    the files that failed. ``workers`` defaults to ``os.cpu_count()``; 1 runs in-process."""
    paths = list(paths)
    workers = max(1, workers or os.cpu_count() or 1)
    workers = min(workers, max(1, len(paths)))
    if workers == 1:
        return sorted(_check_chunk(paths))
    if chunk_size is None:  # a few chunks per worker, so a slow chunk does not idle the rest
        chunk_size = max(1, min(256, math.ceil(len(paths) / (workers * 4))))
    chunks = [paths[i : i + chunk_size] for i in range(0, len(paths), chunk_size)]
    failed: list[tuple[str, str]] = []
    # spawn, not fork: the caller may hold threads (torch, DALI) that fork would copy mid-lock
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for result in pool.map(_check_chunk, chunks):
            failed.extend(result)
    return sorted(failed)


def find_split_dirs(root: str | os.PathLike) -> tuple[str, str, list[str]] | None:
    """``(train_dir, val_dir, notes)`` when ``root`` has ``train/`` and ``val/`` or ``test/``."""
    root = os.fspath(root)
    train = os.path.join(root, "train")
    candidates = [os.path.join(root, n) for n in ("val", "test")]
    present = [d for d in candidates if os.path.isdir(d)]
    if not os.path.isdir(train) or not present:
        return None
    notes = []
    if len(present) == 2:
        notes.append(f"{present[1]} ignored: {present[0]} is the validation set")
    return train, present[0], notes


def _write_val_list(path: str, samples: list[Sample], *, absolute: bool, why_empty: str) -> None:
    if samples:
        write_list(path, samples, absolute=absolute)
        return
    # An empty list would be a read error, so a header says why there is nothing in it.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# no validation samples: {why_empty}\n")


def _require_two_classes(root: str, classes: list[str], samples: list[Sample], *, split: bool):
    """One class is never a classification data set: a trainer would report 100% top-1."""
    used = sorted({classes[s.label] for s in samples})
    if len(used) >= 2:
        return
    where = os.path.join(root, "train") if split else root
    found = f"one class with images ({used[0]!r})" if used else "no class with images"
    hint = ""
    if used and os.path.isdir(os.path.join(where, used[0])):
        inner = os.path.join(where, used[0])
        if find_classes(inner):
            hint = f"; if {inner} holds the class folders, run on it instead"
    raise ScanError(
        f"{where}: {found}; a classifier needs at least 2 classes, one folder each "
        f"({where}/<class>/<image>){hint}"
    )


def make_lists(
    root: str | os.PathLike,
    *,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.1,
    seed: int = 0,
    verify: bool = False,
    workers: int | None = None,
    absolute: bool = False,
    on_excluded: Callable[[str, str], None] | None = None,
) -> ListsReport:
    """Scan ``root`` and write ``Train.txt``, ``Test.txt`` and ``classes.txt`` into ``out_dir``.

    ``val_fraction`` applies to the flat layout only. With ``verify``, files that fail to
    decode are left out, before the split, and each is passed to ``on_excluded``.
    An empty val split still gets a ``Test.txt``, holding only a ``#`` comment saying why.
    Raises ScanError for a missing root, no class folders or no images.
    """
    root = os.path.abspath(os.fspath(root))
    out_dir = os.path.abspath(os.fspath(out_dir))
    if not os.path.isdir(root):
        raise ScanError(f"{root}: no such folder")
    if not 0 <= val_fraction < 1:
        raise ScanError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    notes: list[str] = []
    split_dirs = find_split_dirs(root)
    if split_dirs is not None:
        train_dir, val_dir, notes = split_dirs
        train_scan = scan_folders(train_dir)
        if not train_scan.classes:
            raise ScanError(f"{train_dir}: no class folders")
        val_scan = scan_folders(val_dir, classes=train_scan.classes)
        classes = train_scan.classes
        train, val = train_scan.samples, val_scan.samples
        skipped = sorted(train_scan.skipped + val_scan.skipped)
        empty = [f"train/{n}" for n in train_scan.empty_classes]
        empty += [f"{os.path.basename(val_dir)}/{n}" for n in val_scan.empty_classes]
        layout, why_empty = "split", f"{val_dir} holds no images"
    else:
        if os.path.isdir(os.path.join(root, "train")):
            notes.append(f"{root}/train has no val/ or test/ beside it: 'train' is a class")
        # An --out-dir inside ROOT must not turn into a class on the next run.
        inside = os.path.dirname(out_dir) == root
        scan = scan_folders(root, ignore={os.path.basename(out_dir)} if inside else set())
        if not scan.classes:
            raise ScanError(f"{root}: no class folders (expected ROOT/<class>/<image>)")
        classes, skipped, empty = scan.classes, scan.skipped, list(scan.empty_classes)
        train, val = scan.samples, []  # split below, once unusable files are out
        layout, why_empty = "flat", f"--val-fraction {val_fraction} left none"
    if not train and not val:
        raise ScanError(f"{root}: no image files in {len(classes)} class folders")
    _require_two_classes(root, classes, train + val, split=split_dirs is not None)
    excluded: list[tuple[str, str]] = []
    if verify:
        had_val = bool(val)
        excluded = verify_images([s.path for s in train + val], workers=workers)
        if on_excluded is not None:
            for path, reason in excluded:
                on_excluded(path, reason)
        bad = {path for path, _ in excluded}
        train = [s for s in train if s.path not in bad]
        val = [s for s in val if s.path not in bad]
        if had_val and not val:
            why_empty = "every one failed --verify"
    if layout == "flat":
        train, val = split_train_val(train, val_fraction=val_fraction, seed=seed)
    if not train:
        raise ScanError(f"{root}: no usable training images")
    train_list = os.path.join(out_dir, TRAIN_LIST)
    val_list = os.path.join(out_dir, VAL_LIST)
    classes_file = os.path.join(out_dir, CLASSES_FILE)
    write_list(train_list, train, absolute=absolute)
    _write_val_list(val_list, val, absolute=absolute, why_empty=why_empty)
    write_classes(classes_file, classes)
    return ListsReport(
        root=root,
        layout=layout,
        classes=classes,
        train=train,
        val=val,
        train_list=train_list,
        val_list=val_list,
        classes_file=classes_file,
        skipped=skipped,
        empty_classes=empty,
        excluded=excluded,
        notes=notes,
    )


def format_summary(report: ListsReport) -> str:
    """A short, deterministic, human-readable account of a ``make_lists`` run."""
    lines = [f"root: {report.root} ({report.layout} layout)"]
    lines += [f"note: {note}" for note in report.notes]
    lines += [f"warning: empty class folder: {name}" for name in report.empty_classes]
    lines.append(f"classes: {len(report.classes)}")
    lines.append(f"train: {len(report.train)} images -> {report.train_list}")
    lines.append(f"val: {len(report.val)} images -> {report.val_list}")
    lines.append(f"class names -> {report.classes_file}")
    reasons = Counter(reason for _, reason in report.skipped)
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    lines.append(f"skipped: {len(report.skipped)}" + (f" ({skipped})" if skipped else ""))
    lines.append(f"empty classes: {len(report.empty_classes)}")
    if report.excluded:
        lines.append(f"excluded by --verify: {len(report.excluded)} files")
    return "\n".join(lines)
