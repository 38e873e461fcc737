"""Pretrained weights by torchvision name: resolved, downloaded once per node, their facts kept.

``--pretrained`` takes a local file, or a name of torchvision's weights for ``--arch``
(``DEFAULT``, ``IMAGENET1K_V2``, or the qualified ``ResNet50_Weights.IMAGENET1K_V2``), as
torchvision's ``get_model(arch, weights=NAME)`` and its reference scripts' ``--weights`` take
them. The file is torchvision's own: the same URL, the same place in torch's hub cache
(``$TORCH_HOME/hub/checkpoints/<file name of the URL>``), so a file already there, from
torchvision or copied by hand, is used as it is and no network is touched (torchvision does
not check a cached file either). A download is checked as torch.hub checks it (the SHA-256
starts with the hex digits in the file name) and lands under its final name only whole: it
is written as the project writes every file (``pipelines.fileio.atomic_write``). ``PRETRAINED_MIRROR`` (a base URL)
replaces ``https://download.pytorch.org`` for sites that keep a copy of it.

In a job one process per node downloads (local rank 0, in a thread), while every rank checks
in once a second: a download may take longer than ``--dist-timeout``, which a plain wait in a
collective would turn into a timeout. Every rank then loads the cached file.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from pipelines.fileio import atomic_write
from pipelines.torchvision_import import torchvision
from trainer.config import TrainerError

MIRROR_ENV = "PRETRAINED_MIRROR"
# torch.hub's: the hex digits after the last '-' of the file name start its SHA-256.
HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")
CHUNK = 1 << 20
READ_TIMEOUT_S = 60.0  # a read that long without a byte: the connection is dead
# A value that can only be a name, not a path: no folder separator, no file suffix, and the
# only dot the qualified form's (ResNet50_Weights.IMAGENET1K_V2).
NAME_FORM = re.compile(r"^(?:[A-Za-z0-9_]+_weights\.)?[A-Za-z0-9_]+$", re.IGNORECASE)


@dataclass(frozen=True)
class NamedWeights:
    """One of torchvision's weights for an architecture, and where its file lives here."""

    arch: str
    name: str  # qualified: ResNet50_Weights.IMAGENET1K_V2 (DEFAULT resolved)
    url: str  # where this run fetches it (the mirror's, when PRETRAINED_MIRROR is set)
    file: str  # torch's hub cache: $TORCH_HOME/hub/checkpoints/<name in the URL>
    enum: Any  # the torchvision Weights member

    @property
    def hash_prefix(self) -> str | None:
        found = HASH_REGEX.search(os.path.basename(self.file))
        return found.group(1) if found else None

    def facts(self) -> dict[str, Any]:
        """What the weights are, for config.toml, model.pt and eval.json: the name, URL and
        file, the preprocessing they were evaluated with, and the published figures."""
        transform = dict(self.enum.transforms.keywords)
        interpolation = transform.get("interpolation")
        metrics = self.enum.meta.get("_metrics", {})
        facts = {
            "name": self.name,
            "url": self.enum.url,
            "file": self.file,
            "eval_crop_size": int(transform["crop_size"]),
            # ImageClassification's default when the weights do not set it
            "eval_resize_size": int(transform.get("resize_size", 256)),
            "eval_interpolation": interpolation.value if interpolation else "bilinear",
            "categories": len(self.enum.meta.get("categories") or []),
        }
        for data_set, figures in metrics.items():  # e.g. ImageNet-1K: acc@1, acc@5
            key = re.sub(r"[^a-z0-9]+", "_", data_set.lower()).strip("_")
            for metric, value in figures.items():
                facts[f"{key}_{metric.replace('@', '')}"] = float(value)
        return facts


def looks_like_name(value: str) -> bool:
    return bool(NAME_FORM.match(value))


def _enum_arch(enum_name: str) -> str | None:
    """The classification architecture whose weights enum is called ``enum_name``."""
    for arch in torchvision.models.list_models(module=torchvision.models):
        if torchvision.models.get_model_weights(arch).__name__.lower() == enum_name.lower():
            return arch
    return None


