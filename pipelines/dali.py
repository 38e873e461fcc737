"""DALI train/val pipelines and the loader that runs them, one pipeline per rank.

GPU: JPEG decode on the GPU (``mixed``: nvJPEG and the A100+ hardware decoder) or on the CPU
with the augmentation on the GPU (``dali_decode="cpu"``). No GPU: the same graph with CPU
operators and ``device_id=None``. Only the device differs, never the logic.

Decisions, with what DALI 2.4 does that led to them:

- Reading: ``fn.external_source`` feeds each batch's paths (uint8 views into the loader's
  ``SampleTable``, no copies) and labels, and ``fn.io.file.read`` reads the files; the decode
  graph after it is a reader's. ``fn.readers.file`` would need the whole list as a Python
  ``files=`` list at every build: for ImageNet's 1.28M files that cost 4-6 s at every epoch
  start (the pipeline is rebuilt per epoch, below) and took a rank to 2.4 GB of host memory
  (``benchmarks/imagenet_scale.py``); fed batch by batch, a build takes 30 ms whatever the
  list's length, and reads as fast (1146-1224 against 1003-1114 img/s on the demo list,
  224 px, 2 threads).
- Train order: ``common.ShardedLoader``'s plan, our own global permutation per epoch,
  identical on all ranks, rank r reading its r-th block. DALI's ``random_shuffle`` shuffles
  only within a buffer and per shard, and ``shuffle_after_epoch`` resumes at epoch k only
  through DALI's checkpoints; our order can be rebuilt by any run from (seed, epoch). The
  pipeline is rebuilt for every training pass, seeded from (seed, rank, epoch), so a run
  resumed at epoch k draws the augmentation the uninterrupted run drew.
- Val: each rank's contiguous ``val_shard`` in list order, fed as whole batches and a short
  last one (DALI takes any batch up to the pipeline's ``batch_size``): every image exactly
  once, and a rank with an empty shard yields nothing.
- Hand-off: ``DALIGenericIterator``. With the dynamic executor (DALI's default since 2.0, set
  explicitly here) it hands outputs over by DLPack without a copy, and every output batch is a
  separately allocated, reference-counted buffer: a batch stays valid while torch holds it,
  even after later batches are produced or the pipeline is destroyed (tested). On a GPU that
  is not enough: ``DeviceHandoff`` below says why, and what the loader does about it.
- Errors: DALI names the file when ``io.file.read`` cannot open it, but the decoders, fed
  bytes rather than files, name no file at all ("nvImageCodec failure: '#4'"). Then the
  loader looks for the culprit among the files of the batches in flight (PIL full decode and
  a format check) and raises an ImageError (a RuntimeError) naming it, chained to DALI's.
"""

from __future__ import annotations

import collections
import itertools
import traceback
import warnings
from collections.abc import Iterator

import numpy as np
import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from . import common, s3
from .imagecheck import first_problem
from .lists import FetchError, ImageError, SampleTable
from .shards import ShardTable

# DALI 2.4 has no BFLOAT16 (types.DALIDataType lists FLOAT, FLOAT16, ...), so a bfloat16
# batch is emitted in another float type and cast in torch. On the GPU: FLOAT16, half of
# FLOAT's bytes, and its 11-bit mantissa is finer than bf16's 8, so the cast loses nothing. On
# the CPU: FLOAT, because torch's float32->bfloat16 cast runs twice as fast there as
# float16->bfloat16 (11 vs 21 ms for a 64x224x224 batch on one core here), and that cast is on
# the critical path of a CPU-mode run.
_DALI_DTYPE = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16}


def dali_output_dtype(dtype: torch.dtype, device: torch.device):
    if dtype is torch.bfloat16:
        return types.FLOAT16 if device.type == "cuda" else types.FLOAT
    return _DALI_DTYPE[dtype]


# nvJPEG's own defaults (DALI 2.4) for the two paddings below, used where we set none.
DALI_DEVICE_MEMORY_PADDING = 16 << 20
DALI_HOST_MEMORY_PADDING = 8 << 20

