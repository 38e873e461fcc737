"""DALI train/val pipelines and the loader that runs them, one pipeline per rank.

GPU: JPEG decode on the GPU (``mixed``: nvJPEG and the A100+ hardware decoder) or on the CPU
with the augmentation on the GPU (``dali_decode="cpu"``). No GPU: the same graph with CPU
operators and ``device_id=None``. Only the device differs, never the logic.

Decisions, with what DALI 2.4 does that led to them:

- Train order: our own global permutation per epoch (``common.epoch_permutation``), identical
  on all ranks, truncated so that every rank's reader shard (``shard_id=rank``) holds exactly
  ``steps * batch_size`` samples. DALI's ``random_shuffle`` shuffles only within a buffer and
  per shard, and ``shuffle_after_epoch`` resumes at epoch k only through DALI's checkpoints;
  passing ``files=`` and ``labels=`` in our order gives an exact global shuffle that any run
  can rebuild from (seed, epoch). The pipeline is rebuilt
  for every training pass (cheap next to an epoch), seeded from (seed, rank, epoch).
- Val sharding is done here, not by the reader: with ``num_shards`` > samples the reader fails
  to build ("The number of input samples: 2, needs to be at least equal to the requested number
  of shards: 4"), and with ``pad_last_batch`` + ``LastBatchPolicy.PARTIAL`` the iterator gives
  the shorter shards an extra, empty batch and a ``len`` one too large. So each rank gets its
  contiguous slice (the same bounds the reader would use) as a one-shard reader with
  ``pad_last_batch=True``, and PARTIAL strips the padding: every image exactly once.
- Hand-off: ``DALIGenericIterator``. With the dynamic executor (DALI's default since 2.0, set
  explicitly here) it hands outputs over by DLPack without a copy, and every output batch is a
  separately allocated, reference-counted buffer: a batch stays valid while torch holds it,
  even after later batches are produced or the pipeline is destroyed (tested). Without the
  dynamic executor the same iterator copies into fresh torch tensors, so either way it is safe.
- Errors: DALI names the file for a truncated JPEG ("Failed to decode sample #1 : path") or a
  missing one ("File mapping failed: path"), but not for undecodable bytes or an unsupported
  format such as GIF ("nvImageCodec failure: '#4'"). Then the loader looks for the culprit among
  the files of the batches in flight (PIL full decode and a format check) and raises a
  RuntimeError naming it, chained to DALI's error.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from . import common
from .lists import ImageError, Sample

READER_NAME = "Reader"

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


# GPU decoder knobs, as NVIDIA's ResNet50 DALI example sets them (mixed decode only).
MIXED_DECODER_DEFAULTS = {
    # nvJPEG device buffer preallocated per thread, sized for the largest ImageNet image, so it
    # never regrows (a regrowth is a cudaMalloc, which synchronizes the device).
    "device_memory_padding": 211025920,
    # The same for nvJPEG's pinned host buffers (two per thread, double-buffered).
    "host_memory_padding": 140544512,
    # Largest ImageNet image (width, height): preallocates the hardware JPEG decoder's buffers
    # (A100 and newer; ignored elsewhere).
    "preallocate_width_hint": 5980,
    "preallocate_height_hint": 6430,
    # Share of the JPEGs sent to the hardware decoder, the rest to the CUDA/hybrid decoder;
    # the best split depends on the GPU and the thread count: measure it.
    "hw_decoder_load": 0.65,
}


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


@pipeline_def(enable_conditionals=False)
def train_pipeline(
    *,
    files: list[str],
    labels: list[int],
    shard_id: int,
    num_shards: int,
    image_size: int,
    decode_device: str,
    to_gpu: bool,
    image_dtype,
    decoder_options: dict,
):
    """Read this rank's shard in the given order; decode a random crop; resize; flip+normalize."""
    jpegs, labels = fn.readers.file(
        files=files,
        labels=labels,
        shard_id=shard_id,
        num_shards=num_shards,
        random_shuffle=False,  # the order is ours (a global per-epoch permutation)
        stick_to_shard=True,  # read-ahead past the epoch's end stays in this rank's files
        name=READER_NAME,
    )
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
    images = fn.crop_mirror_normalize(
        images,
        mirror=fn.random.coin_flip(probability=0.5),
        **_normalize_args(image_size=image_size, image_dtype=image_dtype),
    )
    if to_gpu:
        labels = labels.gpu()
    return images, labels


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
    files: list[str],
    labels: list[int],
    image_size: int,
    decode_device: str,
    to_gpu: bool,
    image_dtype,
    decoder_options: dict,
):
    """Read this rank's slice in list order; decode; resize shorter side; center crop."""
    jpegs, labels = fn.readers.file(
        files=files,
        labels=labels,
        random_shuffle=False,
        pad_last_batch=True,  # repeat the last sample to fill a batch; the iterator strips it
        name=READER_NAME,
    )
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
    options = dict(MIXED_DECODER_DEFAULTS) if decode_device == "mixed" else {}
    if decode_device == "mixed" and not train:
        # Val: upsample chroma as libjpeg-turbo (DALI's CPU decoder and PIL) does, so GPU
        # validation tensors match the CPU ones more closely; it may cost some decode speed.
        options["jpeg_fancy_upsampling"] = True
    options.update(overrides or {})
    return options


