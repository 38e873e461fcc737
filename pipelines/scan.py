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
import signal
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

from pipelines import paths, s3
from pipelines.imagecheck import image_problem
from pipelines.lists import (
    CLASSES_FILE,
    TRAIN_LIST,
    VAL_LIST,
    Sample,
    class_name_problem,
    write_classes,
    write_file,
    write_list,
)

# The formats both loaders decode (DALI and PIL read the contents, not the name): JPEG under
# its other names too (.jfif, .jpe), PNG, BMP, WebP, TIFF.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff"}
)
# Folder names (any case) of a split layout: ROOT/train/ with the first of these beside it.
TRAIN_DIR_NAMES = ("train",)
VAL_DIR_NAMES = ("val", "validation", "valid", "test")

# Reasons a file is left out of the lists while scanning (``verify`` adds decode failures).
SKIP_HIDDEN = "hidden"
SKIP_NOT_IMAGE = "not an image file"
SKIP_OUTSIDE = "outside the class folders"
SKIP_OUTPUT = "the output folder"
SKIP_LISTS = "a folder of list files, no images (an earlier --out-dir)"
SKIP_BESIDE_SPLIT = "beside the train/ and val/ folders"
SKIP_LINE_BREAK = "line break in the name (a list cannot hold it)"
SKIP_NOT_UTF8 = "name not valid UTF-8 (a list cannot hold it)"


# Per-class notes and warnings name each class while there are at most this many; beyond it
# (a val set of 100 of ImageNet's 1000 classes) one line gives their count and the first few,
# so that the summary's other lines do not scroll away under 900 lines of names.
NAMED_CLASSES = 10
NAMED_WHEN_MANY = 5


def _each_or_count(names: Sequence[str], one: str, many: str) -> list[str]:
    """``one.format(name)`` per name, or past NAMED_CLASSES a single ``many.format(count)``
    followed by the first NAMED_WHEN_MANY names."""
    if len(names) <= NAMED_CLASSES:
        return [one.format(name) for name in names]
    return [f"{many.format(len(names))}: {', '.join(names[:NAMED_WHEN_MANY])}, ..."]


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
    verified: int = 0  # images checked by --verify (0: not asked)


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
        problem = class_name_problem(name)
        if problem is None and not _is_utf8(name):
            problem = "is not valid UTF-8"
        if problem is not None:
            raise ScanError(
                f"{os.path.join(root, name)!r}: a class folder's name {problem}; classes.txt "
                "cannot hold it (rename the folder)"
            )
    return names


def _is_utf8(name: str) -> bool:
    # A name that is not UTF-8 on disk reaches Python with surrogate escapes, which a list
    # file (UTF-8) cannot hold.
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
            elif not _is_utf8(path):
                skipped.append((path, SKIP_NOT_UTF8))
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
    subfolders = find_classes(root)
    lists_folders = {n for n in subfolders if _is_lists_folder(root, n)}
    ignore = set(ignore)
    folders = [name for name in subfolders if name not in ignore | lists_folders]
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
            elif entry.name in lists_folders:
                reason = SKIP_LISTS
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


def _holds_images(folder: str, *, recursive: bool = True) -> bool:
    if recursive:
        return bool(_walk_class_folder(folder)[0])
    with os.scandir(folder) as entries:
        return any(e.is_file() and is_image_file(e.name) for e in entries)


def _is_lists_folder(root: str, name: str) -> bool:
    """``ROOT/name`` holds lists this tool wrote (an earlier --out-dir) and no image: not a
    class. Stops at the first image, so a real class folder costs one directory read."""
    found_lists = False
    for _dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        if any(is_image_file(f) and not _is_hidden(f) for f in filenames):
            return False
        # All a make_lists output holds: classes.txt and a list (an empty class folder that
        # happens to hold a Train.txt is still a class).
        found_lists = found_lists or (
            CLASSES_FILE in filenames and bool({TRAIN_LIST, VAL_LIST}.intersection(filenames))
        )
    return found_lists


