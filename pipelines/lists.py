"""The list-file format, defined once for writing and reading.

A list file has one ``path label`` per line. ``#`` starts a comment line; blank lines are
allowed. The label is the last whitespace-separated field, so paths may contain spaces.
Relative paths resolve against the list file's own folder, so a list and its images can move
together. A ``classes.txt`` beside the list maps label k (its k-th line, ``#`` comment lines
aside) to a class name.
"""

from __future__ import annotations

import contextlib
import gc
import io
import itertools
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from . import s3
from .fileio import atomic_write
from .paths import dirname, is_file

CLASSES_FILE = "classes.txt"
TRAIN_LIST = "Train.txt"
VAL_LIST = "Test.txt"


class ListError(ValueError):
    """A list or classes file that cannot be used; the message names ``file:line``."""


class EmptyListError(ListError):
    """A list file with no samples (only comments or blank lines), e.g. the Test.txt that
    ``make_lists --val-fraction 0`` writes: a trainer may take it as "no validation"."""


def missing_file(path: str, kind: str, missing: str) -> str:
    """What to say after ``path:`` when a ``kind`` file ("list", "classes") is not a file:
    ``missing`` when nothing is there; for a folder (often the image tree itself, passed where
    its lists belong) that it is one, and what makes the lists from it."""
    if not s3.is_url(path) and os.path.isdir(path):
        shards = (
            "; a shard set of tools/make_shards.py, also taken, holds manifest.json"
            if kind == "list"
            else ""
        )
        return (
            f"a folder, not a {kind} file (tools/make_lists.py FOLDER --out-dir DIR writes "
            f"DIR/Train.txt, DIR/Test.txt and DIR/classes.txt for a folder of class "
            f"folders{shards})"
        )
    return missing


class ImageError(RuntimeError):
    """An image that a loader cannot read or decode mid-run; the message names the file."""


class FetchError(ImageError):
    """An image a loader could not fetch mid-run from its bucket (an endpoint gone, an object
    deleted or forbidden): the storage's fault, not the image's. The message names the URL."""


@dataclass(frozen=True)
class Sample:
    path: str  # absolute, normalized
    label: int


def _parse_line(raw: str, where: str) -> tuple[str, int] | None:
    line = raw.strip()
    if not line or line.startswith("#"):
        return None
    fields = line.rsplit(None, 1)
    if len(fields) != 2:
        raise ListError(f"{where}: expected 'path label', got {line!r}")
    path, label_text = fields
    try:
        label = int(label_text)
    except ValueError:
        raise ListError(
            f"{where}: label {label_text!r} is not an integer (line {line!r})"
        ) from None
    return path, label


def _numbered_lines(path: str) -> list[tuple[int, str]]:
    """(line number, line) pairs; a decode error names ``file:line`` like any other."""
    data = _read_bytes(path)
    try:
        # utf-8-sig: a file saved by an editor that writes a byte-order mark reads cleanly.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ListError(f"{path}:{line}: not UTF-8 text ({error.reason})") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":  # the newline that ends the last line starts no new one
        lines.pop()
    return list(enumerate(lines, start=1))


def _read_bytes(path: str) -> bytes:
    if s3.is_url(path):
        return s3.read_bytes(path)
    with open(path, "rb") as f:
        return f.read()