# Magic numbers of the formats DALI's decoders read (JPEG, PNG, BMP, TIFF, JPEG 2000, PNM,
# WebP): a file PIL decodes but DALI cannot (GIF, for one) is found by its header.
def _dali_readable_header(head: bytes) -> bool:
    return (
        head.startswith(b"\xff\xd8\xff")
        or head.startswith(b"\x89PNG\r\n\x1a\n")
        or head.startswith(b"BM")
        or head[:4] in (b"II*\x00", b"MM\x00*")
        or head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n")
        or head.startswith(b"\xff\x4f\xff\x51")
        or (len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"123456")
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    )


def _header_problem(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not _dali_readable_header(head):
        return "is not in a format DALI decodes (JPEG, PNG, BMP, TIFF, JPEG 2000, PNM, WebP)"
    return None


def find_unreadable(paths: list[str], *, decode: bool = True) -> tuple[str, str] | None:
    """The first path DALI cannot decode and why: a header check, then a full PIL decode."""
    for path in paths:
        problem = _header_problem(path)
        if problem is None and decode:
            try:
                common.open_rgb(path)
            except Exception as e:  # any decoder failure names the file; the cause is kept
                problem = f"cannot be decoded ({type(e).__name__}: {e})"
        if problem is not None:
            return path, problem
    return None


class DaliLoader:
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
        num_threads: int,
        seed: int,
        dtype: torch.dtype,
        dali_decode: str,
        prefetch: int,
        dali_options: dict | None,
    ):
        self.list_file = list_file
        self.train = train
        self.batch_size = batch_size
        self.image_size = image_size
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.num_threads = num_threads
        self.seed = seed
        self.dtype = dtype
        self.prefetch = prefetch
        self.decode_device = resolve_decode(dali_decode, device)
        self.decoder_options = decoder_options(self.decode_device, dali_options, train=train)
        self.dataset_size = len(samples)
        self._files = [s.path for s in samples]
        self._labels = [s.label for s in samples]
        self.epoch = 0
        if train:
            self.steps = common.train_steps(
                len(samples), world_size=world_size, batch_size=batch_size, list_file=list_file
            )
            self.num_samples = self.steps * batch_size
            self._val_slice = None
        else:
            self._val_slice = common.val_shard(len(samples), rank=rank, world_size=world_size)
            self.num_samples = len(self._val_slice)
            self.steps = math.ceil(self.num_samples / batch_size)
        self._iterator: DALIGenericIterator | None = None
        self._reusable = False  # a val iterator that finished a clean pass can run again

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # --- the files this rank reads in the current pass, in order -------------------------
    def _pass_order(self) -> tuple[list[str], list[int], list[str]]:
        """(files and labels given to the reader, the files this rank reads, in order)."""
        if self.train:
            order = common.epoch_permutation(self.dataset_size, seed=self.seed, epoch=self.epoch)
            order = order[: self.world_size * self.num_samples]
            files = [self._files[i] for i in order]
            labels = [self._labels[i] for i in order]
            start = self.rank * self.num_samples
            return files, labels, files[start : start + self.num_samples]
        files = [self._files[i] for i in self._val_slice]
        labels = [self._labels[i] for i in self._val_slice]
        return files, labels, files

    def _build(self, files: list[str], labels: list[int]) -> DALIGenericIterator:
        to_gpu = self.device.type == "cuda"
        pipeline_args = dict(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device.index if to_gpu else None,
            seed=common.derived_seed(self.seed, self.rank, self.epoch),
            prefetch_queue_depth=self.prefetch,
            exec_dynamic=True,
        )
        graph_args = dict(
            files=files,
            labels=labels,
            image_size=self.image_size,
            decode_device=self.decode_device,
            to_gpu=to_gpu,
            image_dtype=dali_output_dtype(self.dtype, self.device),
            decoder_options=self.decoder_options,
        )
        if self.train:
            pipe = train_pipeline(
                shard_id=self.rank, num_shards=self.world_size, **graph_args, **pipeline_args
            )
            policy = LastBatchPolicy.DROP  # shards are whole batches: nothing is dropped
        else:
            pipe = val_pipeline(**graph_args, **pipeline_args)
            policy = LastBatchPolicy.PARTIAL  # with pad_last_batch: padding is stripped
        return DALIGenericIterator(
            [pipe], ["images", "labels"], reader_name=READER_NAME, last_batch_policy=policy
        )

    def _release(self) -> None:
        # Drops the pipeline (and its decoder buffers); batches handed out stay valid.
        self._iterator = None
        self._reusable = False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_samples == 0:  # a val rank whose slice is empty (list shorter than world)
            return
        files, labels, rank_files = self._pass_order()
        yielded = 0
        while True:
            try:  # only DALI's own calls: an error elsewhere is not a bad image
                if yielded == 0:
                    if not (self._reusable and self._iterator is not None):
                        self._release()
                        self._iterator = self._build(files, labels)
                    self._reusable = False
                    iter(self._iterator)  # rewinds a finished val pass; no-op when fresh
                batch = next(self._iterator)
            except StopIteration:
                break
            except RuntimeError as e:
                self._release()  # after an error DALI's pipeline object is no longer valid
                raise self._named_error(e, rank_files, yielded) from e
            out = batch[0]
            yield common.to_output(
                out["images"], out["labels"], device=self.device, dtype=self.dtype, layout="NHWC"
            )
            yielded += 1
        if self.train:
            self._release()  # the next pass is another epoch: a new pipeline, a new seed
        else:
            self._reusable = True

    def _named_error(self, error: RuntimeError, rank_files: list[str], batches_done: int):
        message = str(error)
        for path in rank_files:
            if path in message:
                return ImageError(
                    f"{path}: DALI failed on this image (rank {self.rank}): {_last_lines(message)}"
                )
        # Not named by DALI: look among the batches in flight (the pipeline runs `prefetch`
        # batches ahead of the one being handed out) with a full decode, then, by header only
        # (16 bytes a file), through all of this rank's files of the pass.
        first = max(0, batches_done - 1) * self.batch_size
        last = (batches_done + self.prefetch + 2) * self.batch_size
        window = rank_files[first:last]
        found = find_unreadable(window) or find_unreadable(rank_files, decode=False)
        if found is not None:
            path, why = found
            return ImageError(
                f"{path}: image {why} (rank {self.rank}; DALI said: {_last_lines(message)})"
            )
        return ImageError(
            f"DALI failed on rank {self.rank} in a batch read from files {first}.."
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
