"""The list-file format, defined once for writing and reading.

A list file has one ``path label`` per line. ``#`` starts a comment line; blank lines are
allowed. The label is the last whitespace-separated field, so paths may contain spaces.
Relative paths resolve against the list file's own folder, so a list and its images can move
together. A ``classes.txt`` beside the list maps label k (line k) to a class name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

CLASSES_FILE = "classes.txt"
TRAIN_LIST = "Train.txt"
VAL_LIST = "Test.txt"


class ListError(ValueError):
    """A list or classes file that cannot be used; the message names ``file:line``."""


class ImageError(RuntimeError):
    """An image that a loader cannot read or decode mid-run; the message names the file."""


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
    with open(path, "rb") as f:
        data = f.read()
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


def read_list(list_file: str | os.PathLike, *, num_classes: int | None = None) -> list[Sample]:
    """Parse a list file into samples with absolute paths.

    Raises ListError naming ``file:line`` for a malformed line, a negative label or a label
    ``>= num_classes`` (when given); a missing or empty list is an error too.
    """
    list_file = os.fspath(list_file)
    if not os.path.isfile(list_file):
        raise ListError(f"{list_file}: list file not found")
    base = os.path.dirname(os.path.abspath(list_file))
    samples: list[Sample] = []
    for lineno, raw in _numbered_lines(list_file):
        where = f"{list_file}:{lineno}"
        parsed = _parse_line(raw, where)
        if parsed is None:
            continue
        path, label = parsed
        if label < 0:
            raise ListError(f"{where}: negative label {label}")
        if num_classes is not None and label >= num_classes:
            raise ListError(
                f"{where}: label {label} is outside [0, {num_classes}) "
                f"(the class count comes from {CLASSES_FILE} or --num-classes)"
            )
        full = path if os.path.isabs(path) else os.path.join(base, path)
        samples.append(Sample(os.path.normpath(full), label))
    if not samples:
        raise ListError(f"{list_file}: the list holds no samples")
    return samples


def read_classes(classes_file: str | os.PathLike) -> list[str]:
    """One class name per line, line k = label k. Blank lines and duplicates are errors."""
    classes_file = os.fspath(classes_file)
    if not os.path.isfile(classes_file):
        raise ListError(f"{classes_file}: classes file not found")
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, raw in _numbered_lines(classes_file):
        name = raw.rstrip("\r\n")
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
    """The ``classes.txt`` in the list file's folder, or None when there is none."""
    candidate = os.path.join(os.path.dirname(os.path.abspath(list_file)), CLASSES_FILE)
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
    base = os.path.dirname(os.path.abspath(list_file))
    os.makedirs(base, exist_ok=True)
    tmp = f"{list_file}.tmp{os.getpid()}"
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for sample in samples:
                path, label = (sample.path, sample.label) if isinstance(sample, Sample) else sample
                path = os.path.abspath(path)
                if not absolute:
                    path = os.path.relpath(path, base)
                f.write(format_line(path.replace(os.sep, "/"), int(label)))
                count += 1
        os.replace(tmp, list_file)
    except BaseException:
        if os.path.exists(tmp):  # a path that cannot be written must not leave debris
            os.remove(tmp)
        raise
    return count


def write_classes(classes_file: str | os.PathLike, names: Sequence[str]) -> None:
    classes_file = os.fspath(classes_file)
    os.makedirs(os.path.dirname(os.path.abspath(classes_file)), exist_ok=True)
    tmp = f"{classes_file}.tmp{os.getpid()}"
    for name in names:
        if not name.strip() or "\n" in name or "\r" in name:
            raise ListError(f"{classes_file}: cannot write class name {name!r}")
    with open(tmp, "w", encoding="utf-8") as f:
        for name in names:
            f.write(f"{name}\n")
    os.replace(tmp, classes_file)