def names_of(arch: str) -> str:
    """'IMAGENET1K_V1, IMAGENET1K_V2 (DEFAULT)': the names ``arch`` has, for a message."""
    enum = torchvision.models.get_model_weights(arch)
    default = getattr(enum, "DEFAULT", None)
    return ", ".join(f"{member.name}{' (DEFAULT)' if member is default else ''}" for member in enum)


def resolve(value: str, arch: str | None, *, flag: str = "--pretrained") -> NamedWeights | None:
    """``value`` as torchvision weights of ``arch``, or None when it is a file (an existing
    path, or one that cannot be a name). TrainerError, one line, for a name ``arch`` lacks.
    ``arch`` None: the qualified name's own architecture. ``flag``: the option, for messages."""
    if os.path.exists(value) or not looks_like_name(value):
        return None
    qualified, _, member = value.rpartition(".")
    if arch is None:
        arch = _enum_arch(qualified) if qualified else None
        if arch is None:
            raise TrainerError(
                f"{flag} {value}: no such file, and as torchvision weights it needs --arch "
                "(e.g. --arch resnet50) or its qualified name (ResNet50_Weights.IMAGENET1K_V2)"
            )
    enum = torchvision.models.get_model_weights(arch)
    if qualified and qualified.lower() != enum.__name__.lower():
        owner = _enum_arch(qualified)
        whose = f"weights of {owner}" if owner else f"torchvision has no {qualified}"
        raise TrainerError(
            f"{flag} {value}: {whose}, but --arch is {arch}, whose weights are "
            f"{names_of(arch)} (or give a weights file)"
        )
    found = {m.name.lower(): m for m in enum}
    if member.lower() == "default" and hasattr(enum, "DEFAULT"):
        weights = enum.DEFAULT
    elif member.lower() in found:
        weights = found[member.lower()]
    else:
        raise TrainerError(
            f"{flag} {value}: no such weights for {arch} (and no such file); its "
            f"weights are {names_of(arch)}"
        )
    url = mirrored(weights.url)
    file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    return NamedWeights(arch, f"{enum.__name__}.{weights.name}", url, file, weights)


def mirrored(url: str) -> str:
    """``url`` on the mirror named by $PRETRAINED_MIRROR (its path kept), else itself."""
    base = os.environ.get(MIRROR_ENV, "").strip()
    if not base:
        return url
    return base.rstrip("/") + urllib.parse.urlsplit(url).path


class DownloadError(TrainerError):
    """A download that failed or was refused; the message says what, and where to put a
    copy fetched elsewhere."""


def offline_hint(weights: NamedWeights) -> str:
    return (
        f"on a machine without network, put a copy of {os.path.basename(weights.file)} at "
        f"{weights.file} (the folder follows $TORCH_HOME)"
    )