def _output_folder(root: str, out_dir: str) -> set[str]:
    """The class-level folder of ROOT that holds ``out_dir``, when it is not a class: the
    lists' own folder (``ROOT/lists``) or a folder of them (``ROOT/lists/v2``) holding no
    images. Left in, it would become a class on the next run and renumber the others. A
    class folder of images stays a class, lists in it or not (``--out-dir ROOT/cat`` left
    the class cat out, its images counted as one skipped "output folder")."""
    relative = os.path.relpath(out_dir, root)
    if relative == os.curdir or relative.startswith(os.pardir):
        return set()
    top = relative.split(os.sep)[0]
    folder = os.path.join(root, top)
    if not os.path.isdir(folder) or not _holds_images(folder):
        return {top}
    return set()


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
    """Check ``path`` as both loaders would read it (``pipelines.imagecheck``: DALI's formats,
    PNG checksums, a full decode); None when it is usable, else the reason it is not."""
    if s3.is_url(path):  # the object's bytes, fetched once
        try:
            path = s3.read_bytes(path)
        except s3.S3Error as error:
            return str(error).split(": ", 1)[-1]
        return "empty file" if not path else image_problem(path)
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
    except OSError as error:
        return f"{type(error).__name__}: {error}"
    return image_problem(path)


def _check_chunk(paths: list[str]) -> list[tuple[str, str]]:
    return [(p, reason) for p in paths if (reason := check_image(p)) is not None]


def verify_images(
    paths: Sequence[str],
    *,
    workers: int | None = None,
    chunk_size: int | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> list[tuple[str, str]]:
    """Decode every image, in ``workers`` processes; returns sorted ``(path, reason)`` of
    the files that failed. ``workers`` defaults to ``os.cpu_count()``; 1 runs in-process.
    ``on_progress(checked, total, failed)`` is called after each chunk: a full decode of an
    ImageNet-sized tree takes an hour or more on a few cores."""
    paths = list(paths)
    workers = max(1, workers or os.cpu_count() or 1)
    workers = min(workers, max(1, len(paths)))
    if chunk_size is None:  # a few chunks per worker, so a slow chunk does not idle the rest
        chunk_size = max(1, min(256, math.ceil(len(paths) / (workers * 4))))
    chunks = [paths[i : i + chunk_size] for i in range(0, len(paths), chunk_size)]
    failed: list[tuple[str, str]] = []
    checked = 0

    def add(chunk: list[str], result: list[tuple[str, str]]) -> None:
        nonlocal checked
        failed.extend(result)
        checked += len(chunk)
        if on_progress is not None:
            on_progress(checked, len(paths), len(failed))

    if workers == 1:
        for chunk in chunks:
            add(chunk, _check_chunk(chunk))
        return sorted(failed)
    # spawn, not fork: the caller may hold threads (torch, DALI) that fork would copy mid-lock
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=_ignore_interrupt
    ) as pool:
        try:
            for chunk, result in zip(chunks, pool.map(_check_chunk, chunks), strict=True):
                add(chunk, result)
        except KeyboardInterrupt:
            # Ctrl-C: the chunks not started are dropped, so leaving the pool waits only for
            # the ones in hand, not for the rest of the tree.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return sorted(failed)


def _ignore_interrupt() -> None:
    # Ctrl-C reaches every process of the terminal's group: a worker's KeyboardInterrupt
    # would print a traceback per worker. The parent alone stops the work.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _subfolder(root: str, names: Sequence[str]) -> list[str]:
    """The subfolders of ``root`` named one of ``names`` (any case), in that preference."""
    with os.scandir(root) as entries:
        folders = {e.name.lower(): e.path for e in entries if e.is_dir()}
    return [folders[n] for n in names if n in folders]


def find_split_dirs(root: str | os.PathLike) -> tuple[str, str, list[str]] | None:
    """``(train_dir, val_dir, notes)`` when ``root`` has ``train/`` and ``val/`` (or
    ``validation/``, ``valid/``, ``test/``), in any case (``Train/``, ``VAL/``)."""
    root = os.fspath(root)
    train = _subfolder(root, TRAIN_DIR_NAMES)
    present = _subfolder(root, VAL_DIR_NAMES)
    if not train or not present:
        return None
    if _holds_images(train[0], recursive=False) or not find_classes(train[0]):
        return None  # a "train" holding images is a class of a flat tree, as is "test" then
    notes = [f"{other} ignored: {present[0]} is the validation set" for other in present[1:]]
    return train[0], present[0], notes


