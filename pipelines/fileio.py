"""The one way this project writes a file: whole or not at all.

Every file it writes (checkpoints, lists, classes, config, metrics, benchmark JSON) goes
through ``atomic_write``: a temporary file in the same folder, flushed and fsynced, renamed
over the target, then the folder fsynced so the rename itself survives a power cut. A reader,
or a run killed at any moment, sees the old complete file or the new one, never half of one,
and a failed write leaves no temporary file behind.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import IO


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a binary temp file beside ``path``, then put it in place."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        # Name the file the caller asked for: not the temp file, and not nothing (a write
        # failing for a full disk carries no file name).
        if exc.filename in (None, tmp):
            exc.filename, exc.filename2 = path, None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_folder(folder)


def _temp_beside(path: str) -> str:
    # Same folder, so the rename stays on one filesystem and is atomic. The host too: the
    # processes of two nodes writing one file on shared storage (a download into a shared
    # torch cache) may have the same pid.
    host = socket.gethostname().replace(os.sep, "_")
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp{os.getpid()}.{host}")


def atomic_link(source: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Put ``path`` in place as a second name (hard link) of ``source``, a file in the same
    folder: its bytes are not written again. Replaced by rename, as ``atomic_write`` does, so
    ``path``'s old file stays whole for a reader, and a later write of either name (always a
    new file renamed in place) leaves the other as it was. False, with nothing changed, where
    the filesystem has no hard links (the caller then writes the file)."""
    path = os.fspath(path)
    tmp = _temp_beside(path)
    try:
        os.link(source, tmp)
    except OSError:
        return False
    try:
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    fsync_folder(os.path.dirname(os.path.abspath(path)))
    return True


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


OVERWRITE_HELP = "replace existing output files (default: refuse)"


class OutputFileError(ValueError):
    """An output path that must not or cannot be written; the message is one line."""


def check_output_file(path: str | os.PathLike, *, overwrite: bool, flag: str) -> str:
    """Refuse, before any work is done, an output ``path`` that would fail or destroy a result.

    An existing file is refused unless ``overwrite`` (no result is replaced by accident); a
    folder is always refused; the parent folder must exist or be creatable, and be writable,
    so that minutes of work do not end in a failed write. ``flag`` names the option in the
    message (e.g. ``--json``). Returns the path as given.
    """
    path = os.fspath(path)
    where = f"{flag} {path}" if flag else path
    if os.path.isdir(path):
        raise OutputFileError(f"{where} is a folder: name a file")
    if os.path.lexists(path) and not overwrite:
        raise OutputFileError(f"{where} exists: choose another name or pass --overwrite")
    problem = _unwritable_folder(os.path.dirname(os.path.abspath(path)))
    if problem:
        raise OutputFileError(f"{where}: {problem}")
    return path


def _unwritable_folder(folder: str) -> str | None:
    """Why files cannot be written in ``folder`` (created if missing), or None."""
    existing = folder
    while not os.path.exists(existing):  # the folder to be created lies under this one
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"folder {existing} is not writable"
    return None