class Progress:
    """Download progress on ``stream``: a bar redrawn in place on a terminal, else a line
    per 10% (a log file should not get a line per chunk)."""

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None):
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.tenths_said = 0
        self.last_draw = 0.0

    def update(self, done: int) -> None:
        rate = done / max(time.monotonic() - self.start, 1e-6)
        if self.total:
            share = min(done / self.total, 1.0)
            figure = (
                f"{share:4.0%} {done / 1e6:.1f}/{self.total / 1e6:.1f} MB, {rate / 1e6:.1f} MB/s"
            )
        else:
            share, figure = None, f"{done / 1e6:.1f} MB, {rate / 1e6:.1f} MB/s"
        if self.tty:
            now = time.monotonic()
            if now - self.last_draw >= 0.1 or (share is not None and share >= 1.0):
                self.last_draw = now
                self.stream.write(f"\r{self.label}: {figure}\x1b[K")
                self.stream.flush()
        elif share is not None and int(share * 10) > self.tenths_said:
            self.tenths_said = int(share * 10)
            self.stream.write(f"{self.label}: {figure}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def download(
    url: str,
    dest: str,
    *,
    hash_prefix: str | None,
    label: str,
    stream: TextIO | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> None:
    """``url`` into ``dest`` through ``atomic_write`` (a temporary file beside it, renamed
    once whole), checked first: its length against Content-Length and its SHA-256 against
    ``hash_prefix``. A cut, refused or cancelled download leaves nothing, neither under
    ``dest`` nor beside it. Raises DownloadError for what it checks, else OSError or
    urllib's errors; the caller words them."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)  # an unwritable cache: said before a byte
    request = urllib.request.Request(url, headers={"User-Agent": "torch.hub"})
    with urllib.request.urlopen(request, timeout=READ_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None

        def write(f) -> None:
            progress = Progress(label, total, stream)
            sha256 = hashlib.sha256()
            done = 0
            try:
                while chunk := response.read(CHUNK):
                    if cancelled():
                        raise DownloadError("download cancelled")
                    f.write(chunk)
                    sha256.update(chunk)
                    done += len(chunk)
                    progress.update(done)
            finally:
                progress.close()
            if total is not None and done != total:
                raise DownloadError(f"the connection ended after {done} of {total} bytes")
            digest = sha256.hexdigest()
            if hash_prefix and not digest.startswith(hash_prefix):
                raise DownloadError(
                    f"its SHA-256 is {digest[:16]}..., not the {hash_prefix}... its name "
                    "promises: a damaged or altered file, not kept"
                )

        atomic_write(dest, write)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
    if isinstance(exc, http.client.IncompleteRead):
        return f"the connection ended after {len(exc.partial)} more bytes"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


def fetch_one(weights: NamedWeights, *, stream: TextIO | None = None, cancelled=lambda: False):
    """The cached file of ``weights``, downloaded first when it is not there; DownloadError
    (one line: what failed, the URL, where a copy can go) when that fails."""
    if os.path.isfile(weights.file):
        return weights.file
    (stream or sys.stderr).write(
        f"downloading {weights.name} from {weights.url} to {weights.file}\n"
    )
    try:
        download(
            weights.url,
            weights.file,
            hash_prefix=weights.hash_prefix,
            label=f"downloading {os.path.basename(weights.file)}",
            stream=stream,
            cancelled=cancelled,
        )
    except DownloadError as exc:
        raise DownloadError(
            f"{weights.name}: {weights.url}: {exc}; {offline_hint(weights)}"
        ) from None
    except OSError as exc:
        if exc.filename and not isinstance(exc, urllib.error.URLError):  # the cache, not the net
            raise DownloadError(
                f"{weights.name}: cannot write {exc.filename} ({exc.strerror or exc}); point "
                "TORCH_HOME at a folder this process can write"
            ) from None
        raise DownloadError(
            f"{weights.name}: could not download {weights.url} ({_reason(exc)}); "
            f"{offline_hint(weights)}"
        ) from None
    # A connection cut mid-body is http.client's IncompleteRead, not an OSError.
    except (http.client.HTTPException, ValueError) as exc:
        raise DownloadError(
            f"{weights.name}: could not download {weights.url} ({_reason(exc)}); "
            f"{offline_hint(weights)}"
        ) from None
    return weights.file


def fetch_for_node(weights: NamedWeights, info) -> str:
    """The cached file on every rank: local rank 0 of each node downloads it if it is not
    there, in a thread, while every rank of the job checks in once a second (a collective
    that returns at once, never one that waits out the download); a failure is raised on
    every rank, said by rank 0. ``info``: trainer.dist.DistInfo."""
    from trainer import dist
    from trainer.nodes import agreed_by_all

    if not dist.is_distributed():
        return fetch_one(weights)
    outcome: dict[str, Any] = {}
    stop = threading.Event()

    def work() -> None:
        try:
            outcome["file"] = fetch_one(weights, cancelled=stop.is_set)
        except TrainerError as exc:
            outcome["error"] = exc
        except BaseException as exc:  # noqa: BLE001 - reported on the main thread
            outcome["error"] = exc

    worker = None
    if info.local_rank == 0 and not os.path.isfile(weights.file):
        worker = threading.Thread(target=work, name="pretrained-download", daemon=True)
        worker.start()
    try:
        while True:
            busy = worker is not None and worker.is_alive()
            if not any(dist.all_gather_objects(busy)):
                break
            time.sleep(1.0)
    finally:
        stop.set()  # a Stopped (Ctrl-C) or a failed peer: the partial file is removed
        if worker is not None:
            worker.join()

    def check() -> str:
        if outcome.get("error") is not None:
            raise outcome["error"]
        if not os.path.isfile(weights.file):
            raise TrainerError(
                f"{weights.name}: {weights.file} is not there on this node "
                "after its first rank's download"
            )
        return weights.file

    return agreed_by_all(info, check)