def _write_val_list(path: str, samples: list[Sample], *, absolute: bool, why_empty: str) -> None:
    if samples:
        write_list(path, samples, absolute=absolute)
        return
    # An empty list would be a read error, so a header says why there is nothing in it.
    header = f"# no validation samples: {why_empty}\n".encode()
    write_file(path, lambda f: f.write(header))


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
    on_verify_progress: Callable[[int, int, int], None] | None = None,
) -> ListsReport:
    """Scan ``root`` and write ``Train.txt``, ``Test.txt`` and ``classes.txt`` into ``out_dir``.

    ``val_fraction`` applies to the flat layout only. With ``verify``, files that fail to
    decode are left out, before the split, and each is passed to ``on_excluded``;
    ``on_verify_progress`` is ``verify_images``'s ``on_progress``.
    An empty val split still gets a ``Test.txt``, holding only a ``#`` comment saying why.
    Raises ScanError for a missing root, no class folders or no images.
    """
    root, out_dir = os.fspath(root), os.fspath(out_dir)
    if not 0 <= val_fraction < 1:
        raise ScanError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not s3.is_url(out_dir):
        out_dir = os.path.abspath(out_dir)
    if not s3.is_url(root):
        root = os.path.abspath(root)
        if not os.path.isdir(root):
            raise ScanError(f"{root}: no such folder")
    split_dirs = None if s3.is_url(root) else find_split_dirs(root)
    if s3.is_url(root):  # a bucket prefix: the same layouts, from one listing
        root = s3.join(root)
        scanned = scan_bucket(root, out_dir=out_dir, val_fraction=val_fraction)
        layout, classes, train, val, skipped, empty, notes, why_empty = scanned
    elif split_dirs is not None:
        train_dir, val_dir, notes = split_dirs
        train_scan = scan_folders(train_dir)
        if not train_scan.classes:
            raise ScanError(f"{train_dir}: no class folders")
        val_scan = scan_folders(val_dir, classes=train_scan.classes)
        classes = train_scan.classes
        train, val = train_scan.samples, val_scan.samples
        split_dirs_used = {os.path.realpath(train_dir), os.path.realpath(val_dir)}
        beside = [
            (entry.path, SKIP_BESIDE_SPLIT)
            for entry in os.scandir(root)
            if os.path.realpath(entry.path) not in split_dirs_used
            and not _is_hidden(entry.name)
            and entry.name.lower() not in TRAIN_DIR_NAMES + VAL_DIR_NAMES  # noted as ignored
            and os.path.realpath(entry.path) != os.path.realpath(out_dir)
        ]
        skipped = sorted(train_scan.skipped + val_scan.skipped + beside)
        notes += [f"{path} is not listed: it lies beside the split folders" for path, _ in beside]
        empty = [f"{os.path.basename(train_dir)}/{n}" for n in train_scan.empty_classes]
        empty += [f"{os.path.basename(val_dir)}/{n}" for n in val_scan.empty_classes]
        layout, why_empty = "split", f"{val_dir} holds no images"
        # Images lying directly in val/ have no class folder, so no label: ImageNet's own
        # val/ is flat like this (its labels are in the devkit). Listed as "skipped" only,
        # the run trained without validation and Test.txt said val/ held no images.
        loose = [
            path
            for path, reason in val_scan.skipped
            if reason == SKIP_OUTSIDE and is_image_file(os.path.basename(path))
        ]
        if loose and not val:
            raise ScanError(
                f"{val_dir}: its {len(loose)} images lie directly in it, with no class "
                f"folders to label them (expected {os.path.basename(val_dir)}/<class>/<image>, "
                "as in train/); sort them into class folders (ImageNet's val/: by the "
                "devkit's ground truth), or move the folder away to train without validation"
            )
        if loose:
            notes.append(
                f"{len(loose)} images directly in {val_dir} are not listed: no class folder "
                f"labels them (e.g. {loose[0]})"
            )
    else:
        notes = []
        for lone in _subfolder(root, TRAIN_DIR_NAMES + VAL_DIR_NAMES):
            name = os.path.basename(lone)
            # A val-named folder alone cannot be half a split (that needs train/): a class.
            is_val = name.lower() in VAL_DIR_NAMES
            if is_val or _holds_images(lone, recursive=False) or not find_classes(lone):
                notes.append(f"{name!r} is taken as a class, not as a split folder ({lone})")
                continue
            # Only folders inside: the half of a split layout, not a class.
            raise ScanError(
                f"{lone}: looks like half of a split layout (train/ with val/, validation/ or "
                f"test/ beside it, each holding the class folders), but its other half is "
                f"missing, and {name!r} would become one class; to split its classes by "
                f"--val-fraction, run on it instead"
            )
        scan = scan_folders(root, ignore=_output_folder(root, out_dir))
        if not scan.classes:
            raise ScanError(f"{root}: no class folders (expected ROOT/<class>/<image>)")
        classes, skipped, empty = scan.classes, scan.skipped, list(scan.empty_classes)
        train, val = scan.samples, []  # split below, once unusable files are out
        layout, why_empty = "flat", f"--val-fraction {val_fraction} left none"
    split = layout == "split"
    if not train and not val:
        raise ScanError(f"{root}: no image files in {len(classes)} class folders")
    _require_two_classes(root, classes, train + val, split=split)
    excluded: list[tuple[str, str]] = []
    verified = 0
    if verify:
        had_val = bool(val)
        verified = len(train) + len(val)
        excluded = verify_images(
            [s.path for s in train + val], workers=workers, on_progress=on_verify_progress
        )
        if on_excluded is not None:
            for path, reason in excluded:
                on_excluded(path, reason)
        bad = {path for path, _ in excluded}
        before = {s.label for s in train + val}
        train = [s for s in train if s.path not in bad]
        val = [s for s in val if s.path not in bad]
        if had_val and not val:
            why_empty = "every one failed --verify"
            notes.append("every val image failed --verify: the trainer will not validate")
        after = {s.label for s in train + val}
        notes += _each_or_count(
            [repr(classes[label]) for label in sorted(before - after)],
            "class {}: every image failed --verify",
            "{} classes: every image failed --verify",
        )
        # Checked again: --verify may have emptied all classes but one.
        _require_two_classes(root, classes, train + val, split=split)
    if layout == "flat":
        train, val = split_train_val(train, val_fraction=val_fraction, seed=seed)
    if not train:
        raise ScanError(f"{root}: no usable training images")
    if val or (layout == "flat" and val_fraction > 0):
        in_train, in_val = {s.label for s in train}, {s.label for s in val}
        notes += _each_or_count(
            [repr(classes[label]) for label in sorted(in_train - in_val)],
            "class {} has no val images",
            "{} classes have no val images",
        )
        notes += _each_or_count(
            [repr(classes[label]) for label in sorted(in_val - in_train)],
            "class {} has val images but none for training",
            "{} classes have val images but none for training",
        )
    if not s3.is_url(out_dir) and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ScanError(f"{out_dir}: --out-dir is a file, not a folder")
    train_list = paths.join(out_dir, TRAIN_LIST)
    val_list = paths.join(out_dir, VAL_LIST)
    classes_file = paths.join(out_dir, CLASSES_FILE)
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
        verified=verified,
    )