# GPU decoder knobs of the train pipeline (mixed decode only).
MIXED_DECODER_DEFAULTS = {
    # Share of the JPEGs sent to the hardware decoder (A100 and newer), the rest to the CUDA
    # decoder. While training saturates the SMs every CUDA-decoded image costs training time:
    # on an H100 (resnet50, bf16, batch 256, 8 threads) 0.99 gave 3,896 img/s end to end
    # against 3,694 at DALI's default 0.65 (ceiling 3,969).
    "hw_decoder_load": 0.99,
    # nvJPEG's device buffer, ONE PER THREAD, sized for the largest ImageNet image so that it
    # never regrows (a regrowth is a cudaMalloc, which synchronizes the device): 201 MiB x 8
    # threads = 1.6 GiB of an 80 GB GPU, kept because a sync mid-epoch stalls training.
    "device_memory_padding": 211025920,
    # nvJPEG's pinned host buffers: TWO PER THREAD (double-buffered), used by the images
    # that go to the CUDA decoder, about 1 in 100 at the load above. NVIDIA's example sizes
    # them like the device buffer (134 MiB x 2 x 8 threads = 2.1 GiB of pinned memory per
    # rank, 17 GiB on an 8-GPU node); 8 MiB (nvJPEG's default) holds the Huffman output of
    # images up to about 2.8 MP, which nearly every ImageNet image is under, and the rare
    # larger one regrows a buffer once: 8 MiB x 2 x 8 threads = 128 MiB per rank.
    "host_memory_padding": DALI_HOST_MEMORY_PADDING,
    # Largest ImageNet image (width, height): preallocates the hardware decoder's buffers
    # once (A100 and newer; ignored elsewhere), for batch_size such images at a time (DALI
    # passes its batch size to nvJPEG's nvjpegDecodeBatchedPreAllocate with these hints).
    "preallocate_width_hint": 5980,
    "preallocate_height_hint": 6430,
}

# The val pipeline decodes each val image once per epoch while the model only evaluates, so
# a buffer regrowth there stalls nothing: no paddings or hints of ours (nvJPEG's defaults),
# so that the val pipeline, alive all run long, holds no training-sized buffers.
MIXED_VAL_DECODER_DEFAULTS = {
    "hw_decoder_load": MIXED_DECODER_DEFAULTS["hw_decoder_load"],
    # Upsample chroma as libjpeg-turbo (DALI's CPU decoder and PIL) does, so GPU validation
    # tensors match the CPU ones more closely; it may cost some decode speed.
    "jpeg_fancy_upsampling": True,
}


def decoder_memory_estimate(
    num_threads: int, train: bool, overrides: dict | None = None, *, decode: str = "mixed"
) -> dict[str, int]:
    """Bytes the decoder preallocates per rank: ``pinned_host_bytes`` and ``device_bytes``.

    nvJPEG's paddings only: two pinned host buffers and one device buffer per thread. With
    the defaults and 8 threads: train 128 MiB pinned + 1.57 GiB device, val 128 MiB pinned +
    128 MiB device, so 256 MiB pinned per rank with both loaders alive (2.3 GiB with the old
    134 MiB host padding). Not counted: the hardware decoder's buffers, preallocated for a
    whole batch of images of the hint's size (DALI 2.x hands nvImageCodec the pipeline's
    batch size as ``preallocate_batch_size`` next to the two hints), and what nvJPEG
    allocates beyond the paddings on demand.
    CPU decode preallocates none of these.
    """
    if decode != "mixed":
        return {"pinned_host_bytes": 0, "device_bytes": 0}
    options = decoder_options("mixed", overrides, train=train)
    host = options.get("host_memory_padding", DALI_HOST_MEMORY_PADDING)
    device = options.get("device_memory_padding", DALI_DEVICE_MEMORY_PADDING)
    return {"pinned_host_bytes": 2 * host * num_threads, "device_bytes": device * num_threads}


def _normalize_args(*, image_size: int, image_dtype) -> dict:
    # Mean/std scaled to 0-255 because the decoder emits uint8; HWC so that the torch side can
    # view the batch as channels_last NCHW without a copy.
    return dict(
        dtype=image_dtype,
        output_layout="HWC",
        crop=(image_size, image_size),
        mean=[m * 255 for m in common.IMAGENET_MEAN],
        std=[s * 255 for s in common.IMAGENET_STD],
    )