class SampleTable:
    """The samples of a list, compact: what a loader holds for a million-line list.

    One uint8 buffer of UTF-8 paths, each followed by a NUL byte (a byte no POSIX path holds);
    ``offsets`` (int64, n + 1) where each path starts, so path i is
    ``blob[offsets[i] : offsets[i + 1] - 1]``; ``labels`` (int64, n). For ImageNet's 1.28M
    training images that is about 100 MB in three arrays instead of 1.28M Python strings and
    sample objects (3-4 times as much), and numpy buffers stay shared with forked workers,
    where the reference counts of Python objects would copy every page they touch.
    """

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, labels: np.ndarray):
        if len(offsets) != len(labels) + 1:
            raise ValueError(f"{len(offsets)} offsets for {len(labels)} labels: need n + 1")
        self.blob = blob
        self.offsets = offsets
        self.labels = labels

    @classmethod
    def from_pairs(cls, paths: Sequence[str], labels: Sequence[int]) -> SampleTable:
        encoded, lengths = _encode_paths(paths)
        return cls._from_parts([encoded], [lengths], [np.asarray(labels, dtype=np.int64)])

    @classmethod
    def _from_parts(cls, encoded: list[bytes], lengths: list, labels: list) -> SampleTable:
        """From chunks of ``_encode_paths`` output and their labels, in order."""
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lengths_all) + 1, dtype=np.int64)
        np.cumsum(lengths_all + 1, out=offsets[1:])  # + 1: each path's NUL
        labels_all = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        return cls(blob, offsets, labels_all.astype(np.int64, copy=False).reshape(-1))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return self.blob.nbytes + self.offsets.nbytes + self.labels.nbytes

    def path_bytes(self, index: int) -> np.ndarray:
        """Path ``index`` as a uint8 view into the buffer (no copy, no NUL)."""
        return self.blob[self.offsets[index] : self.offsets[index + 1] - 1]

    def path(self, index: int) -> str:
        return self.path_bytes(index).tobytes().decode("utf-8", "surrogateescape")

    def source(self, index: int) -> str:
        """What the loaders decode for sample ``index``: its path, or for an s3:// URL the
        object's bytes (a shard set's table gives the image's bytes too, see
        ``pipelines.shards.ShardTable``)."""
        path = self.path(index)
        return s3.read_bytes(path) if s3.is_url(path) else path

    def paths(self, start: int = 0, stop: int | None = None) -> list[str]:
        """Paths ``start:stop`` as strings, decoded in one go."""
        stop = len(self) if stop is None else min(stop, len(self))
        if start >= stop:
            return []
        chunk = self.blob[self.offsets[start] : self.offsets[stop] - 1].tobytes()
        return chunk.decode("utf-8", "surrogateescape").split("\0")

    def samples(self) -> list[Sample]:
        return [Sample(p, int(k)) for p, k in zip(self.paths(), self.labels.tolist(), strict=True)]


def _join_path(base_dir: str, path: str) -> str:
    """``path`` of a list in ``base_dir``, absolute and normalized; an s3:// URL stays one,
    and a relative path in a list in a bucket is a URL under the list's prefix."""
    if s3.is_url(path):
        return s3.join(path)
    if s3.is_url(base_dir):
        return s3.join(base_dir, path)
    full = path if os.path.isabs(path) else os.path.join(base_dir, path)
    return os.path.normpath(full)


def _check_line(where: str, label: int, num_classes: int | None) -> None:
    if label < 0:
        raise ListError(f"{where}: negative label {label}")
    if num_classes is not None and label >= num_classes:
        raise ListError(
            f"{where}: label {label} is outside [0, {num_classes}) "
            f"(the class count comes from {CLASSES_FILE} or --num-classes)"
        )


def _read_lines_checked(list_file: str, num_classes: int | None) -> list[tuple[str, int]]:
    """Line by line with line numbers: the reference parser, and the one that names errors."""
    base = dirname(list_file)
    pairs: list[tuple[str, int]] = []
    for lineno, raw in _numbered_lines(list_file):
        where = f"{list_file}:{lineno}"
        parsed = _parse_line(raw, where)
        if parsed is None:
            continue
        path, label = parsed
        _check_line(where, label, num_classes)
        pairs.append((_join_path(base, path), label))
    return pairs


def _encode_paths(paths: Sequence[str]) -> tuple[bytes, np.ndarray]:
    """NUL-terminated UTF-8 paths in one buffer, and each path's length in bytes."""
    if not paths:
        return b"", np.zeros(0, dtype=np.int64)
    # One join and one encode: C loops, not a Python loop over the paths.
    encoded = ("\0".join(paths) + "\0").encode("utf-8", "surrogateescape")
    if encoded.isascii():  # the common case: one byte per character
        return encoded, np.fromiter(map(len, paths), dtype=np.int64, count=len(paths))
    ends = np.flatnonzero(np.frombuffer(encoded, dtype=np.uint8) == 0)
    return encoded, np.diff(ends, prepend=-1) - 1


# Characters of list text parsed per pass of the fast parser: large enough that the per-pass
# overhead vanishes, small enough that the per-line Python objects of a pass (about 5 times
# its text) never add up to more than a few MB, whatever the length of the list.
_PARSE_CHUNK_CHARS = 1 << 20


def read_table(list_file: str | os.PathLike, *, num_classes: int | None = None) -> SampleTable:
    """Parse a list file into a compact ``SampleTable`` with absolute, normalized paths.

    The same rules and errors as ``read_list`` (which is built on it), faster (0.8 s for
    ImageNet's 1.28M lines on one core here, garbage collection paused) and with a bounded
    transient footprint: the list is parsed a chunk at a time, each chunk in a few whole-chunk
    C passes. A list with any line the fast pass cannot take as valid goes through the
    line-by-line parser instead, which raises naming ``file:line``.
    """
    list_file = os.fspath(list_file)
    if not is_file(list_file):
        raise ListError(f"{list_file}: {missing_file(list_file, 'list', 'list file not found')}")
    data = _read_bytes(list_file)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None  # the line-by-line parser names the line
    del data
    with _gc_paused():
        table = None if text is None else _fast_table(text, list_file, num_classes)
        if table is None:
            checked = _read_lines_checked(list_file, num_classes)
            table = SampleTable.from_pairs([p for p, _ in checked], [k for _, k in checked])
    if len(table) == 0:
        raise EmptyListError(f"{list_file}: the list holds no samples")
    return table


