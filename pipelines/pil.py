"""The baseline: torchvision's standard recipe, PIL transforms + a DataLoader.

Same semantics as the DALI loader: same steps per rank in training, every validation image
exactly once across ranks, the same output contract. Three choices beyond the textbook recipe:

- The order is ``common.ShardedLoader``'s plan, the one the DALI loader reads: the same global
  permutation per epoch, and rank r's contiguous block of it, where DistributedSampler would
  give each rank every world_size-th sample of a torch permutation. Same steps and the same
  disjoint shards either way; this way both backends read the same images in the same order.

- Augmentation randomness is seeded per sample from (seed, rank, epoch, index), inside a
  forked RNG. So it repeats per seed whatever the worker count, resumes exactly at epoch k,
  differs per rank, and never touches the caller's global RNG (which num_workers=0 would).
  The sampler tags each index with the epoch, so persistent workers see the current epoch.
- Validation uses a contiguous exactly-once shard (DistributedSampler pads with duplicates or
  drops the tail).

Backend "pil-gpu" is the strong PyTorch baseline (NVIDIA's and timm's prefetchers): workers do
the PIL crop/flip only and collate uint8 HWC; the float conversion and normalization run on
the device on a side stream, one batch ahead.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import multiprocessing.forkserver
import os
import re
import select
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import common, forkserver_signals, heap, s3
from .lists import FetchError, ImageError, SampleTable
from .shards import ShardTable
from .torchvision_import import torchvision

T = torchvision.transforms


def train_transform(
    image_size: int, *, normalize: bool = True, auto_augment: str = "none"
) -> T.Compose:
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
    if auto_augment != "none":
        steps.append(auto_augment_transform(auto_augment))
    return T.Compose(steps + _tensor_steps(normalize))


def auto_augment_transform(policy: str):
    """torchvision's automatic augmentations, with the settings the DALI pipeline mirrors."""
    if policy == "auto":
        return T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)
    if policy == "rand":
        return T.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31)
    if policy == "trivial":
        return T.TrivialAugmentWide(num_magnitude_bins=31)
    raise ValueError(f"auto_augment must be one of {common.AUTO_AUGMENT}, got {policy!r}")


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


def worker_context():
    """How DataLoader workers start: forked from a forkserver, never from the rank itself.

    By the time its workers start, a rank process runs threads (gloo's or NCCL's, DALI's, the
    last loader's queue feeders), and ``fork`` copies whatever lock one of them holds at that
    moment into a child that has no thread to release it: a worker that needs that lock
    waits forever, and its rank with it until ``--dist-timeout`` (the likely cause of two
    stalls seen under torchrun). A fork also copies the rank's signal handlers, and objects
    that the worker's garbage collector may then destroy (a DALI pipeline, another loader's
    workers). The forkserver is a single-threaded process started once per rank with this
    module (so torch, torchvision and PIL) imported, so a worker starts from it about as fast
    as by a fork; neither runs the main script again (``main_module_hidden``). Python 3.14
    made it the default start method on Linux for the same reasons.
    """
    context = multiprocessing.get_context("forkserver")
    # SIGTERM blocked first (pipelines.forkserver_signals), before any thread can start.
    context.set_forkserver_preload(["pipelines.forkserver_signals", __name__])
    with main_module_hidden():
        multiprocessing.forkserver.ensure_running()  # it imports now, while the rank goes on
    return context