def format_summary(report: ListsReport) -> str:
    """A short, deterministic, human-readable account of a ``make_lists`` run."""
    lines = [f"root: {report.root} ({report.layout} layout)"]
    lines += [f"note: {note}" for note in report.notes]
    lines += _each_or_count(
        report.empty_classes, "warning: empty class folder: {}", "warning: {} empty class folders"
    )
    lines.append(f"classes: {len(report.classes)}")
    lines.append(f"train: {len(report.train)} images -> {report.train_list}")
    lines.append(f"val: {len(report.val)} images -> {report.val_list}")
    lines.append(f"class names -> {report.classes_file}")
    reasons = Counter(reason for _, reason in report.skipped)
    parts = []
    for reason, n in sorted(reasons.items()):
        if reason == SKIP_NOT_IMAGE:  # which kinds: a .gif or a .jfif among them is news
            kinds = Counter(
                os.path.splitext(p)[1].lower() or "no extension"
                for p, r in report.skipped
                if r == reason
            )
            ranked = sorted(kinds.items(), key=lambda kc: (-kc[1], kc[0]))
            reason += ": " + ", ".join(f"{k} {c}" for k, c in ranked[:6])
            reason += ", ..." if len(kinds) > 6 else ""
        parts.append(f"{n} {reason}")
    skipped = "; ".join(parts)
    lines.append(f"skipped: {len(report.skipped)}" + (f" ({skipped})" if skipped else ""))
    lines.append(f"empty classes: {len(report.empty_classes)}")
    if report.verified:
        lines.append(f"--verify: {report.verified} images checked, {len(report.excluded)} excluded")
    return "\n".join(lines)


