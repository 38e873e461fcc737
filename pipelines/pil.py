"""The baseline: torchvision's standard recipe, PIL + DistributedSampler + DataLoader.

Same semantics as the DALI loader: same steps per rank in training, every validation image
exactly once across ranks, the same output contract. Two choices beyond the textbook recipe:

- Augmentation randomness is seeded per sample from (seed, rank, epoch, index), inside a
  forked RNG. So it repeats per seed whatever the worker count, resumes exactly at epoch k,
  differs per rank, and never touches the caller's global RNG (which num_workers=0 would).
  The sampler tags each index with the epoch, so persistent workers see the current epoch.
- Validation uses a contiguous exactly-once shard, not DistributedSampler (which pads with
  duplicates or drops the tail).

Backend "pil-gpu" is the strong PyTorch baseline (NVIDIA's and timm's prefetchers): workers do
the PIL crop/flip only and collate uint8 HWC; the float conversion and normalization run on
the device on a side stream, one batch ahead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from . import common
from .lists import ImageError, Sample


def train_transform(image_size: int, *, normalize: bool = True) -> T.Compose:
    steps = [
        T.RandomResizedCrop(
            image_size,
            scale=common.TRAIN_AREA,
            ratio=common.TRAIN_ASPECT_RATIO,
            interpolation=T.InterpolationMode.BILINEAR,
            antialias=True,
        ),
        T.RandomHorizontalFlip(0.5),
    ]
    return T.Compose(steps + _tensor_steps(normalize))


def val_transform(image_size: int, *, normalize: bool = True) -> T.Compose:
    steps = [
        T.Resize(
            common.val_resize_size(image_size),
            interpolation=T.InterpolationMode.BILINEAR,
            antialias=True,
        ),
        T.CenterCrop(image_size),
    ]
    return T.Compose(steps + _tensor_steps(normalize))


def _tensor_steps(normalize: bool) -> list:
    if normalize:
        return [T.ToTensor(), T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)]
    return [_to_uint8_hwc]


def _to_uint8_hwc(image) -> torch.Tensor:
    # HWC uint8, a quarter of float32's bytes through the worker queue and the copy.
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())


class ListDataset(Dataset):
    """Samples of a list file; ``dataset[(index, epoch)]`` -> (image tensor, label)."""

    def __init__(self, samples: list[Sample], *, transform, random: bool, seed: int, rank: int):
        self.samples = samples
        self.transform = transform
        self.random = random
        self.seed = seed
        self.rank = rank

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        sample = self.samples[index]
        try:
            image = common.open_rgb(sample.path)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ...: name the file
            raise ImageError(f"{sample.path}: cannot decode image ({type(e).__name__}: {e})") from e
        if not self.random:
            return self.transform(image), sample.label
        # The CPU generator only (torch.manual_seed would reseed CUDA's too, which fork_rng
        # with devices=[] does not restore).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(
                common.derived_seed(self.seed, self.rank, epoch, index)
            )
            return self.transform(image), sample.label


class EpochTaggedSampler(Sampler):
    """Yields ``(index, epoch)`` from an inner sampler, so workers know the epoch."""

    def __init__(self, indices):
        self.indices = indices
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.indices, "set_epoch"):
            self.indices.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        return ((int(i), epoch) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class PilLoader:
    """Iterable of ``(images, labels)`` for one rank; see ``pipelines.build_loader``."""

    def __init__(
        self,
        samples: list[Sample],
        *,
        list_file: str,
        train: bool,
        batch_size: int,
        image_size: int,
        rank: int,
        world_size: int,
        device: torch.device,
        num_workers: int,
        seed: int,
        dtype: torch.dtype,
        prefetch: int,
        normalize_on_device: bool = False,
    ):
        self.list_file = list_file
        self.train = train
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.rank = rank
        self.dataset_size = len(samples)
        self.normalize_on_device = normalize_on_device
        make = train_transform if train else val_transform
        dataset = ListDataset(
            samples,
            transform=make(image_size, normalize=not normalize_on_device),
            random=train,
            seed=seed,
            rank=rank,
        )
        if train:
            self.steps = common.train_steps(
                len(samples), world_size=world_size, batch_size=batch_size, list_file=list_file
            )
            # Same global permutation on every rank (seed + epoch); drop_last trims it to a
            # multiple of world_size, and the DataLoader's drop_last to whole batches.
            inner = DistributedSampler(
                dataset,
                num_replicas=world_size,
                rank=rank,
                shuffle=True,
                seed=seed,
                drop_last=True,
            )
        else:
            inner = common.val_shard(len(samples), rank=rank, world_size=world_size)
            self.steps = math.ceil(len(inner) / batch_size)
        self.sampler = EpochTaggedSampler(inner)
        self.num_samples = self.steps * batch_size if train else len(inner)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            drop_last=train,
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch if num_workers > 0 else None,
            # The loader draws its workers' base seed from this, not from the global RNG.
            generator=torch.Generator().manual_seed(common.derived_seed(seed, rank)),
        )

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(int(epoch))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_samples == 0:  # an empty val slice: no workers started for nothing
            return
        batches = iter(self.loader)
        try:
            if self.normalize_on_device:
                yield from _DeviceNormalizer(batches, device=self.device, dtype=self.dtype)
            else:
                for images, labels in batches:
                    yield common.to_output(
                        images, labels, device=self.device, dtype=self.dtype, layout="NCHW"
                    )
        except ImageError as e:
            self._stop_workers()
            # DataLoader re-raises a worker's error with the worker's traceback in its message;
            # the last line is ours and names the file.
            raise ImageError(str(e).strip().splitlines()[-1].removeprefix("ImageError: ")) from e
        except Exception:
            self._stop_workers()
            raise

    def _stop_workers(self) -> None:
        """After an error, stop the persistent workers now, in this process.

        Left alone, they are stopped by the iterator's ``__del__`` whenever it is collected,
        which may happen in a process forked later (a new loader's worker) and fails there.
        """
        iterator = getattr(self.loader, "_iterator", None)  # where DataLoader keeps them
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None


class _DeviceNormalizer:
    """uint8 HWC batches -> normalized channels_last batches on the device, one batch ahead.

    On CUDA the copy and normalization of batch k+1 run on a side stream while the caller
    works on batch k; the caller's stream waits for it before using the batch.
    """

    def __init__(self, batches, *, device: torch.device, dtype: torch.dtype):
        self.batches = batches
        self.device = device
        self.dtype = dtype
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor([m * 255 for m in common.IMAGENET_MEAN], device=device)
        self.mean = self.mean.view(shape)
        self.inv_std = 1.0 / torch.tensor([s * 255 for s in common.IMAGENET_STD], device=device)
        self.inv_std = self.inv_std.view(shape)
        if self.stream is not None:  # mean and inv_std come from the current stream
            self.stream.wait_stream(torch.cuda.current_stream(device))
        self.next = self._prepare()

    def _prepare(self):
        try:
            images, labels = next(self.batches)
        except StopIteration:
            return None
        if self.stream is None:
            return self._normalize(images, labels)
        with torch.cuda.stream(self.stream):
            return self._normalize(images, labels)

    def _normalize(self, images, labels):
        images, labels = common.to_output(
            images, labels, device=self.device, dtype=torch.uint8, layout="NHWC"
        )
        images = ((images.float() - self.mean) * self.inv_std).to(self.dtype)
        return images.contiguous(memory_format=torch.channels_last), labels

    def __iter__(self):
        return self

    def __next__(self):
        if self.next is None:
            raise StopIteration
        images, labels = self.next
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            # The caching allocator must not reuse these buffers before the caller is done.
            images.record_stream(current)
            labels.record_stream(current)
        self.next = self._prepare()
        return images, labels
