"""os.path's few functions that the trainer applies to data paths, for a local path or an
s3:// URL alike (a URL is absolute already, and two URLs are the same file when equal)."""

from __future__ import annotations

import os

from . import s3


def is_file(path: str) -> bool:
    return s3.is_file(path) if s3.is_url(path) else os.path.isfile(path)


def abspath(path: str) -> str:
    return s3.join(path) if s3.is_url(path) else os.path.abspath(path)


def dirname(path: str) -> str:
    return s3.dirname(path) if s3.is_url(path) else os.path.dirname(os.path.abspath(path))


def join(folder: str, *parts: str) -> str:
    return s3.join(folder, *parts) if s3.is_url(folder) else os.path.join(folder, *parts)


def samefile(a: str, b: str) -> bool:
    if s3.is_url(a) or s3.is_url(b):
        return abspath(a) == abspath(b)
    return os.path.samefile(a, b)
