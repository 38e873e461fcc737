"""What every backend shares: the epoch plan (order, sharding, steps) in ``ShardedLoader``, the
base class of both loaders; seeds; the file checks, split over the ranks; and the hand-off of a
batch to the trainer's device, layout and dtype.

Keeping these in one place is what makes the backends agree: the same steps per rank, the same
exactly-once validation shards, the same output contract.
"""

from __future__ import annotations

import math
import os
import stat
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import s3
from .imagecheck import open_rgb  # noqa: F401  (the loaders' one decode, re-exported here)
from .lists import SampleTable, sample_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_CROP_FRACTION = 0.875  # val: resize the shorter side to crop / 0.875, then center-crop
TRAIN_AREA = (0.08, 1.0)
TRAIN_ASPECT_RATIO = (3 / 4, 4 / 3)
# Automatic augmentation after the crop and flip (torchvision's and DALI's, same settings):
# AutoAugment's ImageNet policy, RandAugment (2 ops, magnitude 9), TrivialAugmentWide.
AUTO_AUGMENT = ("none", "auto", "rand", "trivial")
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def val_resize_size(image_size: int) -> int:
    return int(image_size / VAL_CROP_FRACTION)


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch.device with an explicit index for CUDA (DALI needs the device id)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device} is not supported: use 'cpu' or 'cuda[:N]'")
    return device


def train_steps(num_samples: int, *, world_size: int, batch_size: int, list_file: str) -> int:
    """Steps per training epoch, the same on every rank: whole batches of an even split."""
    steps = (num_samples // world_size) // batch_size
    if steps == 0:
        raise ValueError(
            f"{list_file}: {num_samples} samples give no training step with world size "
            f"{world_size} and batch size {batch_size} (a step needs "
            f"{world_size * batch_size} samples); use a smaller batch or a longer list"
        )
    return steps


def epoch_permutation(num_samples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The global sample order of one training epoch; identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def val_shard(num_samples: int, *, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous slice of the list; the slices partition it exactly.

    The same bounds DALI's readers use (``floor(N*r/W)``), but computed here so a rank may hold
    nothing (N < W), which DALI's reader refuses.
    """
    return range(num_samples * rank // world_size, num_samples * (rank + 1) // world_size)


def derived_seed(*parts: int) -> int:
    """A 31-bit seed that depends on all of ``parts`` (e.g. seed, rank, epoch)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint32)
    return int(state[0] & 0x7FFFFFFF)


def check_args(
    *, batch_size: int, image_size: int, rank: int, world_size: int, seed: int, dtype
) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported: use one of {OUTPUT_DTYPES}")


def check_slice(num_samples: int, *, rank: int, world_size: int) -> range:
    """The list entries rank ``rank`` checks exist: the ranks' slices partition the list.

    The same contiguous slice as the rank's validation shard. In training any rank may read
    any file in some epoch, but the ranks check together, each its own 1/world_size of the
    list, so a job stats every file once rather than once per rank (8 times on 8 GPUs). The
    trainer splits it among the ranks of each node instead (``world_size`` = ranks on the
    node), since each node may read its own copy of the files.
    """
    return val_shard(num_samples, rank=rank, world_size=world_size)


def check_files_exist(
    table: SampleTable, *, list_file: str, rank: int = 0, world_size: int = 1
) -> range:
    """Fail before the first step on a missing, empty or non-regular file, naming it.

    Checks this rank's ``check_slice`` of the list (the whole list for a single process) and
    returns it. One ``stat`` per file: about a second per million files on a local disk with a
    warm cache (measured: 1 us a file), much more on a cold network filesystem, where
    ``build_loader(check_files=False)`` skips it. Decoding every file up front would cost as
    much as an epoch; that is ``tools/make_lists.py --verify``.
    """
    checked = check_slice(len(table), rank=rank, world_size=world_size)
    if len(checked) and s3.is_url(table.path(checked.start)):
        _check_objects_exist(table, list_file=list_file, checked=checked)
        return checked
    # Decoded a block at a time: a few MB of strings at once, never the whole list's.
    block = 1 << 16
    for start in range(checked.start, checked.stop, block):
        for offset, path in enumerate(table.paths(start, min(start + block, checked.stop))):
            try:
                st = os.stat(path)
            except OSError as e:
                where = _where_listed(list_file, start + offset)
                raise FileNotFoundError(
                    f"{path}: image file listed at {where} cannot be read ({e.strerror})"
                ) from e
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                where = _where_listed(list_file, start + offset)
                why = "is empty" if stat.S_ISREG(st.st_mode) else "is not a regular file"
                raise ValueError(f"{path}: image file listed at {where} {why}")
    return checked


def object_sizes(urls: list[str]) -> dict[str, int]:
    """The size of every object in the folders that ``urls`` lie in (so of each of ``urls``
    that exists): not a request per object (a HEAD per image would cost as much as reading
    it), but a listing of each folder, a thousand objects a request, several at once."""
    folders = sorted({s3.dirname(url) + "/" for url in urls if s3.is_url(url)})
    sizes: dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=16) as pool:
        for listing in pool.map(lambda folder: list(s3.list_objects(folder)), folders):
            sizes.update((url, size) for url, size, _ in listing)
    return sizes


def _check_objects_exist(table: SampleTable, *, list_file: str, checked: range) -> None:
    """``check_files_exist`` for a list of s3:// URLs, from ``object_sizes``."""
    urls = table.paths(checked.start, checked.stop)
    sizes = object_sizes(urls)
    for offset, url in enumerate(urls):
        size = sizes.get(url) if s3.is_url(url) else None
        if size is None or size == 0:
            where = _where_listed(list_file, checked.start + offset)
            why = "is an empty object" if size == 0 else "cannot be read (no such object)"
            if not s3.is_url(url):
                why = "is not an s3:// URL, in a list whose images are in a bucket"
            raise FileNotFoundError(f"{url}: image listed at {where} {why}")


def _where_listed(list_file: str, index: int) -> str:
    """``list_file:line`` of sample ``index``, for an error (the list is read again)."""
    line = sample_line(list_file, index)
    return f"{list_file}:{line}" if line is not None else list_file


class ShardedLoader:
    """What the DALI and PIL loaders share: the arguments, the epoch plan and ``set_epoch``.

    The plan: in training every rank runs ``steps`` whole batches; the epoch's order is
    ``epoch_permutation(seed, epoch)``, the same on every rank, cut to ``world_size * steps *
    batch_size`` samples, and rank r reads the r-th contiguous block of it. In validation rank
    r reads its ``val_shard`` in list order, a short last batch included. ``pass_indices`` is
    that plan for the current epoch; a backend only turns indices into batches.
    """

    def __init__(
        self,
        table: SampleTable,
        *,
        list_file: str,
        train: bool,
        batch_size: int,
        image_size: int,
        rank: int,
        world_size: int,
        device: torch.device,
        seed: int,
        dtype: torch.dtype,
        prefetch: int,
        auto_augment: str = "none",
    ):
        if auto_augment not in AUTO_AUGMENT:
            raise ValueError(f"auto_augment must be one of {AUTO_AUGMENT}, got {auto_augment!r}")
        self.auto_augment = auto_augment if train else "none"  # augmentation is for training
        self.table = table
        self.list_file = list_file
        self.train = train
        self.batch_size = batch_size
        self.image_size = image_size
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.seed = seed
        self.dtype = dtype
        self.prefetch = prefetch
        self.dataset_size = len(table)
        self.num_classes: int | None = None
        self.epoch = 0
        # Where the next training pass starts (a run resumed mid-epoch) and the backend's
        # state to start it from (DALI's pipeline checkpoint); both apply to one pass only.
        self.start_step = 0
        self.resume_state = None
        if train:
            self.steps = train_steps(
                len(table), world_size=world_size, batch_size=batch_size, list_file=list_file
            )
            self.num_samples = self.steps * batch_size
        else:
            shard = val_shard(len(table), rank=rank, world_size=world_size)
            self.num_samples = len(shard)
            self.steps = math.ceil(self.num_samples / batch_size)

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, *, start_step: int = 0, state=None) -> None:
        """The next pass is epoch ``epoch``; in training it may start at batch ``start_step``
        with ``state`` (what ``state()`` returned after that many batches of that epoch), so
        a resumed run continues with the very batches the uninterrupted one would have had."""
        self.epoch = int(epoch)
        if not self.train and start_step:
            raise ValueError("only a training pass can start mid-way")
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step {start_step} is outside [0, {self.steps}]")
        self.start_step = int(start_step)
        self.resume_state = state

    def set_image_size(self, image_size: int) -> None:
        """The crop side of the next training passes (progressive resizing); validation keeps
        the size it was built with."""
        if not self.train:
            raise ValueError("only a training loader changes its image size")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.image_size = int(image_size)

    def state(self):
        """What a pass needs beyond its position to continue exactly (None: nothing)."""
        return None

    def graph(self) -> dict:
        """What shapes the training pass that ``state()`` belongs to: a saved state restores
        into a pass of the same graph only (a resume compares the two)."""
        return {
            "backend": type(self).__name__,
            "auto_augment": self.auto_augment,
            "image_size": self.image_size,
        }

    def pass_indices(self) -> np.ndarray:
        """The list indices this rank reads in the current pass, in order (int64)."""
        if self.train:
            order = epoch_permutation(self.dataset_size, seed=self.seed, epoch=self.epoch)
            start = self.rank * self.num_samples + self.start_step * self.batch_size
            end = (self.rank + 1) * self.num_samples
            # A copy: the loader holds its block for the pass, not the whole permutation.
            return order[start:end].copy()
        shard = val_shard(self.dataset_size, rank=self.rank, world_size=self.world_size)
        return np.arange(shard.start, shard.stop, dtype=np.int64)