def scan_bucket(root: str, *, out_dir: str, val_fraction: float):
    """``make_lists``' scan of a bucket prefix (``s3://bucket/ROOT``) of class folders: the
    same two layouts and rules as on a disk, from one listing of the prefix (a thousand
    objects a request), never a request per image. Returns (layout, classes, train, val,
    skipped, empty classes, notes, why val is empty); train holds every image of a flat
    layout (split later)."""
    prefix = root.rstrip("/") + "/"
    out_prefix = s3.join(out_dir).rstrip("/") + "/" if s3.is_url(out_dir) else None
    files: list[tuple[list[str], str]] = []
    skipped: list[tuple[str, str]] = []
    for url, _, _ in s3.list_objects(prefix):
        parts = url[len(prefix) :].split("/")
        if out_prefix is not None and url.startswith(out_prefix):
            skipped.append((url, SKIP_OUTPUT))
        elif any(_is_hidden(p) for p in parts):
            skipped.append((url, SKIP_HIDDEN))
        elif len(parts) == 1:
            skipped.append((url, SKIP_OUTSIDE))
        elif not is_image_file(parts[-1]):
            skipped.append((url, SKIP_NOT_IMAGE))
        else:
            files.append((parts, url))
    if not files and not skipped:
        raise ScanError(f"{root}: no objects under this prefix")
    top = {parts[0].lower(): parts[0] for parts, _ in files}
    train_name = top.get("train")
    val_name = next((top[n] for n in VAL_DIR_NAMES if n in top), None)
    # As on a disk: train/ and val/ each holding class folders, not images, make a split.
    split = (
        train_name is not None
        and val_name is not None
        and all(len(p) >= 3 for p, _ in files if p[0] in (train_name, val_name))
    )

    def classes_of(folder: str | None) -> list[str]:
        depth = 0 if folder is None else 1
        names = sorted({p[depth] for p, _ in files if folder is None or p[0] == folder})
        for name in names:
            problem = class_name_problem(name)
            if problem is not None:
                raise ScanError(f"{prefix}{name}/: a class folder's name {problem}")
        return names

    def samples_of(folder: str | None, classes: list[str]) -> list[Sample]:
        depth = 0 if folder is None else 1
        label_of = {name: k for k, name in enumerate(classes)}
        found = []
        for parts, url in files:
            if folder is not None and parts[0] != folder:
                continue
            if parts[depth] not in label_of:
                raise ScanError(
                    f"{prefix}{folder}/{parts[depth]}/: class {parts[depth]!r} is not among the "
                    f"{len(classes)} training classes"
                )
            found.append(Sample(url, label_of[parts[depth]]))
        return sorted(found, key=lambda s: (s.label, s.path))

    if split:
        classes = classes_of(train_name)
        train, val = samples_of(train_name, classes), samples_of(val_name, classes)
        for parts, url in files:
            if parts[0] not in (train_name, val_name):
                skipped.append((url, SKIP_BESIDE_SPLIT))
        used = {s.label for s in val}
        empty = [f"{val_name}/{c}" for k, c in enumerate(classes) if k not in used]
        return (
            "split", classes, train, val, sorted(skipped), empty, [],
            f"{prefix}{val_name}/ holds no images",
        )  # fmt: skip
    classes = classes_of(None)
    train = samples_of(None, classes)
    return (
        "flat", classes, train, [], sorted(skipped), [], [],
        f"--val-fraction {val_fraction} left none",
    )  # fmt: skip