@contextlib.contextmanager
def _gc_paused():
    """No garbage collection while a list is parsed. The parse makes a million short-lived
    lists, none in a cycle, and each collection they trigger walks every object the process
    holds: with the trainer's imports (torch, torchvision) loaded, ImageNet's 1.28M-line list
    took 3.3 s to parse with collection on and 0.8 s with it paused (2.1 s with torch alone)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _fast_table(text: str, list_file: str, num_classes: int | None) -> SampleTable | None:
    """The table of a valid list, or None when some line needs the careful parser."""
    if os.sep != "/":  # the joins below are POSIX's; elsewhere the careful parser does it
        return None
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    base = os.path.join(dirname(list_file), "")  # ends in "/"
    encoded, lengths, labels = [], [], []
    start = 0
    while start < len(text):
        end = text.find("\n", start + _PARSE_CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        fields = [
            line.rsplit(None, 1)
            for raw in text[start:end].split("\n")
            if (line := raw.strip()) and not line.startswith("#")
        ]
        start = end
        if not fields:
            continue
        if any(len(f) != 2 for f in fields):
            return None
        try:
            chunk_labels = np.array([int(f[1]) for f in fields], dtype=np.int64)
        except (ValueError, OverflowError):
            return None
        if int(chunk_labels.min()) < 0:
            return None
        if num_classes is not None and int(chunk_labels.max()) >= num_classes:
            return None
        paths = [f[0] if f[0].startswith(("/", s3.SCHEME)) else base + f[0] for f in fields]
        # normpath only where it can change something ("." and ".." parts, doubled or
        # trailing slashes): it is the slowest step, and most lists need it on no line. An
        # s3:// URL's "//" is its own; s3.join normalizes the rest of it.
        paths = [
            (s3.join(p) if p.startswith(s3.SCHEME) else os.path.normpath(p))
            if ("/." in p or "//" in p.removeprefix(s3.SCHEME) or p.endswith("/"))
            else p
            for p in paths
        ]
        chunk_encoded, chunk_lengths = _encode_paths(paths)
        encoded.append(chunk_encoded)
        lengths.append(chunk_lengths)
        labels.append(chunk_labels)
    return SampleTable._from_parts(encoded, lengths, labels)


def read_list(list_file: str | os.PathLike, *, num_classes: int | None = None) -> list[Sample]:
    """Parse a list file into samples with absolute paths.

    Raises ListError naming ``file:line`` for a malformed line, a negative label or a label
    ``>= num_classes`` (when given); a missing or empty list is an error too. Loaders use
    ``read_table``, the compact form of the same result.
    """
    return read_table(list_file, num_classes=num_classes).samples()


def sample_line(list_file: str | os.PathLike, index: int) -> int | None:
    """The line number of sample ``index`` (0-based, in list order) of ``list_file``: what an
    error about one sample names. None when the file no longer has it."""
    list_file = os.fspath(list_file)
    try:
        samples = (
            lineno
            for lineno, raw in _numbered_lines(list_file)
            if _parse_line(raw, f"{list_file}:{lineno}") is not None
        )
        return next(itertools.islice(samples, index, None), None)
    except (OSError, ListError):  # changed since it was read: no line to name
        return None


def read_classes(classes_file: str | os.PathLike) -> list[str]:
    """One class name per line: label k = the k-th name. Lines starting with ``#`` are
    comments (a name that starts with ``#`` is written ``\\#...``), and blank lines at the end
    are ignored; a blank line between names (which would shift every later label) and a
    repeated name are errors naming ``file:line``."""
    classes_file = os.fspath(classes_file)
    if not is_file(classes_file):
        why = missing_file(classes_file, "classes", "classes file not found")
        raise ListError(f"{classes_file}: {why}")
    numbered = _numbered_lines(classes_file)
    while numbered and not numbered[-1][1].strip():
        numbered.pop()
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in numbered:
        if line.startswith("#"):
            continue
        name = line[1:] if _ESCAPED.match(line) else line  # see write_classes
        if not name.strip():
            raise ListError(f"{classes_file}:{lineno}: empty class name")
        if name in seen:
            raise ListError(f"{classes_file}:{lineno}: class {name!r} repeats line {seen[name]}")
        seen[name] = lineno
        names.append(name)
    if not names:
        raise ListError(f"{classes_file}: no class names")
    return names


def classes_beside(list_file: str | os.PathLike) -> str | None:
    """The ``classes.txt`` in the list file's folder (in the folder itself for a shard set's
    folder), or None when there is none."""
    list_file = os.fspath(list_file)
    if s3.is_url(list_file):
        # A list file is an object; a shard set's prefix is none.
        folder = s3.dirname(list_file) if s3.is_file(list_file) else list_file
        candidate = s3.join(folder, CLASSES_FILE)
        return candidate if s3.is_file(candidate) else None
    folder = list_file if os.path.isdir(list_file) else os.path.dirname(os.path.abspath(list_file))
    candidate = os.path.join(os.path.abspath(folder), CLASSES_FILE)
    return candidate if os.path.isfile(candidate) else None


def format_line(path: str, label: int) -> str:
    # A path that would read as a comment, or lose its leading blanks to the reader's strip,
    # keeps its meaning with an explicit "./".
    if path.startswith("#") or path[:1].isspace():
        path = "./" + path
    if "\n" in path or "\r" in path:
        raise ListError(f"cannot write a path with a line break: {path!r}")
    if path[-1:].isspace():  # the reader splits the label off at the last run of blanks
        raise ListError(f"cannot write a path that ends in a blank: {path!r}")
    return f"{path} {label}\n"


def write_list(
    list_file: str | os.PathLike,
    samples: Iterable[Sample | tuple[str, int]],
    *,
    absolute: bool = False,
) -> int:
    """Write ``path label`` lines; paths relative to the list's folder unless ``absolute``.

    Written to a temporary file and renamed, so a reader never sees half a list.
    Returns the number of lines written.
    """
    list_file = os.fspath(list_file)
    base = os.path.dirname(os.path.abspath(list_file)) if not s3.is_url(list_file) else ""
    count = 0
    # One abspath/relpath per folder, not per file: at ~10 us a call they were half of
    # make_lists' time on ImageNet (1.28M files in 1000 folders). folder -> "its/path/" as
    # written, so a file's path is that prefix + its name.
    prefixes: dict[str, str] = {}
    base_names = set(base.split(os.sep))

    def list_path(path: str) -> str:
        if s3.is_url(path):  # a URL is written as it is
            return path
        folder, name = os.path.split(path)
        # Not a file's name, or maybe the list's folder or one above it (relpath gives "."
        # or ".."): the slow way.
        if name in ("", os.curdir, os.pardir) or name in base_names:
            path = os.path.abspath(path)
            return path if absolute else os.path.relpath(path, base)
        prefix = prefixes.get(folder)
        if prefix is None:
            full = os.path.abspath(folder or os.curdir)
            written = full if absolute else os.path.relpath(full, base)
            prefix = "" if written == os.curdir else os.path.join(written, "")
            prefixes[folder] = prefix
        return prefix + name

    def write(f) -> None:
        nonlocal count
        for sample in samples:
            path, label = (sample.path, sample.label) if isinstance(sample, Sample) else sample
            path = list_path(os.fspath(path))
            f.write(format_line(path.replace(os.sep, "/"), int(label)).encode("utf-8"))
            count += 1

    # A path that cannot be written raises mid-way: atomic_write leaves no half list behind.
    write_file(list_file, write)
    return count


def write_file(path: str, write) -> None:
    """``atomic_write``, or for an s3:// URL one put of the whole object (whole or nothing)."""
    if not s3.is_url(path):
        atomic_write(path, write)
        return
    buffer = io.BytesIO()
    write(buffer)
    s3.write_bytes(path, buffer.getvalue())


_NEEDS_ESCAPE = re.compile(r"\\*#")  # backslashes (or none), then "#": one more backslash
_ESCAPED = re.compile(r"\\+#")  # such a line, read back: one backslash fewer


def class_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a line of ``classes.txt`` (None: it can)."""
    if not name.strip():
        return "is blank"
    if "\n" in name or "\r" in name:
        return "holds a line break"
    return None


def write_classes(classes_file: str | os.PathLike, names: Sequence[str]) -> None:
    classes_file = os.fspath(classes_file)
    for name in names:
        problem = class_name_problem(name)
        if problem is not None:
            raise ListError(f"{classes_file}: cannot write class name {name!r}: it {problem}")
    # A line starting with "#" is a comment, so a name starting with "#" (or with
    # backslashes and then "#") is written with one more backslash, which reading drops.
    lines = ("\\" + name if _NEEDS_ESCAPE.match(name) else name for name in names)
    text = "".join(f"{line}\n" for line in lines)
    write_file(classes_file, lambda f: f.write(text.encode("utf-8")))