def return_freed_memory() -> None:
    """Hand the heap memory freed so far back to the OS (glibc's ``malloc_trim``; a no-op
    where there is none).

    Why: a DALI pipeline is rebuilt for every training pass, and what the old one freed stays
    in glibc's heap, fragmented; the rank's RSS then crept up epoch after epoch. On the demo
    list (224 px, batch 32, 2 threads, CPU) it went from 735 MB built to 1,100-1,200 MB over
    120 passes, and stayed at 775-840 MB with a trim after each pass. A trim takes a few ms.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def to_output(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    device: torch.device,
    dtype: torch.dtype,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract: NCHW-shaped, channels_last, ``dtype``, on ``device``; labels int64.

    ``layout`` "NHWC": the batch is HWC per image (DALI), so ``permute`` gives an NCHW-shaped
    view that is already channels_last: no copy. "NCHW": a contiguous NCHW batch (PIL's
    ToTensor) that needs one layout conversion, done on the device after the copy.
    """
    if layout == "NHWC":
        images = images.permute(0, 3, 1, 2)
    images = images.to(device, non_blocking=True)
    # preserve_format (the default of .to) keeps the channels_last strides of the view.
    images = images.to(dtype=dtype, memory_format=torch.channels_last)
    labels = labels.reshape(-1).to(device=device, dtype=torch.int64, non_blocking=True)
    return images, labels
