"""The DALI GPU paths (mixed decode; CPU decode + GPU augmentation) and the pil-gpu backend.

Run on a CUDA machine with ``pytest -m gpu``; skipped elsewhere. The CPU-only suite checks the
same GPU graphs are well formed (tests/test_pipelines.py), these check that they run.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import build_loader
from pipelines.lists import write_list

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

IMAGE_SIZE = 32
ONE_GREY_LEVEL = 1 / (255 * 0.224)
SIZES = [(64, 48), (48, 64), (80, 80), (57, 91), (91, 57), (40, 96), (75, 50), (33, 100)]


def write_image(path: str, *, size: tuple[int, int], seed: int) -> str:
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = (rng.random((max(2, h // 8), max(2, w // 8), 3)) * 255).astype(np.uint8)
    Image.fromarray(coarse).resize((w, h), Image.BICUBIC).save(path, quality=92)
    return path


@pytest.fixture(scope="module")
def image_list(tmp_path_factory) -> str:
    """16 JPEGs of the sizes above (twice), label = index."""
    root = tmp_path_factory.mktemp("gpu")
    samples = [
        (write_image(str(root / f"{i}.jpg"), size=SIZES[i % len(SIZES)], seed=i), i)
        for i in range(16)
    ]
    list_file = os.path.join(root, "list.txt")
    write_list(list_file, samples)
    return list_file


def run(list_file, **kwargs):
    args = dict(batch_size=4, image_size=IMAGE_SIZE, num_threads=2, device="cuda")
    args.update(kwargs)
    ld = build_loader(list_file, **args)
    return ld, [(x.clone(), y.clone()) for x, y in ld]


def cat(batches) -> torch.Tensor:
    return torch.cat([x.float().cpu() for x, _ in batches])


@pytest.mark.parametrize("decode", ["mixed", "cpu"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dali_gpu_output_contract(image_list, decode, train, dtype):
    ld, batches = run(image_list, backend="dali", train=train, dtype=dtype, dali_decode=decode)
    assert ld.decode_device == decode
    assert len(batches) == len(ld) == 4
    for images, labels in batches:
        assert images.device == torch.device("cuda", torch.cuda.current_device())
        assert images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == dtype
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.device == images.device and labels.dtype == torch.int64
        assert torch.isfinite(images.float()).all()
        assert float(images.float().std()) > 0.1
    if not train:
        assert [int(v) for _, y in batches for v in y] == list(range(16))


def test_auto_decode_is_mixed_on_cuda(image_list):
    ld = build_loader(
        image_list, train=True, backend="dali", batch_size=4, image_size=IMAGE_SIZE, device="cuda"
    )
    assert ld.decode_device == "mixed"


@pytest.mark.parametrize(
    "decode, max_levels, mean_levels",
    [
        # nvJPEG's IDCT differs from libjpeg-turbo's by a grey level or two here and there,
        # even with fancy chroma upsampling (on for val); a few levels at worst.
        ("mixed", 12, 1.0),
        # The same CPU decoder as PIL's; only the GPU resize kernels' rounding differs.
        ("cpu", 2, 0.5),
    ],
)
def test_dali_gpu_val_parity_with_pil(image_list, decode, max_levels, mean_levels):
    _, dali = run(image_list, backend="dali", train=False, dali_decode=decode)
    _, pil = run(image_list, backend="pil", train=False, device="cpu", num_threads=0)
    difference = (cat(dali) - cat(pil)).abs()
    assert float(difference.max()) <= max_levels * ONE_GREY_LEVEL
    assert float(difference.mean()) <= mean_levels * ONE_GREY_LEVEL


@pytest.mark.parametrize("decode", ["mixed", "cpu"])
def test_dali_gpu_batches_stay_valid_while_held(image_list, decode):
    ld = build_loader(
        image_list,
        train=True,
        backend="dali",
        batch_size=4,
        image_size=IMAGE_SIZE,
        device="cuda",
        dali_decode=decode,
    )
    held, copies = [], []
    for images, _ in ld:
        held.append(images)
        copies.append(images.clone())
    ld.set_epoch(1)
    for _ in ld:  # a new epoch: new pipeline, new buffers, while the old batches are held
        torch.cuda.synchronize()
    torch.cuda.synchronize()
    for x, c in zip(held, copies, strict=True):
        assert torch.equal(x, c)


@pytest.mark.parametrize("decode", ["mixed", "cpu"])
def test_dali_gpu_seeded_repeatable(image_list, decode):
    _, first = run(image_list, backend="dali", train=True, dali_decode=decode, seed=5)
    _, second = run(image_list, backend="dali", train=True, dali_decode=decode, seed=5)
    assert torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in second]))
    assert torch.equal(cat(first), cat(second))


@pytest.mark.parametrize("decode", ["mixed", "cpu"])
def test_dali_gpu_val_exactly_once(image_list, decode):
    for world in (1, 3, 4):
        seen = []
        for rank in range(world):
            ld, batches = run(
                image_list,
                backend="dali",
                train=False,
                batch_size=3,
                rank=rank,
                world_size=world,
                dali_decode=decode,
            )
            assert len(batches) == len(ld)
            seen += [int(v) for _, y in batches for v in y]
        assert seen == list(range(16))


@pytest.mark.parametrize("decode", ["mixed", "cpu"])
def test_dali_gpu_val_loader_iterated_twice_gives_the_same_batches(image_list, decode):
    """The val pipeline is kept and rewound between passes (the trainer evaluates every
    epoch, and EMA weights on the same pass's loader): the second pass is the first again."""
    ld = build_loader(
        image_list, backend="dali", train=False, batch_size=3, image_size=IMAGE_SIZE,
        num_threads=2, device="cuda", dali_decode=decode,
    )  # fmt: skip
    first = [(x.clone(), y.clone()) for x, y in ld]
    second = [(x.clone(), y.clone()) for x, y in ld]
    assert len(first) == len(second) == len(ld) == 6  # 16 images: 5 of 3 and 1 of 1
    for (x, y), (x_ref, y_ref) in zip(second, first, strict=True):
        assert torch.equal(y, y_ref) and torch.equal(x, x_ref)


def test_decoder_options_reach_the_gpu_decoder(image_list):
    _, batches = run(image_list, backend="dali", train=True, dali_options={"hw_decoder_load": 0.0})
    assert len(batches) == 4


@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
def test_pil_gpu_backend_matches_pil(image_list, train):
    """Normalizing uint8 batches on the GPU gives torchvision's tensors (same seeds)."""
    _, on_gpu = run(image_list, backend="pil-gpu", train=train, num_threads=2)
    _, on_cpu = run(image_list, backend="pil", train=train, num_threads=2)
    for (x1, y1), (x2, y2) in zip(on_gpu, on_cpu, strict=True):
        assert x1.device.type == "cuda" and x1.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y1, y2)
        torch.testing.assert_close(x1, x2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decode", ["mixed", "cpu"])
@pytest.mark.parametrize("policy", ["none", "auto", "rand", "trivial"])
def test_dali_gpu_pass_resumed_mid_epoch_gives_the_same_batches(image_list, decode, policy):
    """The training pipeline is built with enable_checkpointing: with mixed decode that is
    the GPU image_random_crop's state too, and with --auto-augment the policies' GPU ops and
    draws, which only a GPU build can check (the CPU suite's resume tests cover the CPU
    operators only)."""
    kwargs = dict(
        backend="dali", train=True, dali_decode=decode, batch_size=2, seed=5, rank=1, world_size=2,
        auto_augment=policy,
    )  # fmt: skip
    whole = run(image_list, **kwargs)[1]
    first = build_loader(image_list, image_size=IMAGE_SIZE, num_threads=2, device="cuda", **kwargs)
    batches = iter(first)
    head = [(x.clone(), y.clone()) for x, y in itertools.islice(batches, 2)]
    state = first.state()
    assert state is not None
    del batches, first
    resumed = build_loader(
        image_list, image_size=IMAGE_SIZE, num_threads=2, device="cuda", **kwargs
    )
    resumed.set_epoch(0, start_step=2, state=state)
    tail = [(x.clone(), y.clone()) for x, y in resumed]
    assert len(head) + len(tail) == len(whole)
    for (x, y), (x_ref, y_ref) in zip(head + tail, whole, strict=True):
        assert torch.equal(y, y_ref) and torch.equal(x, x_ref)


@pytest.mark.parametrize("decode", ["mixed", "cpu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dali_gpu_batches_survive_a_busy_consumer_stream(image_list, decode, dtype):
    """DALI hands its buffer over zero-copy (DLPack) and takes it back when the host drops it,
    while the copy that reads it may still be queued on torch's stream (pipelines.dali's
    DeviceHandoff). With torch's stream held busy the host and DALI run ahead; if DALI got a
    buffer back before the queued copy read it, batches would differ from a run that waits
    every step (same seed, same batches: test_dali_gpu_seeded_repeatable). float16 and
    float32 need no cast: before the hand-off copied, DALI's memory itself went to the model.
    The host runs more than the hand-off's limit of batches ahead here, so it must wait."""
    kwargs = dict(backend="dali", train=True, dali_decode=decode, dtype=dtype, seed=3)
    kwargs.update(batch_size=2, prefetch=2)
    waited = []
    for x, y in build_loader(
        image_list, image_size=IMAGE_SIZE, num_threads=2, device="cuda", **kwargs
    ):
        torch.cuda.synchronize()
        waited.append((x.clone(), y.clone()))
    busy = []
    ld = build_loader(image_list, image_size=IMAGE_SIZE, num_threads=2, device="cuda", **kwargs)
    for x, y in ld:
        torch.cuda._sleep(50_000_000)  # tens of ms: the next batch's copy queues behind it
        busy.append((x, y))  # as the model would read it, after the sleep
        assert len(ld.handoff) <= ld.handoff.limit
    torch.cuda.synchronize()
    assert len(busy) == len(waited) == 8
    assert ld.handoff.waits > 0  # 8 batches queued behind 8 sleeps: beyond the limit of 4
    for (x, y), (x_ref, y_ref) in zip(busy, waited, strict=True):
        assert x.dtype == dtype and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, y_ref) and torch.equal(x, x_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dali_gpu_batches_are_torch_memory(image_list, dtype):
    """What the loader hands on is allocated by torch's caching allocator (which tracks the
    streams it is used on), never DALI's buffer: torch's allocated bytes grow by the batch."""
    ld = build_loader(
        image_list, backend="dali", train=True, batch_size=4, image_size=IMAGE_SIZE,
        num_threads=2, device="cuda", dtype=dtype,
    )  # fmt: skip
    batches = iter(ld)
    first = next(batches)  # held: the build's allocations out of the way, nothing freed
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    x, y = next(batches)
    assert torch.cuda.memory_allocated() - before >= x.nbytes + y.nbytes
    assert first[0].data_ptr() != x.data_ptr()


def test_pil_gpu_batches_survive_a_busy_consumer_stream(image_list):
    """pil-gpu prepares batch k+1 on a side stream while the caller's stream (held busy here)
    still works on batch k; wait_stream and record_stream must keep every batch intact."""
    kwargs = dict(train=True, num_threads=2, seed=3, batch_size=2)
    _, on_cpu = run(image_list, backend="pil", device="cpu", **kwargs)
    ld = build_loader(image_list, backend="pil-gpu", image_size=IMAGE_SIZE, device="cuda", **kwargs)
    busy = []
    for x, y in ld:
        torch.cuda._sleep(50_000_000)
        busy.append((x.clone(), y.clone()))
        del x, y  # freed while the stream is still busy: record_stream must hold the memory
    torch.cuda.synchronize()
    assert len(busy) == len(on_cpu) == 8
    for (x, y), (x_ref, y_ref) in zip(busy, on_cpu, strict=True):
        assert torch.equal(y.cpu(), y_ref)
        torch.testing.assert_close(x.cpu(), x_ref, atol=1e-5, rtol=1e-5)
