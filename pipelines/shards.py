"""WebDataset tar shards: the format, defined once, for writing and for reading.

A shard set is one folder::

    shard-000000.tar   samples in POSIX tar: {key}.{ext} (the image file's own bytes, never
    shard-000000.idx   re-encoded) and {key}.cls (the label, ASCII digits); DALI's index
    ...                (wds2idx's v1.2 format) beside each shard
    classes.txt        label k = line k, as beside a list file
    manifest.json      shard names, sample and byte counts, every sample's label (a line per
                       shard), classes; written last

Keys are the sample's position in the set (``000000123``), and samples are spread over the
shards in a seeded random order, so every shard mixes the classes. The tars are plain USTAR
with fixed owners and times (the same input gives the same bytes), readable by DALI's
``fn.readers.webdataset``, the ``webdataset`` package and ``tar``. Each shard and its index
are written whole or not at all (``atomic_write``) and the manifest last: a folder without a
manifest is no shard set, and a cut run leaves no shard that looks whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import s3
from .fileio import atomic_write, atomic_write_text
from .lists import CLASSES_FILE, ListError, read_classes, write_classes
from .paths import abspath as any_abspath

MANIFEST = "manifest.json"
FORMAT = "dali-resnet-trainer/webdataset-shards"
VERSION = 1
INDEX_VERSION = "v1.2"  # DALI's wds2idx
LABEL_EXT = "cls"
BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads an archive to whole records
SIZE_UNITS = {
    "": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}  # fmt: skip


class ShardError(ValueError):
    """A shard set that cannot be read or written as asked; the message is one line."""


def parse_size(text: str) -> int:
    """'64MB' -> 64_000_000; also KB, GB, MiB, GiB, plain bytes (any case)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = found.group(2).lower() if found else None
    if found is None or unit not in SIZE_UNITS:
        raise ValueError(f"a size such as 64MB, 1GB or 512MiB, not {text!r}")
    size = int(float(found.group(1)) * SIZE_UNITS[unit])
    if size < 1:
        raise ValueError(f"a size above 0, not {text!r}")
    return size


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


def sample_key(position: int) -> str:
    return f"{position:09d}"