@contextlib.contextmanager
def main_module_hidden() -> Iterator[None]:
    """Around starting workers: the main module looks like an interactive session's.

    Else the forkserver and every worker run the main script (or ``-m`` module) again, as
    under ``spawn``: a script without the ``if __name__ == "__main__":`` guard would start
    its work over in each, and ``python - < train.py`` gives the path ``<stdin>``, which
    cannot be read there. They need nothing from it: the dataset and its transforms are this
    module's.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    with _MAIN_HIDDEN_LOCK:  # else a second thread could save, and restore, the hidden values
        file_path, spec = getattr(main, "__file__", None), getattr(main, "__spec__", None)
        if file_path is not None:
            del main.__file__
        main.__spec__ = None
        try:
            yield
        finally:
            if file_path is not None:
                main.__file__ = file_path
            main.__spec__ = spec


_MAIN_HIDDEN_LOCK = threading.Lock()


AWS_PREFIX = "AWS_"  # the standard variables boto3 reads (pipelines.s3)


def bind_to_rank(rank_pid: int, aws_env: dict[str, str], _worker_id: int) -> None:
    """A worker's first act (``worker_init_fn``): it lives and ends with its rank.

    - It reads buckets as its rank does: the rank's AWS variables when the loader was built
      (credentials, endpoint, region) replace those of the forkserver, which copied its
      environment when it started, maybe before the rank set them.
    - It ends when the rank ends. DataLoader's own check (is my parent still the process that
      started me?) cannot see the rank from a forkserver worker, whose parent is the server,
      and the server lives as long as any worker does: a rank killed (torchrun ending a
      failed job, SIGKILL, the OOM killer) would leave both running forever, holding memory
      and the launcher's output pipes.
    - It outlives a stop signal meant for the rank. Ctrl-C reaches the terminal's whole
      process group and a scheduler's preemption every process of the job, but the rank
      saves at a step boundary, up to two batches later (``trainer.preemption``): a worker
      ignores SIGINT, and SIGTERM from anyone but its rank (DataLoader's ``terminate()``,
      which must still end it, or the rank's exit would wait on it forever).
    """
    for name in [k for k in os.environ if k.startswith(AWS_PREFIX)]:
        os.environ.pop(name)
    os.environ.update(aws_env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watchers = [_exit_when_gone]
    if hasattr(signal, "sigwaitinfo"):  # not on macOS, where any SIGTERM ends a worker
        # Blocked here, so in every thread started from now on: only the thread below takes it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        watchers.append(_exit_on_sigterm_from)
    for target in watchers:
        threading.Thread(target=target, args=(rank_pid,), daemon=True).start()


def _exit_when_gone(pid: int) -> None:
    try:
        handle = os.pidfd_open(pid)  # readable once the process has ended (Linux >= 5.3)
    except (AttributeError, OSError):  # an older kernel, or the rank is gone already
        handle = None
    if handle is not None:
        select.select([handle], [], [])
    else:
        while True:
            try:
                os.kill(pid, 0)
            except OSError:  # gone (or its pid reused by another user's process)
                break
            time.sleep(1.0)
    os._exit(0)


def _exit_on_sigterm_from(pid: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != pid:
        pass  # someone else's: the rank decides when its workers end
    os._exit(128 + signal.SIGTERM)


def _shared_array(array: np.ndarray) -> torch.Tensor:
    """``array`` copied into shared memory, as a tensor (torch's pickler sends its handle)."""
    shared = torch.empty(array.shape, dtype=torch.from_numpy(array[:0].copy()).dtype)
    shared.share_memory_()
    shared.numpy()[...] = array
    return shared


def _to_uint8_hwc(image) -> torch.Tensor:
    # HWC uint8, a quarter of float32's bytes through the worker queue and the copy.
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())


class ListDataset(Dataset):
    """Samples of a list file; ``dataset[(index, epoch, size)]`` -> (image tensor, label).

    ``make_transform(size)`` builds the transform for a crop side; the size travels with each
    index (like the epoch), so persistent workers follow a progressive resize.
    """

    def __init__(self, table: SampleTable, *, make_transform, random: bool, seed: int, rank: int):
        self.table = table
        self.make_transform = make_transform
        self.transforms: dict[int, T.Compose] = {}
        self.random = random
        self.seed = seed
        self.rank = rank

    def __getstate__(self) -> dict:
        # Pickled once per worker (workers start from a forkserver, see worker_context): the
        # table's arrays go as one shared-memory copy that every worker maps, instead of a
        # copy each (about 100 MB per worker for ImageNet's 1.28M-line list).
        if not hasattr(self, "_shared_table"):
            table = self.table
            if isinstance(table, ShardTable):  # a shard set: its arrays, and its few names
                meta = (table.folder, table.shard_names, table.ext_names, table.origin, table.keys)
                self._shared_table = (meta, tuple(_shared_array(a) for a in table.arrays()))
            else:
                arrays = (table.blob, table.offsets, table.labels)
                self._shared_table = (None, tuple(_shared_array(a) for a in arrays))
        state = {k: v for k, v in self.__dict__.items() if k != "_shared_table"}
        state.update(table=self._shared_table, transforms={})
        return state

    def __setstate__(self, state: dict) -> None:
        meta, shared = state["table"]
        arrays = [t.numpy() for t in shared]
        if meta:
            state["table"] = ShardTable(*meta[:3], *arrays, origin=meta[3], keys=meta[4])
        else:
            state["table"] = SampleTable(*arrays)
        self.__dict__.update(state)

    def transform(self, image, size: int):
        if size not in self.transforms:
            self.transforms[size] = self.make_transform(size)
        return self.transforms[size](image)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: tuple[int, int, int]):
        index, epoch, size = key
        path, label = self.table.path(index), int(self.table.labels[index])
        try:
            image = common.open_rgb(self.table.source(index))  # a shard's sample: its bytes
        except s3.S3Error as e:  # an object it could not fetch: already one line naming it
            raise FetchError(str(e)) from e
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ...: name the file
            raise ImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
        if not self.random:
            return self.transform(image, size), label
        # The CPU generator only (torch.manual_seed would reseed CUDA's too, which fork_rng
        # with devices=[] does not restore).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(
                common.derived_seed(self.seed, self.rank, epoch, index)
            )
            return self.transform(image, size), label


