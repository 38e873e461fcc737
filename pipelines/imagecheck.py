"""Is this file an image both loaders can decode? One answer for ``make_lists --verify``, the
trainer's file check and the search for the culprit after a DALI decode error.

Three checks, cheapest first:

- the header: the magic numbers of the formats DALI's decoders read (JPEG, PNG, BMP, TIFF,
  JPEG 2000, PNM, WebP), so that a file PIL decodes but DALI cannot (a GIF named ``.png``)
  is caught before a DALI run stops on it;
- PNG's chunk checksums and ``IEND``: libpng (DALI) rejects a PNG whose data fails its CRC
  or that ends early, while PIL decodes such a file without a word;
- a full PIL decode to RGB, with truncated files failing instead of decoding grey.

No torch here: ``make_lists --verify`` runs this in spawned processes, which should not pay
for importing it.
"""

from __future__ import annotations

import os
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DALI_FORMATS = "JPEG, PNG, BMP, TIFF, JPEG 2000, PNM, WebP"


def dali_readable_header(head: bytes) -> bool:
    """Whether the first 16 bytes of a file are those of a format DALI decodes."""
    return (
        head.startswith(b"\xff\xd8\xff")
        or head.startswith(PNG_SIGNATURE)
        or head.startswith(b"BM")
        or head[:4] in (b"II*\x00", b"MM\x00*")
        or head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n")
        or head.startswith(b"\xff\x4f\xff\x51")
        or (len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"123456")
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    )


def header_problem(path: str) -> str | None:
    """Why DALI cannot read ``path``, judged from its first 16 bytes (None: no problem)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not head:
        return "is empty"
    if not dali_readable_header(head):
        kind = _pil_format(path)
        if kind is None:
            return "is not an image (its first bytes match no image format)"
        return f"is a {kind} image, a format DALI does not decode ({DALI_FORMATS})"
    return None


def _pil_format(path: str) -> str | None:
    """The format PIL recognizes in ``path`` (reads the header only), or None."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format
    except Exception:  # not an image PIL knows, or unreadable: either way, no format
        return None


def png_problem(path: str) -> str | None:
    """A PNG's chunk structure: every chunk whole, its CRC right, ``IEND`` at the end."""
    with open(path, "rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            return None  # not a PNG: nothing to check here
        while True:
            header = f.read(8)
            if len(header) < 8:
                return "is a truncated PNG (no IEND chunk)"
            length, kind = struct.unpack(">I4s", header)
            data = f.read(length)
            crc = f.read(4)
            if len(data) < length or len(crc) < 4:
                return f"is a truncated PNG (its {kind.decode('latin-1')!r} chunk ends early)"
            if zlib.crc32(data, zlib.crc32(kind)) != struct.unpack(">I", crc)[0]:
                return f"is a corrupt PNG (CRC error in its {kind.decode('latin-1')!r} chunk)"
            if kind == b"IEND":
                return None


def decode_problem(path: str) -> str | None:
    """Decode ``path`` fully with PIL; None when it decodes, else why it does not."""
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode grey
    try:
        with Image.open(path) as image:
            image.load()
            image.convert("RGB")
    except Image.UnidentifiedImageError:
        return "is not an image PIL can identify"
    except Exception as error:  # any failure to decode makes the file unusable
        return f"cannot be decoded ({type(error).__name__}: {error})"
    return None


def image_problem(path: str, *, decode: bool = True) -> str | None:
    """Why the loaders cannot use ``path`` (None: they can). ``decode=False`` reads the header
    alone (16 bytes), for checks that must stay cheap on a million files."""
    problem = header_problem(path)
    if problem is None and decode:
        try:
            problem = png_problem(path) or decode_problem(path)
        except OSError as e:
            problem = f"cannot be read ({e.strerror})"
    return problem


def first_problem(paths, *, decode: bool = True) -> tuple[str, str] | None:
    """The first of ``paths`` that ``image_problem`` rejects, and why; None if none is."""
    for path in paths:
        problem = image_problem(os.fspath(path), decode=decode)
        if problem is not None:
            return os.fspath(path), problem
    return None