def image_ext(path: str) -> str:
    """The member suffix of an image: its own, lowercased (jpg, jpeg, png, ...)."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return ext or "jpg"


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def member_bytes(size: int) -> int:
    """Bytes a member of ``size`` bytes takes in a tar: a header block and its data, padded."""
    return BLOCK + _padded(size)


def sample_bytes(image_size: int, label: int) -> int:
    return member_bytes(image_size) + member_bytes(len(str(label)))


def tar_bytes(samples_bytes: int) -> int:
    """A whole archive: its members, two zero blocks, padded to tarfile's records."""
    return -(-(samples_bytes + 2 * BLOCK) // RECORD) * RECORD


def plan_shards(sizes: Sequence[int], labels: Sequence[int], shard_bytes: int) -> list[range]:
    """Consecutive runs of samples (in the order given) of about ``shard_bytes`` per tar:
    a shard takes samples while it stays within the size, and at least one."""
    plan, start, used = [], 0, 0
    for i, (size, label) in enumerate(zip(sizes, labels, strict=True)):
        need = sample_bytes(size, label)
        if i > start and tar_bytes(used + need) > shard_bytes:
            plan.append(range(start, i))
            start, used = i, 0
        used += need
    if len(sizes) > start:
        plan.append(range(start, len(sizes)))
    return plan


@dataclass(frozen=True)
class ShardSample:
    key: str
    path: str  # the image file to copy in
    label: int


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o444
    info.mtime = 0  # the same input, the same bytes
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_shard(tar_path: str, samples: Sequence[ShardSample]) -> tuple[int, int]:
    """Write one shard and its DALI index beside it, each whole or not at all; returns
    (samples, bytes of the tar). An image that cannot be read raises OSError naming it."""
    index_lines: list[str] = []

    def write(f) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                if s3.is_url(sample.path):
                    data = s3.read_bytes(sample.path)
                else:
                    with open(sample.path, "rb") as image:
                        data = image.read()
                components = []
                for ext, payload in (
                    (image_ext(sample.path), data),
                    (LABEL_EXT, str(sample.label).encode("ascii")),
                ):
                    name = f"{sample.key}.{ext}"
                    components.append(f"{ext} {tar.offset + BLOCK} {len(payload)} {name}")
                    tar.addfile(_member(name, len(payload)), io.BytesIO(payload))
                index_lines.append(" ".join(components))

    atomic_write(tar_path, write)
    # The index after its tar: an index names offsets in a tar that is whole.
    text = f"{INDEX_VERSION} {len(index_lines)}\n" + "\n".join(index_lines) + "\n"
    atomic_write_text(
        os.path.join(os.path.dirname(tar_path), index_name(os.path.basename(tar_path))), text
    )
    return len(samples), os.path.getsize(tar_path)


def write_manifest(
    out_dir: str,
    *,
    shards: Sequence[dict],
    class_names: Sequence[str] | None,
    num_classes: int,
    seed: int,
    source: str,
) -> str:
    """classes.txt (when the classes have names) and then manifest.json, the set's last file."""
    if class_names is not None:
        write_classes(os.path.join(out_dir, CLASSES_FILE), class_names)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "num_samples": sum(s["samples"] for s in shards),
        "num_classes": num_classes,
        "classes": CLASSES_FILE if class_names is not None else None,
        "seed": seed,
        "source": source,
    }
    # One line a shard: a reader learns every label from this one file (DALI's index holds
    # where each label lies, not its value, and one read per sample is what shards avoid).
    head = json.dumps(manifest, indent=1)[:-2]
    rows = ",\n".join("  " + json.dumps(shard, separators=(",", ":")) for shard in shards)
    path = os.path.join(out_dir, MANIFEST)
    atomic_write_text(path, f'{head},\n "shards": [\n{rows}\n ]\n}}\n')
    return path


def manifest_path(path: str) -> str | None:
    """The manifest of ``path`` (a shard folder or its manifest.json), None for anything else.
    For an s3:// URL, the manifest's URL (a request or two: the object itself, then
    ``URL/manifest.json``)."""
    if s3.is_url(path):
        if s3.basename(path) == MANIFEST:
            return path if s3.is_file(path) else None
        if s3.key_of(path).rstrip("/") and s3.is_file(path):  # a list file, say
            return None
        found = s3.join(path, MANIFEST)
        return found if s3.is_file(found) else None
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST)
    return path if os.path.basename(path) == MANIFEST and os.path.isfile(path) else None


def read_manifest(path: str) -> dict:
    """A shard set's manifest, checked; ShardError naming the file otherwise."""
    found = manifest_path(path)
    if found is None:
        raise ShardError(f"{path}: no {MANIFEST} (not a shard folder written by make_shards.py)")
    try:
        if s3.is_url(found):
            manifest = json.loads(s3.read_bytes(found))
        else:
            with open(found, encoding="utf-8") as f:
                manifest = json.load(f)
    except s3.S3Error:
        raise
    except (OSError, ValueError) as exc:
        raise ShardError(f"{found}: not a readable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{found}: not a manifest of make_shards.py (format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ShardError(
            f"{found}: manifest version {manifest.get('version')!r}, this reader knows {VERSION}"
        )
    return manifest


# --- writing a set: tools/make_shards.py -------------------------------------------------

DEFAULT_SHARD_SIZE = "256MB"
# Shards a process keeps open at once (reading a set of thousands, each batch from hundreds):
# well below the usual limit of 1,024 open files, and enough that most reads find theirs.
OPEN_SHARDS = 256
SHARD_FILE = re.compile(r"^shard-\d{6}\.(tar|idx)$")


@dataclass
class ShardsReport:
    out_dir: str
    manifest: str
    shards: int
    samples: int
    bytes: int
    kept: int  # shards a cut run had written whole, kept as they were
    excluded: list  # (path, reason) left out by --verify
    classes: int