class PassSampler(Sampler):
    """Yields ``(index, epoch)`` for the loader's current pass, so workers know the epoch."""

    def __init__(self, loader: common.ShardedLoader):
        # A weak reference: the loader holds the DataLoader, which holds this sampler. A
        # cycle would leave a dropped loader to the garbage collector, whose delayed
        # collection shuts the persistent workers down at some later moment, maybe in
        # another process forked meanwhile (see PilLoader._stop_workers).
        self.loader = weakref.ref(loader)
        self.num_samples = loader.num_samples

    def __iter__(self):
        loader = self.loader()
        epoch, size = loader.epoch, loader.image_size
        return ((i, epoch, size) for i in loader.pass_indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


class PilLoader(common.ShardedLoader):
    """Iterable of ``(images, labels)`` for one rank; see ``pipelines.build_loader``."""

    def __init__(
        self,
        table: SampleTable,
        *,
        num_workers: int,
        normalize_on_device: bool = False,
        **shared,
    ):
        super().__init__(table, **shared)
        self.normalize_on_device = normalize_on_device
        # Partials of module functions, not closures: a dataset must pickle for workers
        # started by spawn.
        if self.train:
            make = functools.partial(
                train_transform,
                normalize=not normalize_on_device,
                auto_augment=self.auto_augment,
            )
        else:
            make = functools.partial(val_transform, normalize=not normalize_on_device)
        dataset = ListDataset(
            table,
            make_transform=make,
            random=self.train,
            seed=self.seed,
            rank=self.rank,
        )
        self.loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            # Every pass yields num_samples indices: whole batches in training, the shard
            # with a short last batch in validation.
            sampler=PassSampler(self),
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
            persistent_workers=num_workers > 0,
            prefetch_factor=self.prefetch if num_workers > 0 else None,
            multiprocessing_context=worker_context() if num_workers > 0 else None,
            worker_init_fn=functools.partial(
                bind_to_rank,
                os.getpid(),
                {k: v for k, v in os.environ.items() if k.startswith(AWS_PREFIX)},
            ),
            # The loader draws its workers' base seed from this, not from the global RNG.
            generator=torch.Generator().manual_seed(common.derived_seed(self.seed, self.rank)),
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_samples == 0 or self.start_step >= self.steps:  # nothing to read
            self.start_step = 0
            return
        # Augmentation is seeded per sample: where the pass starts is all a resume needs.
        with main_module_hidden():  # workers start here, on a first pass
            batches = iter(self.loader)  # the sampler takes this pass's indices now
        self.start_step, self.resume_state = 0, None
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
            last = str(e).strip().splitlines()[-1]
            fetch = re.match(r"^([\w.]+\.)?FetchError: ", last)  # the bucket's fault, kept so
            kind = FetchError if fetch or isinstance(e, FetchError) else ImageError
            raise kind(re.sub(r"^([\w.]+\.)?(Image|Fetch)Error: ", "", last)) from e
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


# The workers' forkserver imports this module last (worker_context): what its imports made is
# frozen now (pipelines/heap.py), so a worker's garbage collections never write to those
# objects, whose memory pages then stay shared with the server instead of being copied into
# each worker, and the server's own exit skips walking them (0.95 s -> 0.35 s here).
if forkserver_signals.in_forkserver():
    heap.freeze_startup_objects()
