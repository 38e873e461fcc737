"""Is this file an image both loaders can decode? One answer for ``make_lists --verify``, the
trainer's file check and the search for the culprit after a DALI decode error.

The checks, cheapest first:

- the header: the magic numbers of the formats DALI's decoders read (JPEG, PNG, BMP, TIFF,
  JPEG 2000, PNM, WebP), so that a file PIL decodes but DALI cannot (a GIF named ``.png``)
  is caught before a DALI run stops on it;
- PNG's chunk checksums and ``IEND``: libpng (DALI) rejects a PNG whose data fails its CRC
  or that ends early, while PIL decodes such a file without a word;
- TIFFs of 32-bit integer samples, which PIL decodes and DALI's libtiff decoder rejects;
- JPEGs whose EXIF blocks disagree on the orientation, which DALI decodes garbled or crashes
  on;
- a full decode to RGB by ``open_rgb``, the very function the PIL loaders use (EXIF
  orientation, 16-bit and float scaling included), with truncated files failing instead of
  decoding grey.

``open_rgb`` lives here, not in ``common``, because of the last point and the next: no torch
here, since ``make_lists --verify`` runs this in spawned processes, which should not pay for
importing it.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXIF_HEADER = b"Exif\x00\x00"
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


def _binary(source):
    """``source`` opened for reading bytes: a path, or an image's bytes themselves (a sample
    of a tar shard). Every check here takes either."""
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(source)
    return open(source, "rb")  # noqa: SIM115 - the caller's with-block closes it


def header_problem(path) -> str | None:
    """Why DALI cannot read ``path``, judged from its first 16 bytes (None: no problem)."""
    try:
        with _binary(path) as f:
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


def _pil_image():
    """PIL's ``Image`` module with its decompression-bomb guard off. Pillow refuses images
    over 179 megapixels (a 200 MP phone photo, 16320x12240: --verify left it out as a "DOS
    attack", the PIL loaders stopped on it) and warns over 89 (108 MP photos), while DALI
    decodes both: the loaders must read the same files. It is a module setting of Pillow's,
    so it is set wherever a file is opened here."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    return Image


def _pil_format(path: str) -> str | None:
    """The format PIL recognizes in ``path`` (reads the header only), or None."""
    Image = _pil_image()

    try:
        with _binary(path) as f, Image.open(f) as image:
            return image.format
    except Exception:  # not an image PIL knows, or unreadable: either way, no format
        return None


def png_problem(path) -> str | None:
    """A PNG's chunk structure: every chunk whole, its CRC right, ``IEND`` at the end."""
    with _binary(path) as f:
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


def open_rgb(path):
    """Decode one file fully to an RGB PIL image, the way DALI's decoders do.

    Grayscale, palette, CMYK and alpha images convert to RGB (alpha dropped, as DALI does);
    16-bit grayscale (mode I;16, or I for older Pillow) is scaled to 8 bits as DALI does
    (round(v / 257)) instead of Pillow's clamp to 255; 32-bit float grayscale (mode F, float
    TIFFs) is taken as 0..1, clipped, times 255, as DALI does, instead of Pillow's cast of the
    raw value (which makes a 0..1 image black); the EXIF orientation is applied where DALI's
    ``adjust_orientation`` default applies it (``exif_orientation``). A TIFF of 32-bit integer
    samples is refused (ValueError), as DALI refuses it: no backend reads it, rather than one
    reading it clipped.
    """
    import numpy as np

    Image = _pil_image()
    if isinstance(path, bytes | bytearray | memoryview):  # a sample of a tar shard
        path = io.BytesIO(path)
    with Image.open(path) as im:
        problem = tiff_problem(im)
        if problem is not None:
            raise ValueError(problem)
        im.load()  # a PNG's eXIf chunk may follow the image data
        t = Image.Transpose  # the table of Pillow's ImageOps.exif_transpose
        transpose = {
            2: t.FLIP_LEFT_RIGHT,
            3: t.ROTATE_180,
            4: t.FLIP_TOP_BOTTOM,
            5: t.TRANSPOSE,
            6: t.ROTATE_270,
            7: t.TRANSVERSE,
            8: t.ROTATE_90,
        }.get(exif_orientation(im))
        if transpose is not None:
            im = im.transpose(transpose)
        if im.mode.startswith("I;16") or im.mode == "I":
            scaled = np.round(np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255)
            im = Image.fromarray(scaled.astype(np.uint8))  # 2-D uint8: mode L
        elif im.mode == "F":
            values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
            scaled = np.round(values.clip(0.0, 1.0) * 255.0)
            im = Image.fromarray(scaled.astype(np.uint8))
        return im.convert("RGB")


def exif_orientation(image) -> int:
    """The EXIF Orientation tag (1 when none) where DALI's decoder reads it: the EXIF block
    (JPEG APP1, PNG eXIf, WebP EXIF chunk) or a TIFF's own tag.

    Not ``image.getexif()``: Pillow also takes the orientation from XMP (``tiff:Orientation``)
    and from ImageMagick's PNG text chunk ("Raw profile type exif"), which DALI ignores; with
    ``ImageOps.exif_transpose`` such a file came out rotated in the PIL loaders and not in
    DALI's (up to 243 grey levels apart). A JPEG may hold several EXIF blocks: the one tag
    among them counts, wherever it is (Pillow reads the first block only); blocks that
    disagree are ``exif_problem``'s.
    """
    found = exif_orientations(image)
    if found is None and hasattr(image, "tag_v2"):  # TIFF: the tag is in its own directory
        found = [image.tag_v2.get(0x0112, 1)]
    orientation = found[-1] if found else 1
    return orientation if isinstance(orientation, int) else 1


def exif_orientations(image) -> list | None:
    """The Orientation tags of the image's EXIF blocks, in file order (blocks without one or
    unreadable ones left out); None when it has no EXIF block."""
    from PIL import Image

    blocks = [s for m, s in getattr(image, "applist", []) if m == "APP1" and s[:6] == EXIF_HEADER]
    if not blocks and image.info.get("exif"):
        blocks = [image.info["exif"]]
    if not blocks:
        return None
    found = []
    for raw in blocks:
        exif = Image.Exif()
        try:
            exif.load(raw)
        except Exception:  # an unreadable block: DALI decodes the image, skipping it
            continue
        if 0x0112 in exif:
            found.append(exif[0x0112])
    return found


def exif_problem(image) -> str | None:
    """A JPEG whose EXIF blocks give different orientations: DALI 2.4 decodes one such file
    garbled (the shape of one orientation, the pixels of another) and crashes on another
    (segmentation fault, the whole run gone, no file named), by the order of the tags."""
    found = exif_orientations(image) or []
    if len(set(found)) > 1:
        listed = ", ".join(str(o) for o in found)
        return (
            f"has {len(found)} EXIF blocks with different orientations ({listed}), which DALI "
            "decodes garbled or crashes on (rewrite it with one EXIF block)"
        )
    return None


def tiff_problem(image) -> str | None:
    """A TIFF DALI cannot decode although PIL can: integer samples of more than 16 bits."""
    if image.format != "TIFF":
        return None
    tags = getattr(image, "tag_v2", {})
    bits = tags.get(258, (1,))  # BitsPerSample
    bits = max(bits) if isinstance(bits, tuple) else bits
    sample_format = tags.get(339, (1,))  # SampleFormat: 1 unsigned, 2 signed, 3 float
    sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
    if bits > 16 and sample_format != 3:
        return (
            f"is a TIFF of {bits}-bit integer samples, which DALI does not decode "
            "(save it with 8 or 16 bits per sample)"
        )
    return None


def decode_problem(path) -> str | None:
    """Decode ``path`` fully as the PIL loaders do; None when it decodes, else why not."""
    from PIL import ImageFile

    Image = _pil_image()
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode grey
    try:
        with _binary(path) as f, Image.open(f) as image:
            # open_rgb refuses the first too; said plainly here
            problem = tiff_problem(image) or exif_problem(image)
        if problem is not None:
            return problem
        open_rgb(path)
    except Image.UnidentifiedImageError:
        return "is not an image PIL can identify"
    except Exception as error:  # any failure to decode makes the file unusable
        return f"cannot be decoded ({type(error).__name__}: {error})"
    return None


def image_problem(path, *, decode: bool = True) -> str | None:
    """Why the loaders cannot use ``path`` (None: they can). ``decode=False`` reads the header
    alone (16 bytes), for checks that must stay cheap on a million files. ``path`` may be the
    image's bytes instead (a sample of a tar shard)."""
    problem = header_problem(path)
    if problem is None and decode:
        try:
            problem = png_problem(path) or decode_problem(path)
        except OSError as e:
            problem = f"cannot be read ({e.strerror})"
    return problem


def first_problem(paths, *, decode: bool = True) -> tuple[str, str] | None:
    """The first of ``paths`` that ``image_problem`` rejects, and why; None if none is.
    An item may be a pair (name, the image's bytes): a sample of a tar shard."""
    for path in paths:
        name, source = path if isinstance(path, tuple) else (os.fspath(path), os.fspath(path))
        problem = image_problem(source, decode=decode)
        if problem is not None:
            return name, problem
    return None