def _write_task(task: tuple[str, list[ShardSample]]) -> int:
    """Write one planned shard (in a worker process); its bytes."""
    return write_shard(*task)[1]


def make_shards(
    list_file: str,
    *,
    out_dir: str,
    shard_bytes: int,
    seed: int = 0,
    workers: int | None = None,
    verify: bool = False,
    overwrite: bool = False,
    on_excluded=None,
    on_progress=None,
) -> ShardsReport:
    """Write the samples of ``list_file`` as a shard set in ``out_dir`` (see the module doc).

    The order is a permutation of the list by ``seed``; shards are cut from it at about
    ``shard_bytes`` each and written by ``workers`` processes. ``verify`` decodes every image
    first (``scan.verify_images``) and leaves out the ones that fail, reported through
    ``on_excluded(path, reason)``. ``on_progress(shards_done, shards, bytes_done, bytes)``
    after each shard. A set already in ``out_dir`` (its manifest) is refused without
    ``overwrite``; shards that a cut run wrote whole for the same plan are kept.
    """
    from .common import check_files_exist, object_sizes
    from .lists import classes_beside, read_table
    from .scan import verify_images

    list_file = os.fspath(list_file)
    out_dir = os.fspath(out_dir)
    if s3.is_url(out_dir):
        return _make_shards_in_bucket(
            list_file, out_dir=out_dir, shard_bytes=shard_bytes, seed=seed, workers=workers,
            verify=verify, overwrite=overwrite, on_excluded=on_excluded, on_progress=on_progress,
        )  # fmt: skip
    classes_file = classes_beside(list_file)
    class_names = read_classes(classes_file) if classes_file else None
    # An empty list is read_table's EmptyListError, naming the file.
    table = read_table(list_file, num_classes=len(class_names) if class_names else None)
    num_classes = len(class_names) if class_names else int(table.labels.max()) + 1
    old = os.path.join(out_dir, MANIFEST)
    if os.path.exists(old) and not overwrite:
        raise ShardError(
            f"{old}: a shard set is already there; choose another --out-dir, or --overwrite "
            "to replace it"
        )
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ShardError(f"--out-dir {out_dir} is a file, not a folder")
    check_files_exist(table, list_file=list_file)  # missing or empty: named with file:line
    paths = table.paths()
    labels = table.labels
    excluded: list[tuple[str, str]] = []
    if verify:
        excluded = verify_images(paths, workers=workers)
        for path, reason in excluded:
            if on_excluded is not None:
                on_excluded(path, reason)
    bad = {path for path, _ in excluded}
    keep = np.array([i for i, path in enumerate(paths) if path not in bad], dtype=np.int64)
    if len(keep) == 0:
        raise ShardError(f"{list_file}: every image failed --verify; nothing to write")
    order = keep[np.random.default_rng(seed).permutation(len(keep))]
    if s3.is_url(paths[0]):  # from the folders' listings: no request per image
        known = object_sizes([paths[i] for i in order])
        sizes = [known[paths[i]] for i in order]
    else:
        sizes = [os.path.getsize(paths[i]) for i in order]
    ordered_labels = [int(labels[i]) for i in order]
    plan = plan_shards(sizes, ordered_labels, shard_bytes)

    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(old):  # --overwrite: the old set is no set from here on
        os.remove(old)
    planned = {shard_name(n) for n in range(len(plan))}
    planned |= {index_name(name) for name in planned}
    for name in os.listdir(out_dir):  # shards of a cut run's other plan, or of the old set
        if SHARD_FILE.match(name) and name not in planned:
            os.remove(os.path.join(out_dir, name))

    tasks, shards, kept = [], [], 0
    total_bytes = 0
    for number, run in enumerate(plan):
        name = shard_name(number)
        expected = tar_bytes(sum(sample_bytes(sizes[p], ordered_labels[p]) for p in run))
        total_bytes += expected
        shards.append(
            {
                "name": name,
                "index": index_name(name),
                "samples": len(run),
                "bytes": expected,
                "labels": [ordered_labels[p] for p in run],
            }
        )
        tar_path = os.path.join(out_dir, name)
        whole = (
            not overwrite
            and os.path.isfile(os.path.join(out_dir, index_name(name)))
            and os.path.isfile(tar_path)
            and os.path.getsize(tar_path) == expected
        )
        if whole:
            kept += 1
            continue
        samples = [ShardSample(sample_key(p), paths[order[p]], ordered_labels[p]) for p in run]
        tasks.append((tar_path, samples))

    to_write = {os.path.basename(tar_path) for tar_path, _ in tasks}
    done_shards = kept
    done_bytes = sum(s["bytes"] for s in shards if s["name"] not in to_write)

    def finished(size: int) -> None:
        nonlocal done_shards, done_bytes
        done_shards += 1
        done_bytes += size
        if on_progress is not None:
            on_progress(done_shards, len(plan), done_bytes, total_bytes)

    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    if workers == 1:
        for task in tasks:
            finished(_write_task(task))
    else:
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from multiprocessing import get_context

        from .scan import _ignore_interrupt

        # spawn: the caller may hold threads that fork would copy mid-lock (as --verify)
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=get_context("spawn"), initializer=_ignore_interrupt
        ) as pool:
            futures = [pool.submit(_write_task, task) for task in tasks]
            try:
                for future in as_completed(futures):
                    finished(future.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    for shard in shards:  # what was written is what was planned, to the byte
        actual = os.path.getsize(os.path.join(out_dir, shard["name"]))
        if actual != shard["bytes"]:
            raise ShardError(
                f"{os.path.join(out_dir, shard['name'])}: {actual} bytes written, "
                f"{shard['bytes']} planned (an image changed while it was read?)"
            )
    manifest = write_manifest(
        out_dir,
        shards=shards,
        class_names=class_names,
        num_classes=num_classes,
        seed=seed,
        source=any_abspath(list_file),
    )
    return ShardsReport(
        out_dir=out_dir,
        manifest=manifest,
        shards=len(plan),
        samples=len(order),
        bytes=total_bytes,
        kept=kept,
        excluded=excluded,
        classes=num_classes,
    )


def _make_shards_in_bucket(list_file: str, *, out_dir: str, overwrite: bool, **options):
    """``make_shards`` into a bucket: the set is written in a local staging folder (this
    node's cache; a cut run resumes there, as on a disk), then each shard and index is
    uploaded unless the bucket holds it already at its size, ``classes.txt`` after them and
    ``manifest.json`` last: a prefix without a manifest is no set, so a cut upload leaves
    none that looks whole."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    out_dir = s3.join(out_dir)
    remote_manifest = s3.join(out_dir, MANIFEST)
    if s3.head(remote_manifest) is not None and not overwrite:
        raise ShardError(
            f"{remote_manifest}: a shard set is already there; choose another --out-dir, or "
            "--overwrite to replace it"
        )
    bucket, key = s3.split(out_dir)
    staging = os.path.join(cache_root(), "staging", bucket, *key.split("/"))
    if os.path.exists(os.path.join(staging, MANIFEST)):  # a cut upload's: its shards stay
        os.remove(os.path.join(staging, MANIFEST))
    report = make_shards(list_file, out_dir=staging, overwrite=False, **options)
    with open(report.manifest, encoding="utf-8") as f:
        manifest = json.load(f)
    planned = [name for shard in manifest["shards"] for name in (shard["name"], shard["index"])]
    remote = {s3.basename(u): size for u, size, _ in s3.list_objects(out_dir + "/")}
    if overwrite and MANIFEST in remote:  # the old set is no set from here on
        s3.client().delete_object(Bucket=bucket, Key=s3.key_of(remote_manifest))

    def upload(name: str) -> None:
        path = os.path.join(staging, name)
        if remote.get(name) != os.path.getsize(path):
            s3.upload(path, s3.join(out_dir, name))

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(upload, planned))
    for name in sorted(remote):  # shards of an old set or of another plan
        if SHARD_FILE.match(name) and name not in set(planned):
            s3.client().delete_object(Bucket=bucket, Key=s3.key_of(s3.join(out_dir, name)))
    if os.path.exists(os.path.join(staging, CLASSES_FILE)):
        s3.upload(os.path.join(staging, CLASSES_FILE), s3.join(out_dir, CLASSES_FILE))
    s3.upload(report.manifest, remote_manifest)
    shutil.rmtree(staging, ignore_errors=True)
    return dataclasses.replace(report, out_dir=out_dir, manifest=remote_manifest)


# --- reading a set: the loaders' ShardTable ----------------------------------------------


class ShardTable:
    """The samples of a shard set, as a loader holds them; in the loaders' eyes a
    ``SampleTable`` (``len``, ``labels``, ``path(i)``, ``paths(a, b)``, ``source(i)``) whose
    "path" of a sample is its name in the set, ``DIR/shard-000003.tar:000000123.jpg`` (what
    an error names), and whose ``source(i)`` is the image's bytes, read from its shard at the
    offset DALI's index gives: one ``pread`` a sample, through a few open files per process.
    Not memory maps: the pages of a mapped shard count in the process's RSS as they are read,
    up to the whole set's size over an epoch (1.36 GB max RSS at 20 steps of a
    1.28M-sample set, against 1.16 GB for its list), where read pages stay the kernel's
    page cache.

    Arrays, one entry a sample: ``shard_of`` (int32), ``offsets`` and ``sizes`` (int64, the
    image member's data in its tar), ``labels`` (int64), ``exts`` (uint8, into
    ``ext_names``). Sample i is the set's key i: keys run in order through the shards.
    ``shard_bytes``: each shard's size as the manifest gives it (``check_shards``);
    ``num_classes``: the set's (the manifest's, unless the reader gave one).
    """

    def __init__(
        self,
        folder: str,
        shard_names: Sequence[str],
        ext_names: Sequence[str],
        shard_of: np.ndarray,
        offsets: np.ndarray,
        sizes: np.ndarray,
        labels: np.ndarray,
        exts: np.ndarray,
        *,
        shard_bytes: Sequence[int] = (),
        num_classes: int | None = None,
        origin: str | None = None,
        keys: np.ndarray | None = None,
    ):
        self.folder = folder
        # Where the set lives when that is not ``folder``: the s3:// prefix of a set read
        # from the node's cache (``fetch_shard_set``). Errors name it.
        self.origin = origin
        # Each sample's key in the set, where it is not its position (a ``subset``).
        self.keys = keys
        self.shard_bytes = list(shard_bytes)
        self.num_classes = num_classes
        self.shard_names = list(shard_names)
        self.ext_names = list(ext_names)
        self.shard_of = shard_of
        self.offsets = offsets
        self.sizes = sizes
        self.labels = labels
        self.exts = exts
        self._files: dict[int, int] = {}  # shard -> open file descriptor, least recent first

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        arrays = (self.shard_of, self.offsets, self.sizes, self.labels, self.exts)
        return sum(a.nbytes for a in arrays)

    def shard_path(self, shard: int) -> str:
        return os.path.join(self.folder, self.shard_names[shard])

    def path(self, index: int) -> str:
        shard, ext = int(self.shard_of[index]), self.ext_names[int(self.exts[index])]
        where = (
            s3.join(self.origin, self.shard_names[shard]) if self.origin else self.shard_path(shard)
        )
        key = index if self.keys is None else int(self.keys[index])
        return f"{where}:{sample_key(key)}.{ext}"

    def subset(self, indices) -> ShardTable:
        """The samples ``indices`` (in that order) of this set, still named by their keys."""
        indices = np.asarray(indices, dtype=np.int64)
        keys = indices if self.keys is None else self.keys[indices]
        return ShardTable(
            self.folder, self.shard_names, self.ext_names,
            *(array[indices] for array in self.arrays()),
            shard_bytes=self.shard_bytes, num_classes=self.num_classes, origin=self.origin,
            keys=keys,
        )  # fmt: skip

    def paths(self, start: int = 0, stop: int | None = None) -> list[str]:
        stop = len(self) if stop is None else min(stop, len(self))
        return [self.path(i) for i in range(start, stop)]

    def _file(self, shard: int) -> int:
        fd = self._files.pop(shard, None)
        if fd is None:
            if len(self._files) >= OPEN_SHARDS:  # the least recently read one goes
                os.close(self._files.pop(next(iter(self._files))))
            fd = os.open(self.shard_path(shard), os.O_RDONLY)
        self._files[shard] = fd  # now the most recent
        return fd

    def source(self, index: int) -> bytes:
        """The image's bytes (what ``imagecheck`` and ``open_rgb`` take instead of a path)."""
        shard, start, size = (
            int(self.shard_of[index]), int(self.offsets[index]), int(self.sizes[index])
        )  # fmt: skip
        data = os.pread(self._file(shard), size, start)
        if len(data) != size:  # cut short since check_shards saw it whole
            raise OSError(f"{self.path(index)}: the shard ends inside this member (truncated?)")
        return data

    def view(self, index: int) -> np.ndarray:
        """The image's bytes as a uint8 array (what DALI's external_source takes)."""
        return np.frombuffer(self.source(index), dtype=np.uint8)

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])

    def __del__(self):
        with contextlib.suppress(Exception):  # at interpreter exit os may be gone
            self.close()

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (self.shard_of, self.offsets, self.sizes, self.labels, self.exts)

    def __getstate__(self) -> dict:
        # Open files are this process's: another one opens the shards again on first use.
        return {k: v for k, v in self.__dict__.items() if k != "_files"} | {"_files": {}}


