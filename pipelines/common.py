"""What every backend shares: the epoch plan (order, sharding, steps), seeds, the file checks
and the hand-off of a batch to the trainer's device, layout and dtype.

Keeping these in one place is what makes the backends agree: the same steps per rank, the same
exactly-once validation shards, the same output contract.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import torch
from PIL import Image

from .lists import Sample

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_CROP_FRACTION = 0.875  # val: resize the shorter side to crop / 0.875, then center-crop
TRAIN_AREA = (0.08, 1.0)
TRAIN_ASPECT_RATIO = (3 / 4, 4 / 3)
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


def check_files_exist(samples: list[Sample], *, list_file: str) -> None:
    """Fail before the first step on a missing, empty or non-regular file, naming it.

    One ``stat`` per file: about a second per million files on a local disk with a warm cache
    (measured: 1 us a file), much more on a cold network filesystem, where
    ``build_loader(check_files=False)`` skips it. Decoding every
    file up front would cost as much as an epoch; that is ``tools/make_lists.py --verify``.
    """
    for sample in samples:
        try:
            st = os.stat(sample.path)
        except OSError as e:
            raise FileNotFoundError(
                f"{sample.path}: image file listed in {list_file} cannot be read ({e.strerror})"
            ) from e
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{sample.path}: listed in {list_file} but is not a regular file")
        if st.st_size == 0:
            raise ValueError(f"{sample.path}: image file listed in {list_file} is empty")


def open_rgb(path: str) -> Image.Image:
    """Decode one file fully to an RGB PIL image, the way DALI's decoders do.

    Grayscale, palette, CMYK and alpha images convert to RGB; 16-bit grayscale (mode I;16, or
    I for older Pillow) is scaled to 8 bits as DALI does (round(v / 257)) instead of Pillow's
    clamp to 255; EXIF orientation is applied, as DALI's ``adjust_orientation`` default does.
    """
    from PIL import ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I;16") or im.mode == "I":
            scaled = np.round(np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255)
            im = Image.fromarray(scaled.astype(np.uint8))  # 2-D uint8: mode L
        return im.convert("RGB")


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