def read_batches(source, *, cycle: str | None = None):
    """``(encoded files, labels)`` of the batches ``source`` yields: each batch a list of
    uint8 arrays and an int64 label array. The arrays are paths, read by ``fn.io.file.read``,
    or (``source.reads_files`` False: a tar shard's samples) the encoded images themselves."""
    data, labels = fn.external_source(
        source=source,
        num_outputs=2,
        batch=True,
        dtype=[types.UINT8, types.INT64],
        cycle=cycle,
    )
    return (fn.io.file.read(data) if getattr(source, "reads_files", True) else data), labels


def _train_graph(
    *,
    source,
    image_size: int,
    decode_device: str,
    to_gpu: bool,
    image_dtype,
    decoder_options: dict,
    auto_augment: str = "none",
):
    """Read the batches of ``source``; decode a random crop; resize; [auto-augment];
    flip+normalize."""
    jpegs, labels = read_batches(source)
    # ROI decode fused with RandomResizedCrop's window choice: only the crop is decoded.
    images = fn.decoders.image_random_crop(
        jpegs,
        device=decode_device,
        output_type=types.RGB,
        random_area=list(common.TRAIN_AREA),
        random_aspect_ratio=list(common.TRAIN_ASPECT_RATIO),
        # NVIDIA's example value; torchvision tries 10 windows before its fallback crop, and
        # more tries make DALI's fallback rarer still.
        num_attempts=100,
        **decoder_options,
    )
    if to_gpu and decode_device == "cpu":
        images = images.gpu()  # CPU decode, GPU augmentation
    images = fn.resize(
        images,
        resize_x=image_size,
        resize_y=image_size,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    if auto_augment != "none":
        images = apply_auto_augment(images, policy=auto_augment, image_size=image_size)
    images = fn.crop_mirror_normalize(
        images,
        mirror=fn.random.coin_flip(probability=0.5),
        **_normalize_args(image_size=image_size, image_dtype=image_dtype),
    )
    if to_gpu:
        labels = labels.gpu()
    return images, labels


# DALI's automatic augmentations branch per sample (conditionals), which a pipeline must
# enable when it is defined; the plain graph keeps them off.
train_pipeline = pipeline_def(enable_conditionals=False)(_train_graph)
train_pipeline_auto_augment = pipeline_def(enable_conditionals=True)(_train_graph)


def apply_auto_augment(images, *, policy: str, image_size: int):
    """DALI's versions of torchvision's AutoAugment (ImageNet policy), RandAugment (2 ops,
    magnitude 9 of 31 bins) and TrivialAugmentWide (31 bins), as the PIL pipeline applies
    them: same policies, magnitudes and bins, and black (0) fill like torchvision's."""
    from nvidia.dali.auto_aug import auto_augment, rand_augment, trivial_augment

    shape = [image_size, image_size]
    if policy == "auto":
        return auto_augment.auto_augment_image_net(images, shape=shape, fill_value=0)
    if policy == "rand":
        return rand_augment.rand_augment(
            images, n=2, m=9, num_magnitude_bins=31, shape=shape, fill_value=0
        )
    if policy == "trivial":
        return trivial_augment.trivial_augment_wide(
            images, num_magnitude_bins=31, shape=shape, fill_value=0
        )
    raise ValueError(f"auto_augment must be one of {common.AUTO_AUGMENT}, got {policy!r}")


def torchvision_val_geometry(images, *, image_size: int):
    """Per-sample resize size and center-crop position that match torchvision exactly.

    ``Resize(S)`` makes the shorter side S and the longer ``int(S * long / short)`` (DALI's
    ``resize_shorter`` rounds it instead and keeps a fractional scale), and ``CenterCrop``
    starts at ``round((L - crop) / 2)`` with Python's round-half-to-even (DALI's ``crop_pos``
    rounds halves up). Each is one pixel at most, but a one-pixel shift is a visible
    difference, so the val recipe computes torchvision's numbers with integer arithmetic on
    the decoded shape (a few scalar CPU ops per image). With them DALI and PIL agree to within
    one grey level per pixel (tests/test_pipelines.py).
    """
    # HWC, int64, on the CPU even for GPU images: the dynamic executor allows it, and DALI's
    # docs prefer it to peeking at the encoded header (fn.peek_image_shape).
    shape = images.shape(device="cpu")
    height, width = shape[0], shape[1]
    shorter = dmath.min(height, width)
    side = common.val_resize_size(image_size)
    out_height = (side * height) // shorter
    out_width = (side * width) // shorter

    def crop_pos(length):
        slack = length - image_size  # >= 0: the shorter side is side >= image_size
        half = slack // 2
        start = half + (slack & 1) * (half & 1)  # (slack / 2) rounded half to even
        # crop_pos * slack is start up to float error; rounding="round" lands on start.
        return start / dmath.max(slack, 1)

    return (
        fn.cast(out_width, dtype=types.FLOAT),
        fn.cast(out_height, dtype=types.FLOAT),
        crop_pos(out_width),
        crop_pos(out_height),
    )


@pipeline_def(enable_conditionals=False)
def val_pipeline(
    *,
    source,
    image_size: int,
    decode_device: str,
    to_gpu: bool,
    image_dtype,
    decoder_options: dict,
):
    """Read the batches of ``source`` (again on every pass); decode; resize; center crop."""
    jpegs, labels = read_batches(source, cycle="raise")
    images = fn.decoders.image(
        jpegs, device=decode_device, output_type=types.RGB, **decoder_options
    )
    if to_gpu and decode_device == "cpu":
        images = images.gpu()
    resize_x, resize_y, crop_pos_x, crop_pos_y = torchvision_val_geometry(
        images, image_size=image_size
    )
    # The shorter side to image_size / 0.875, the longer in proportion (torchvision's sizes).
    images = fn.resize(
        images,
        resize_x=resize_x,
        resize_y=resize_y,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    images = fn.crop_mirror_normalize(
        images,
        crop_pos_x=crop_pos_x,
        crop_pos_y=crop_pos_y,
        rounding="round",
        **_normalize_args(image_size=image_size, image_dtype=image_dtype),
    )
    if to_gpu:
        labels = labels.gpu()
    return images, labels


def resolve_decode(dali_decode: str, device: torch.device) -> str:
    """'mixed' (GPU decode) or 'cpu'; 'auto' picks mixed on CUDA, cpu otherwise."""
    if dali_decode == "auto":
        return "mixed" if device.type == "cuda" else "cpu"
    if dali_decode not in ("mixed", "cpu"):
        raise ValueError(f"dali_decode must be 'auto', 'mixed' or 'cpu', got {dali_decode!r}")
    if dali_decode == "mixed" and device.type != "cuda":
        raise ValueError("dali_decode='mixed' decodes on the GPU: it needs a CUDA device")
    return dali_decode


def decoder_options(decode_device: str, overrides: dict | None, *, train: bool) -> dict:
    """Decoder arguments: the GPU defaults above for mixed decode, then ``overrides``."""
    options = {}
    if decode_device == "mixed":
        options = dict(MIXED_DECODER_DEFAULTS if train else MIXED_VAL_DECODER_DEFAULTS)
    options.update(overrides or {})
    return options


class PathBatches:
    """A pass's batches for ``fn.external_source``: ``(paths, labels)`` per batch.

    ``paths`` is a list of uint8 views into the table's buffer (external_source copies them
    into the pipeline, so nothing is copied before that), ``labels`` an int64 ``(B, 1)``
    array like a reader's. Whole batches of ``batch_size``, then a shorter last one if the
    indices end there (validation). Iterable again from the start: DALI calls ``iter`` once
    per pass.
    """

    reads_files = True  # the arrays are paths for fn.io.file.read

    def __init__(self, table: SampleTable, indices: np.ndarray, batch_size: int):
        self.table = table
        self.indices = indices
        self.batch_size = batch_size

    def __iter__(self):
        blob, labels = self.table.blob, self.table.labels
        starts = self.table.offsets[self.indices]
        ends = self.table.offsets[self.indices + 1] - 1  # without the NUL
        for first in range(0, len(self.indices), self.batch_size):
            last = first + self.batch_size
            bounds = zip(starts[first:last].tolist(), ends[first:last].tolist(), strict=True)
            yield [blob[a:b] for a, b in bounds], labels[self.indices[first:last], None]


class ShardBatches(PathBatches):
    """PathBatches for a shard set (``pipelines.shards.ShardTable``): each sample is its
    image's bytes, a view of its memory-mapped shard (external_source copies it into the
    pipeline), in the same plan and batches as a list's."""

    reads_files = False

    def __iter__(self):
        labels = self.table.labels
        for first in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[first : first + self.batch_size]
            yield [np.asarray(self.table.view(int(i))) for i in chunk], labels[chunk, None]


class DeviceHandoff:
    """Turns DALI's GPU output batches into torch-owned tensors, and keeps DALI's buffers alive
    until the GPU has read them.

    Why: DALI hands a batch over by DLPack on torch's current stream (torch passes the stream
    and DALI makes it wait for the batch to be ready), but DALI gets the buffer back as soon
    as the host drops its last reference, and the host runs ahead of the GPU: the cast of
    batch k is still queued on torch's stream when the loop asks for batch k+1 and drops
    batch k. What DALI then does with that memory (reuse it on its own stream for a batch it
    is preparing, or not) is DALI's business and not a documented promise. And a batch that
    needed no cast (float16 or float32 asked for) went to the model as DALI's memory itself,
    read by the forward and backward passes long after the host let go of it.

    So, by construction, whatever DALI's allocator does:
    1. The batch handed on is always torch's own memory: the cast to ``dtype`` in
       channels_last, or a copy when DALI made that dtype already (about 0.1 ms for a
       256x224x224 batch on an H100); the labels are copied too. torch's caching allocator
       knows the stream it is used on, as for any tensor.
    2. DALI's buffers are kept, with a CUDA event recorded on the consuming stream right
       after those copies, and dropped only once the event has completed (``query``: no
       wait), so DALI gets a buffer back only after the GPU has read it.
    3. At most ``limit`` batches are held: with more (the host that far ahead of the GPU) the
       host waits for the oldest copy (``waits`` counts it), which bounds the extra device
       memory to ``limit`` batches (77 MB each for 256x224x224 in fp16) and costs no GPU
       time, since the GPU has ``limit`` batches of work queued then.
    """

    def __init__(self, limit: int = 4):
        self.limit = limit
        self.waits = 0  # times the host waited for the GPU to read the oldest held batch
        self._held: collections.deque = collections.deque()

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, *, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        nchw = images.permute(0, 3, 1, 2)  # DALI's HWC batch as an NCHW view, channels_last
        if nchw.dtype == dtype:
            out_images = nchw.clone(memory_format=torch.channels_last)
        else:
            out_images = nchw.to(dtype=dtype, memory_format=torch.channels_last)
        out_labels = labels.reshape(-1).to(torch.int64, copy=True)
        read = torch.cuda.Event()
        # On the batch's device's current stream, the one the copies above were queued on
        # (whichever device is current in this thread).
        read.record(torch.cuda.current_stream(images.device))
        self._held.append((read, images, labels))
        self.drop_read()
        return out_images, out_labels

    def __len__(self) -> int:  # batches whose DALI buffers are still held
        return len(self._held)

    def drop_read(self) -> None:
        """Gives DALI back the buffers the GPU has read; waits only beyond ``limit``."""
        while self._held:
            read = self._held[0][0]
            if len(self._held) > self.limit:
                if not read.query():
                    self.waits += 1
                    read.synchronize()
            elif not read.query():
                break
            self._held.popleft()


class DaliLoader(common.ShardedLoader):
    """Iterable of ``(images, labels)`` for one rank; see ``pipelines.build_loader``."""

    def __init__(
        self,
        table: SampleTable,
        *,
        num_threads: int,
        dali_decode: str,
        dali_options: dict | None,
        **shared,
    ):
        super().__init__(table, **shared)
        self.num_threads = num_threads
        self.decode_device = resolve_decode(dali_decode, self.device)
        self.decoder_options = decoder_options(self.decode_device, dali_options, train=self.train)
        self._iterator: DALIGenericIterator | None = None
        self._reusable = False  # a val iterator that finished a clean pass can run again
        # GPU batches: torch-owned copies, DALI's buffers held until read (kept across passes)
        self.handoff = DeviceHandoff() if self.device.type == "cuda" else None

    def _build(self, indices: np.ndarray, checkpoint: bytes | None = None) -> DALIGenericIterator:
        # Recorded, then said again below, but for two that say nothing a user can act on:
        # - that a checkpoint cannot hold an iterable source's position (DALI, at the build):
        #   ours is the pass's indices from start_step on, set before each build;
        # - DALI 2.4's auto_augment policies calling its own fn.experimental.filter and
        #   .equalize, reported as deprecated (12 lines at each --auto-augment build), under
        #   a simplefilter("default") of DALI's that no filter of ours outranks.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            # No reader and no size: a pass ends when the source does, after its last (maybe
            # short) batch, which PARTIAL hands out as it is.
            iterator = DALIGenericIterator(
                [self.pipeline(indices, checkpoint)],
                ["images", "labels"],
                last_batch_policy=LastBatchPolicy.PARTIAL,
            )
        for said in caught:
            text = str(said.message)
            if text.startswith("Checkpointing enabled in a pipeline") or (
                issubclass(said.category, DeprecationWarning)
                and text.startswith("WARNING: `nvidia.dali.fn.experimental.")
            ):
                continue
            warnings.warn_explicit(said.message, said.category, said.filename, said.lineno)
        return iterator

    def pipeline(self, indices: np.ndarray, checkpoint: bytes | None = None):
        """The DALI pipeline of one pass over ``indices``, defined but not yet built."""
        to_gpu = self.device.type == "cuda"
        pipeline = train_pipeline if self.train else val_pipeline
        graph_extra = {}
        if self.train and self.auto_augment != "none":
            pipeline = train_pipeline_auto_augment
            graph_extra["auto_augment"] = self.auto_augment
        return pipeline(
            **graph_extra,
            source=(ShardBatches if isinstance(self.table, ShardTable) else PathBatches)(
                self.table, indices, self.batch_size
            ),
            image_size=self.image_size,
            decode_device=self.decode_device,
            to_gpu=to_gpu,
            image_dtype=dali_output_dtype(self.dtype, self.device),
            decoder_options=self.decoder_options,
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device.index if to_gpu else None,
            seed=common.derived_seed(self.seed, self.rank, self.epoch),
            prefetch_queue_depth=self.prefetch,
            exec_dynamic=True,
            # Training pipelines track their random generators' state (DALI says at no cost)
            # so that a run stopped mid-epoch resumes with the same crops and flips: the
            # state after batch k (``state()``) restores into a new pipeline fed from k on.
            enable_checkpointing=self.train,
            checkpoint=checkpoint,
        )

    def graph(self) -> dict:
        # Where the JPEGs decode changes the operators (the mixed decoder, or the CPU one and
        # a copy to the GPU): DALI's saved state fits the graph that saved it only.
        return {**super().graph(), "decode": self.decode_device}

    def state(self) -> bytes | None:
        """The training pipeline's random generators after the batches handed out so far
        (DALI accounts for the ones prefetched beyond them); None outside a training pass."""
        if not self.train or self._iterator is None:
            return None
        return self._iterator.checkpoints()[0]

    def _release(self) -> None:
        # Drops the pipeline (and its decoder buffers); batches handed out stay valid.
        had_pipeline = self._iterator is not None
        self._iterator = None
        self._reusable = False
        if self.handoff is not None:
            self.handoff.drop_read()  # no wait: the rest go with later batches
        if had_pipeline:
            common.return_freed_memory()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_samples == 0:  # a val rank whose slice is empty (list shorter than world)
            return
        indices = self.pass_indices()
        checkpoint, self.start_step, self.resume_state = self.resume_state, 0, None
        if len(indices) == 0:  # resumed after the epoch's last step: nothing left to read
            return
        yielded = 0
        while True:
            try:  # only DALI's own calls: an error elsewhere is not a bad image
                if yielded == 0:
                    if not (self._reusable and self._iterator is not None):
                        self._release()
                        self._iterator = self._build(indices, checkpoint)
                    self._reusable = False
                    iter(self._iterator)  # rewinds a finished val pass; no-op when fresh
                batch = next(self._iterator)
            except StopIteration:
                break
            except RuntimeError as e:
                # After an error DALI's pipeline object is no longer valid: drop it now, here.
                # The error's traceback holds the iterator's frames, which hold the pipeline;
                # cleared, nothing keeps it (the traceback and its frames form a cycle, left
                # to the garbage collector, which may run in a forked DataLoader worker, where
                # destroying a pipeline whose threads live in the parent crashes).
                traceback.clear_frames(e.__traceback__)
                self._release()
                raise self._named_error(e, indices, yielded) from e
            out = batch[0]
            if self.handoff is not None:
                yield self.handoff(out["images"], out["labels"], dtype=self.dtype)
            else:  # CPU: DALI's own memory, zero-copy (CPU work is done when a call returns)
                yield common.to_output(
                    out["images"],
                    out["labels"],
                    device=self.device,
                    dtype=self.dtype,
                    layout="NHWC",
                )
            del batch, out  # the hand-off holds DALI's GPU buffers as long as they are read
            yielded += 1
        if self.train:
            self._release()  # the next pass is another epoch: a new pipeline, a new seed
        else:
            self._reusable = True

    def _named_error(self, error: RuntimeError, indices: np.ndarray, batches_done: int):
        try:
            return self._find_error(error, indices, batches_done)
        except s3.S3Error as exc:  # the bucket, not the image: what reading it again says
            return FetchError(str(exc))

    def _find_error(self, error: RuntimeError, indices: np.ndarray, batches_done: int):
        message = str(error)
        # The batches in flight: the pipeline runs `prefetch` batches ahead of the one being
        # handed out. Their paths first, then (only now, on an error) the whole pass's.
        first = max(0, batches_done - 1) * self.batch_size
        last = (batches_done + self.prefetch + 2) * self.batch_size
        window = [self.table.path(int(i)) for i in indices[first:last]]

        def pass_paths():  # all of this rank's files of the pass, decoded only if needed
            return (self.table.path(int(i)) for i in indices)

        def sources(chosen):  # (name, path or, for a shard's sample, its bytes)
            return ((self.table.path(int(i)), self.table.source(int(i))) for i in chosen)

        named = next((p for p in itertools.chain(window, pass_paths()) if p in message), None)
        if named is not None and s3.is_url(named) and s3.head(named) is None:
            return FetchError(f"{named}: no such object (DALI said: {_last_lines(message)})")
        if named is not None:
            return ImageError(f"{named}: DALI failed on this image: {_last_lines(message)}")
        # Not named by DALI: look among the batches in flight with a full decode, then, by
        # header only (16 bytes a file), through all of this rank's files of the pass.
        found = first_problem(sources(indices[first:last])) or first_problem(
            sources(indices), decode=False
        )
        if found is not None:
            path, why = found
            return ImageError(f"{path}: {why} (DALI said: {_last_lines(message)})")
        return ImageError(
            f"DALI failed in a batch read from files {first}.."
            f"{first + len(window) - 1} of this pass ({window[0] if window else '?'}, ...), "
            f"all of which PIL decodes: {_last_lines(message)}"
        )


def _last_lines(message: str) -> str:
    """DALI's errors put the operator and the cause around a long traceback; keep those two."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    operator = next((ln for ln in lines if ln.startswith("Error in ")), "")
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1 :]
    skip = ("Current pipeline object is no longer valid", "C++ context", "Critical error")
    cause = [ln for ln in lines if not ln.startswith(skip)]
    return " ".join([operator.rstrip(","), *cause]).strip() or message