def _parse_index(path: str, expected: int):
    """(image exts, offsets, sizes) of the samples of DALI's index ``path`` (a list of str
    and two int64 arrays), or (None, problem)."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.readline().split()
            text = f.read()
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror})"
    except UnicodeDecodeError:
        return None, "is not a DALI index (not text)"
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        return None, f"is not a DALI index of version {INDEX_VERSION}"
    lines = text.count("\n") + (0 if not text or text.endswith("\n") else 1)
    if int(head[1]) != expected or lines != expected:
        return None, f"indexes {lines} samples, the manifest {expected}"
    tokens = text.split()
    # make_shards' own layout, two components a sample (image, then label): whole columns
    # at once (1.28M samples in well under a second); any other layout line by line.
    if len(tokens) == 8 * expected and set(tokens[4::8]) <= {LABEL_EXT}:
        try:
            offsets = np.array(tokens[1::8], dtype=np.int64)
            sizes = np.array(tokens[2::8], dtype=np.int64)
            return (tokens[0::8], offsets, sizes), None
        except ValueError:
            pass
    exts, offsets, sizes = [], [], []
    for number, line in enumerate(text.splitlines(), 2):
        fields = line.split(" ")
        image = next(
            (fields[i : i + 3] for i in range(0, len(fields) - 3, 4) if fields[i] != LABEL_EXT),
            None,
        )
        if image is None or not (image[1].isdigit() and image[2].isdigit()):
            return None, f"line {number} names no image member"
        exts.append(image[0])
        offsets.append(int(image[1]))
        sizes.append(int(image[2]))
    return (exts, np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64)), None


def read_shard_table(path: str, *, num_classes: int | None = None) -> ShardTable:
    """The ShardTable of the shard set at ``path`` (its folder or manifest.json), from the
    manifest and the index files alone: no read of a shard. ShardError, one line naming the
    file, for a manifest that does not match its shards; ListError for a label outside
    ``[0, num_classes)``.

    A set in a bucket (``s3://...``) is read from the node's copy, fetched first
    (``fetch_shard_set``); its samples are named by their URL."""
    if s3.is_url(path):
        local = fetch_shard_set(path, log=lambda line: print(line, file=sys.stderr, flush=True))
        table = read_shard_table(local, num_classes=num_classes)
        table.origin = s3.dirname(manifest_path(path) or path)
        return table
    manifest = read_manifest(path)
    folder = os.path.dirname(os.path.abspath(manifest_path(path)))
    shard_names: list[str] = []
    shard_bytes: list[int] = []
    ext_names: list[str] = []
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("shard", "offset", "size", "label", "ext")
    }
    where = os.path.join(folder, MANIFEST)
    for number, shard in enumerate(manifest.get("shards") or []):
        try:
            name, index, count, size, labels = (
                shard["name"], shard["index"], int(shard["samples"]), int(shard["bytes"]),
                shard["labels"],
            )  # fmt: skip
            labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        except (KeyError, TypeError, ValueError):
            raise ShardError(f"{where}: shard entry {number + 1} is incomplete") from None
        if len(labels) != count:
            raise ShardError(f"{where}: {name} has {count} samples but {len(labels)} labels")
        parsed, problem = _parse_index(os.path.join(folder, index), count)
        if problem is not None:
            raise ShardError(
                f"{os.path.join(folder, index)}: {problem}; the manifest does not match its "
                "shards (write the set again with make_shards.py)"
            )
        exts, offsets, sizes = parsed
        shard_names.append(name)
        shard_bytes.append(size)
        codes = {}
        for ext in sorted(set(exts)):  # sorted: the same codes in every process
            if ext not in ext_names:
                ext_names.append(ext)
            codes[ext] = ext_names.index(ext)
        if len(ext_names) > 255:
            raise ShardError(f"{where}: more than 255 kinds of image member")
        parts["ext"].append(np.array([codes[e] for e in exts], dtype=np.uint8))
        parts["shard"].append(np.full(count, number, dtype=np.int32))
        parts["offset"].append(offsets)
        parts["size"].append(sizes)
        parts["label"].append(labels)
    if not shard_names:
        raise ShardError(f"{where}: the set holds no shards")
    limit = num_classes if num_classes is not None else manifest.get("num_classes")
    table = ShardTable(
        folder,
        shard_names,
        ext_names,
        *(np.concatenate(parts[k]) for k in ("shard", "offset", "size", "label", "ext")),
        shard_bytes=shard_bytes,
        num_classes=None if limit is None else int(limit),
    )
    if limit is not None:
        outside = np.flatnonzero((table.labels < 0) | (table.labels >= int(limit)))
        if len(outside):
            first = int(outside[0])
            raise ListError(
                f"{table.path(first)}: label {int(table.labels[first])} is outside "
                f"[0, {int(limit)})"
            )
    return table


def check_shards(table: ShardTable) -> None:
    """Every shard there, of the size its manifest gives: a missing or truncated shard is
    one line naming it, before the first step (one stat a shard)."""
    for number, expected in enumerate(table.shard_bytes):
        path = table.shard_path(number)
        try:
            actual = os.path.getsize(path)
        except OSError as exc:
            raise ShardError(
                f"{path}: shard listed in {MANIFEST} cannot be read ({exc.strerror})"
            ) from None
        if actual != expected:
            raise ShardError(
                f"{path}: {actual} bytes, its manifest says {expected}: a truncated or "
                "replaced shard (copy it again, or write the set again with make_shards.py)"
            )


# --- a set in a bucket: the node's copy --------------------------------------------------

CACHE_ENV = "DALI_RESNET_TRAINER_CACHE"
ETAGS = ".etags.json"


def cache_root() -> str:
    """Where sets from buckets are copied: ``$DALI_RESNET_TRAINER_CACHE``, else
    ``$XDG_CACHE_HOME/dali-resnet-trainer`` (``~/.cache/dali-resnet-trainer``): a local disk
    of each node."""
    found = os.environ.get(CACHE_ENV)
    if found:
        return found
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dali-resnet-trainer")


def fetch_shard_set(url: str, *, cache_dir: str | None = None, log=None) -> str:
    """Copy the shard set at ``url`` (an s3:// prefix or its manifest.json) to this node's
    cache, and return the local folder.

    Why a copy: every epoch reads the whole set in a fresh global order (a batch of 256 from
    a thousand shards touches over 200 of them), so the shards are read at random offsets,
    which a local disk serves and an object store, a request per sample, does not. The copy
    is the one sequential read of each shard, in parallel, once per node; later runs (and
    the other ranks of the node) find it there. A shard is fetched again when its ETag in
    the bucket changed (a set written again). The ranks of a node take a lock on the folder:
    the first fetches, the others wait and then find everything in place. Start-up reads the
    manifest, one listing per thousand objects, and the shards not yet here; never a request
    per sample. ``log(line)``: progress, only from the one process that fetches.
    """
    import fcntl
    import shutil
    import time
    from concurrent.futures import ThreadPoolExecutor

    manifest_url = manifest_path(url)
    if manifest_url is None:
        raise ShardError(f"{url}: no {MANIFEST} (not a shard set written by make_shards.py)")
    prefix = s3.dirname(manifest_url)
    bucket, key = s3.split(prefix)
    local = os.path.join(cache_dir or cache_root(), "s3", bucket, *key.split("/"))
    try:
        os.makedirs(local, exist_ok=True)
    except OSError as exc:
        raise ShardError(
            f"{local}: cannot make the cache folder for {url} ({exc.strerror}); set "
            f"{CACHE_ENV} to a writable local folder"
        ) from None
    with open(os.path.join(local, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        manifest = read_manifest(manifest_url)
        listing = {s3.basename(u): (size, etag) for u, size, etag in s3.list_objects(prefix + "/")}
        try:
            with open(os.path.join(local, ETAGS), encoding="utf-8") as f:
                have = json.load(f)
        except (OSError, ValueError):
            have = {}
        wanted: list[tuple[str, int, str]] = []
        names = [CLASSES_FILE] if CLASSES_FILE in listing else []
        for shard in manifest.get("shards") or []:
            names += [str(shard.get("name")), str(shard.get("index"))]
            if shard.get("name") in listing and listing[shard["name"]][0] != shard.get("bytes"):
                raise ShardError(
                    f"{s3.join(prefix, shard['name'])}: {listing[shard['name']][0]} bytes, its "
                    f"manifest says {shard.get('bytes')}: a truncated or replaced shard (write "
                    "the set again with make_shards.py)"
                )
        for name in names:
            if name not in listing:
                raise ShardError(
                    f"{s3.join(prefix, name)}: listed in {MANIFEST} but not in the bucket "
                    "(a set copied in part, or written again: write it again with make_shards.py)"
                )
            size, etag = listing[name]
            path = os.path.join(local, name)
            if have.get(name) == etag and os.path.isfile(path) and os.path.getsize(path) == size:
                continue
            wanted.append((name, size, etag))
        total = sum(size for _, size, _ in wanted)
        free = shutil.disk_usage(local).free
        if total > free:
            raise ShardError(
                f"{local}: the copy of {prefix} needs {total / 1e9:.1f} GB more, the disk has "
                f"{free / 1e9:.1f} GB free; set {CACHE_ENV} to a local folder with room"
            )
        if wanted:
            start = time.monotonic()
            if log is not None:
                log(f"copying {len(wanted)} files ({total / 1e6:,.0f} MB) of {prefix} to {local}")
            for name, _, _ in wanted:  # stale entries go first: a cut fetch redoes them
                have.pop(name, None)
            atomic_write_text(os.path.join(local, ETAGS), json.dumps(have))

            def fetch(item: tuple[str, int, str]) -> tuple[str, str]:
                s3.download(s3.join(prefix, item[0]), os.path.join(local, item[0]))
                return item[0], item[2]

            with ThreadPoolExecutor(max_workers=8) as pool:
                for name, etag in pool.map(fetch, wanted):
                    have[name] = etag
            atomic_write_text(os.path.join(local, ETAGS), json.dumps(have))
            if log is not None:
                seconds = time.monotonic() - start
                log(f"copied in {seconds:.1f} s ({total / 1e6 / max(seconds, 1e-9):,.0f} MB/s)")
        # The manifest last, as make_shards writes it: the copy is a set once it is whole.
        atomic_write_text(os.path.join(local, MANIFEST), json.dumps(manifest))
    return local
