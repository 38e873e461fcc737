"""build_loader for both backends, on real files with real DALI (CPU mode).

Images are tiny (40-96 px, crop 32) so every test is quick; what they check is the contract
(shape, dtype, channels_last, device, labels), the epoch plan (steps, shuffle, sharding,
seeds) and the agreement of DALI's and PIL's validation tensors.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import build_loader
from pipelines.lists import ListError, read_list, write_classes, write_list

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 32
NUM_CLASSES = 5
# One grey level after normalization is 1 / (255 * std) <= 1 / (255 * 0.224) = 0.0175.
ONE_GREY_LEVEL = 1 / (255 * 0.224)


def write_image(path: str, *, size: tuple[int, int], seed: int, fmt: str = "JPEG") -> str:
    """A smooth random image (upsampled noise): photo-like enough for resampling to matter."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = (rng.random((max(2, h // 8), max(2, w // 8), 3)) * 255).astype(np.uint8)
    image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return path


def write_dataset(root: str, count: int, *, classes: int | None, seed: int = 0) -> str:
    """``count`` images of varied sizes; label = index % classes, or the index itself."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        size = (int(rng.integers(40, 97)), int(rng.integers(40, 97)))
        path = write_image(os.path.join(root, "img", f"{i:03d}.jpg"), size=size, seed=seed + i)
        samples.append((path, i % classes if classes else i))
    list_file = os.path.join(root, "list.txt")
    write_list(list_file, samples)
    if classes:
        write_classes(os.path.join(root, "classes.txt"), [f"class{k}" for k in range(classes)])
    return list_file


@pytest.fixture(scope="module")
def labelled_list(tmp_path_factory) -> str:
    """23 images, 5 classes, with classes.txt beside the list."""
    return write_dataset(str(tmp_path_factory.mktemp("labelled")), 23, classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def indexed_list(tmp_path_factory) -> str:
    """11 images whose label is their index in the list: sample identity for sharding tests."""
    return write_dataset(str(tmp_path_factory.mktemp("indexed")), 11, classes=None, seed=100)


@pytest.fixture(scope="module")
def same_image_list(tmp_path_factory) -> str:
    """One image listed 16 times: batches can differ only by augmentation."""
    root = str(tmp_path_factory.mktemp("same"))
    path = write_image(os.path.join(root, "one.jpg"), size=(80, 60), seed=7)
    list_file = os.path.join(root, "list.txt")
    write_list(list_file, [(path, 0)] * 16)
    return list_file


def loader(list_file, **kwargs):
    args = dict(batch_size=4, image_size=IMAGE_SIZE, num_threads=2)
    if kwargs.get("backend", "").startswith("pil"):
        args["num_threads"] = 0  # in-process: fast; worker processes are tested separately
    args.update(kwargs)
    return build_loader(list_file, **args)


def epoch(loader_, epoch_=None):
    if epoch_ is not None:
        loader_.set_epoch(epoch_)
    return [(x.clone(), y.clone()) for x, y in loader_]


def labels_of(batches) -> list[int]:
    return [int(v) for _, y in batches for v in y]


def images_of(batches) -> torch.Tensor:
    return torch.cat([x.float() for x, _ in batches])


BACKENDS = ["dali", "pil", "pil-gpu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_contract(labelled_list, backend, train, dtype):
    ld = loader(labelled_list, backend=backend, train=train, dtype=dtype)
    batches = list(ld)
    assert len(batches) == len(ld) == (5 if train else 6)  # 23 // 4 whole; ceil(23 / 4)
    assert ld.dataset_size == 23
    assert ld.num_samples == (20 if train else 23) == sum(len(y) for _, y in batches)
    assert ld.num_classes == NUM_CLASSES  # from classes.txt beside the list
    for images, labels in batches:
        n = len(labels)
        assert images.shape == (n, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert images.dtype == dtype and images.device.type == "cpu"
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert images.stride()[1] == 1  # channels innermost
        assert labels.dtype == torch.int64 and labels.shape == (n,)
        assert labels.device.type == "cpu"
        assert int(labels.min()) >= 0 and int(labels.max()) < NUM_CLASSES
        values = images.float()
        assert torch.isfinite(values).all()
        # Normalized pixels of [0, 255] lie in [-0.485/0.229, (1-0.406)/0.225] = [-2.12, 2.64].
        assert float(values.min()) > -2.2 and float(values.max()) < 2.7
        assert float(values.std()) > 0.1  # real image content, not zeros
    if not train:  # list order: labels are index % 5
        assert labels_of(batches) == [i % NUM_CLASSES for i in range(23)]


def test_dali_batches_stay_valid_while_held(labelled_list):
    """Zero-copy hand-off: a held batch is not overwritten by prefetching or a new pipeline."""
    ld = loader(labelled_list, backend="dali", train=True)
    held, copies = [], []
    for images, _ in ld:
        held.append(images)
        copies.append(images.clone())
    ld.set_epoch(1)
    for _ in ld:  # a whole new epoch: a new pipeline, new buffers
        pass
    assert len({x.data_ptr() for x in held}) == len(held)
    for x, c in zip(held, copies, strict=True):
        assert torch.equal(x, c)


@pytest.mark.parametrize("size", [IMAGE_SIZE, 56])
def test_val_parity_dali_vs_pil(tmp_path, size):
    """The same validation tensors from DALI and torchvision, to within one grey level.

    Sizes are chosen so that every rounding case of torchvision's Resize (the longer side
    truncated) and CenterCrop (odd slack, rounded half to even) occurs. Both backends decode
    JPEG with libjpeg-turbo, and DALI's antialiased linear resize matches PIL's bilinear to
    within rounding, so the only differences left are uint8 rounding: one grey level at most.
    """
    sizes = [(64, 48), (48, 64), (80, 80), (57, 91), (91, 57), (40, 96), (75, 50), (33, 100)]
    samples = [
        (write_image(str(tmp_path / f"{i}.jpg"), size=s, seed=i), 0) for i, s in enumerate(sizes)
    ]
    list_file = str(tmp_path / "list.txt")
    write_list(list_file, samples)
    dali = images_of(epoch(loader(list_file, backend="dali", train=False, image_size=size)))
    pil = images_of(epoch(loader(list_file, backend="pil", train=False, image_size=size)))
    difference = (dali - pil).abs()
    assert float(difference.max()) <= 1.01 * ONE_GREY_LEVEL
    assert float(difference.mean()) < 0.25 * ONE_GREY_LEVEL
    # A one-pixel shift of the crop would show: the check above is not vacuous.
    shifted = (dali[..., 1:] - pil[..., :-1]).abs().mean()
    assert float(shifted) > 4 * float(difference.mean())


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_val_every_image_exactly_once(indexed_list, tmp_path, backend):
    """World sizes 1-4, lists of 1, 2, 5 and 11 images, batch 3: each image once, no padding."""
    for count in (1, 2, 5, 11):
        list_file = str(tmp_path / f"list{count}.txt")
        write_list(list_file, read_list(indexed_list)[:count])
        for world in (1, 2, 3, 4):
            seen = []
            for rank in range(world):
                ld = loader(
                    list_file,
                    backend=backend,
                    train=False,
                    batch_size=3,
                    rank=rank,
                    world_size=world,
                )
                batches = epoch(ld)
                assert len(batches) == len(ld)
                assert all(len(y) > 0 for _, y in batches)  # no empty batch on a short shard
                assert sum(len(y) for _, y in batches) == ld.num_samples
                seen += labels_of(batches)
            assert sorted(seen) == list(range(count)), (count, world)
            assert seen == list(range(count))  # contiguous shards in list order


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_train_ranks_equal_steps_disjoint_and_reshuffled(indexed_list, backend):
    """Every rank the same steps; an epoch's samples disjoint across ranks; a new order each
    epoch (one global permutation, so the ranks' parts never overlap)."""
    for world in (1, 2, 3, 4):
        expected_steps = (11 // world) // 2
        orders = {}
        for ep in (0, 1):
            per_rank = []
            for rank in range(world):
                ld = loader(
                    indexed_list,
                    backend=backend,
                    train=True,
                    batch_size=2,
                    rank=rank,
                    world_size=world,
                )
                batches = epoch(ld, ep)
                assert len(batches) == len(ld) == expected_steps
                assert all(len(y) == 2 for _, y in batches)
                per_rank.append(labels_of(batches))
            everything = sum(per_rank, [])
            assert len(set(everything)) == len(everything), (world, ep, per_rank)
            orders[ep] = everything
        assert orders[0] != orders[1]


def test_backends_share_the_epoch_plan(indexed_list):
    """One plan for both backends (common.ShardedLoader): the same samples in the same order
    on every rank, each epoch, as the global permutation's contiguous blocks."""
    from pipelines.common import epoch_permutation

    for world in (1, 3):
        for ep in (0, 1):
            for rank in range(world):
                orders = {
                    backend: labels_of(
                        epoch(
                            loader(
                                indexed_list,
                                backend=backend,
                                train=True,
                                batch_size=2,
                                rank=rank,
                                world_size=world,
                            ),
                            ep,
                        )
                    )
                    for backend in ("dali", "pil")
                }
                per_rank = (11 // world) // 2 * 2
                block = epoch_permutation(11, seed=0, epoch=ep)[rank * per_rank :][:per_rank]
                assert orders["dali"] == orders["pil"] == block.tolist(), (world, ep, rank)


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_train_seeded_repeatable_and_resumable(labelled_list, backend):
    first = epoch(loader(labelled_list, backend=backend, train=True, seed=3), 2)
    again = loader(labelled_list, backend=backend, train=True, seed=3)
    epoch(again, 0)  # running earlier epochs first changes nothing about epoch 2
    second = epoch(again, 2)
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(images_of(epoch(again, 2)), images_of(first))  # same epoch twice
    other = epoch(loader(labelled_list, backend=backend, train=True, seed=4), 2)
    assert not torch.equal(images_of(first), images_of(other))


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_train_augmentation_differs_per_rank_and_epoch(same_image_list, backend):
    """One image listed 16 times: what differs between batches is augmentation alone."""
    crops = {}
    for rank in (0, 1):
        for ep in (0, 1):
            ld = loader(same_image_list, backend=backend, train=True, rank=rank, world_size=2)
            crops[rank, ep] = images_of(epoch(ld, ep))
    assert not torch.equal(crops[0, 0], crops[1, 0])
    assert not torch.equal(crops[0, 0], crops[0, 1])
    # and within a batch the 4 copies are augmented differently
    assert not torch.equal(crops[0, 0][0], crops[0, 0][1])


def test_pil_workers_give_the_same_batches_as_in_process(labelled_list):
    """Per-sample seeding: worker processes (persistent, 2 epochs) change nothing."""
    in_process = loader(labelled_list, backend="pil", train=True, num_threads=0)
    workers = loader(labelled_list, backend="pil", train=True, num_threads=2)
    for ep in (0, 1):
        a, b = epoch(in_process, ep), epoch(workers, ep)
        assert torch.equal(images_of(a), images_of(b))
        assert labels_of(a) == labels_of(b)


def _send_birth_state(connection) -> None:  # run in a worker the forkserver forked
    import gc
    import signal

    connection.send(
        (
            gc.get_freeze_count(),
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
            signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []),
        )
    )


def test_pil_workers_are_born_with_imports_frozen_and_stop_signals_held_off():
    """What a worker has from its first instruction, before its ``worker_init_fn`` runs.

    - The forkserver froze what its imports made (pipelines/heap.py): a worker's garbage
      collections leave those objects' pages alone, shared with the server, not copied.
    - A Ctrl-C or a scheduler's SIGTERM can reach a worker that is still starting (the second
      worker, while the first one's batch is already in the rank): it must not end it.
    """
    import gc

    from pipelines import pil

    context = pil.worker_context()
    receive, send = context.Pipe(duplex=False)
    worker = context.Process(target=_send_birth_state, args=(send,))
    worker.start()
    send.close()
    assert receive.poll(60), "the worker never answered"
    frozen, ignores_sigint, holds_sigterm = receive.recv()
    worker.join(10)
    assert frozen > 100_000  # torch's, torchvision's and PIL's modules
    assert gc.get_freeze_count() == 0  # and the rank's own collector is left as it was
    assert ignores_sigint
    assert holds_sigterm


def test_val_pass_repeats_and_recovers_from_an_abandoned_pass(labelled_list):
    ld = loader(labelled_list, backend="dali", train=False)
    full = epoch(ld)
    assert len(list(itertools.islice(ld, 2))) == 2  # a pass stopped after two batches
    assert labels_of(epoch(ld)) == labels_of(full)
    assert torch.equal(images_of(epoch(ld)), images_of(full))


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_too_few_samples_for_one_training_step(indexed_list, backend):
    with pytest.raises(ValueError, match=r"list\.txt: 11 samples give no training step"):
        loader(indexed_list, backend=backend, train=True, batch_size=3, world_size=4)


def test_labels_checked_against_classes_file(tmp_path, labelled_list):
    root = os.path.dirname(labelled_list)
    list_file = str(tmp_path / "list.txt")
    write_list(
        list_file,
        [(os.path.join(root, "img", "000.jpg"), 0), (os.path.join(root, "img", "001.jpg"), 7)],
    )
    write_classes(str(tmp_path / "classes.txt"), ["a", "b", "c"])
    with pytest.raises(ListError, match=r"list\.txt:2: label 7 is outside \[0, 3\)"):
        loader(list_file, backend="dali", train=False)
    # an explicit count overrides classes.txt
    assert loader(list_file, backend="dali", train=False, num_classes=8).num_classes == 8


def test_argument_errors(labelled_list):
    with pytest.raises(ValueError, match="backend"):
        loader(labelled_list, backend="ffcv", train=True)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        loader(labelled_list, backend="dali", train=True, dali_decode="mixed")
    with pytest.raises(ValueError, match="dali_decode"):
        loader(labelled_list, backend="dali", train=True, dali_decode="gpu")
    with pytest.raises(ValueError, match="rank 2"):
        loader(labelled_list, backend="pil", train=True, rank=2, world_size=2)
    with pytest.raises(ValueError, match="dtype"):
        loader(labelled_list, backend="dali", train=True, dtype=torch.float64)


def test_dali_options_reach_the_decoder(labelled_list):
    from pipelines.dali import (
        MIXED_DECODER_DEFAULTS,
        MIXED_VAL_DECODER_DEFAULTS,
        decoder_options,
    )

    assert decoder_options("cpu", None, train=True) == {}
    mixed = decoder_options("mixed", {"hw_decoder_load": 0.9}, train=True)
    assert mixed == {**MIXED_DECODER_DEFAULTS, "hw_decoder_load": 0.9}
    val = decoder_options("mixed", {"jpeg_fancy_upsampling": False}, train=False)
    assert val == {**MIXED_VAL_DECODER_DEFAULTS, "jpeg_fancy_upsampling": False}
    ld = loader(labelled_list, backend="dali", train=True, dali_options={"use_fast_idct": True})
    assert len(epoch(ld)) == len(ld)
    with pytest.raises(KeyError, match="no_such_option"):  # DALI checks argument names
        epoch(loader(labelled_list, backend="dali", train=True, dali_options={"no_such_option": 1}))


def test_gpu_decoder_defaults_are_bounded():
    """GPU decode: most JPEGs to the hardware decoder, and nvJPEG's preallocated buffers
    bounded (they were 2.1 GiB of pinned host memory per rank with 8 threads)."""
    from pipelines.dali import (
        MIXED_DECODER_DEFAULTS,
        MIXED_VAL_DECODER_DEFAULTS,
        decoder_memory_estimate,
    )

    assert MIXED_DECODER_DEFAULTS["hw_decoder_load"] == 0.99
    assert MIXED_VAL_DECODER_DEFAULTS["hw_decoder_load"] == 0.99
    # The val pipeline, alive all run long, preallocates nothing of ours.
    assert not {k for k in MIXED_VAL_DECODER_DEFAULTS if "padding" in k or "hint" in k}
    mib = 1 << 20
    train = decoder_memory_estimate(8, True)
    val = decoder_memory_estimate(8, False)
    assert train["pinned_host_bytes"] == val["pinned_host_bytes"] == 2 * 8 * 8 * mib
    assert train["device_bytes"] == 8 * 211025920  # one never-regrowing buffer per thread
    assert val["device_bytes"] == 8 * 16 * mib  # nvJPEG's default padding
    assert train["pinned_host_bytes"] + val["pinned_host_bytes"] <= 256 * mib
    overridden = decoder_memory_estimate(4, True, {"host_memory_padding": 0})
    assert overridden["pinned_host_bytes"] == 0
    assert decoder_memory_estimate(8, True, decode="cpu") == {
        "pinned_host_bytes": 0,
        "device_bytes": 0,
    }


@pytest.mark.parametrize("decode", ["mixed", "cpu"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
def test_gpu_graphs_are_well_formed_without_a_gpu(labelled_list, decode, train):
    """Defining a DALI graph checks every operator's argument names and devices; only
    building it needs CUDA. So the GPU graphs are checked here too (they run under -m gpu)."""
    from pipelines import dali
    from pipelines.common import derived_seed

    graph = dict(
        source=[],  # defining the graph reads nothing
        image_size=IMAGE_SIZE,
        decode_device=decode,
        to_gpu=True,
        image_dtype=dali.types.FLOAT16,
        decoder_options=dali.decoder_options(decode, None, train=train),
    )
    pipeline = dict(batch_size=2, num_threads=1, device_id=0, seed=derived_seed(0, 0, 0))
    make = dali.train_pipeline if train else dali.val_pipeline
    pipe = make(**graph, **pipeline)
    assert pipe.device_id == 0


@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
def test_pil_gpu_backend_matches_pil(labelled_list, train):
    """Normalizing uint8 batches on the device gives torchvision's tensors (same seeds)."""
    on_device = epoch(loader(labelled_list, backend="pil-gpu", train=train))
    in_workers = epoch(loader(labelled_list, backend="pil", train=train))
    assert labels_of(on_device) == labels_of(in_workers)
    torch.testing.assert_close(images_of(on_device), images_of(in_workers), atol=1e-5, rtol=0)


def test_demo_data_through_both_backends(tiny_data):
    """The tiny demo set (JPEGs, PNGs, grayscale, varied sizes): same val tensors and labels,
    and a training epoch of whole batches, from both backends."""
    val = {
        backend: epoch(loader(tiny_data.val_list, backend=backend, train=False, batch_size=8))
        for backend in ("dali", "pil")
    }
    assert labels_of(val["dali"]) == labels_of(val["pil"])
    assert len(labels_of(val["dali"])) == len(read_list(tiny_data.val_list))
    difference = (images_of(val["dali"]) - images_of(val["pil"])).abs()
    assert float(difference.max()) <= 1.01 * ONE_GREY_LEVEL
    for backend in ("dali", "pil"):
        ld = loader(tiny_data.train_list, backend=backend, train=True, batch_size=8)
        assert ld.num_classes == tiny_data.num_classes
        batches = epoch(ld)
        assert len(batches) == len(ld) == len(read_list(tiny_data.train_list)) // 8
        assert max(labels_of(batches)) < tiny_data.num_classes


def test_pil_in_process_augmentation_leaves_the_global_rng_alone(labelled_list):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    epoch(loader(labelled_list, backend="pil", train=True, num_threads=0))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_a_dropped_loader_is_freed_at_once(labelled_list, backend):
    """No reference cycle: a loader dropped after an epoch goes at once, with its pipeline or
    persistent workers, not whenever the garbage collector runs (maybe mid-step, or in a
    process forked meanwhile, where stopping another process's workers or threads fails)."""
    import gc
    import weakref

    ld = loader(labelled_list, backend=backend, train=True, num_threads=2)
    epoch(ld)
    gone = weakref.ref(ld)
    gc.disable()
    try:
        del ld
        assert gone() is None
    finally:
        gc.enable()


# A rank process whose other thread holds a lock the workers need: torch's CPU generator, whose
# mutex torch.rand holds while it fills (each worker seeds that generator per sample).
HELD_LOCK_SCRIPT = """
import sys, threading, time
import torch
from pipelines import build_loader

def main():
    stop = threading.Event()
    def fill():
        while not stop.is_set():
            torch.rand(5_000_000)
    thread = threading.Thread(target=fill)
    thread.start()
    time.sleep(0.2)
    try:
        loader = build_loader(sys.argv[1], batch_size=4, image_size=32, backend="pil",
                              num_threads=2, train=True)
        print(sum(len(labels) for _, labels in loader), "samples")
    finally:
        stop.set()
        thread.join()

if __name__ == "__main__":
    main()
"""


@contextlib.contextmanager
def rank_process(tmp_path, script_text: str, list_file: str) -> Iterator[subprocess.Popen]:
    """``script_text`` run as a rank process, in a session of its own, its output piped. On
    the way out its whole group (forkserver and workers) is killed: a failing test leaves no
    worker behind, as one stuck on a copied lock did before this was so."""
    script = tmp_path / "rank.py"
    script.write_text(script_text)
    rank = subprocess.Popen(
        [sys.executable, str(script), list_file], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": REPO}, start_new_session=True,
    )  # fmt: skip
    try:
        yield rank
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rank.pid, signal.SIGKILL)
        rank.wait()


@pytest.mark.slow
def test_pil_workers_start_clean_while_another_thread_holds_a_lock(labelled_list, tmp_path):
    """A worker forked from the rank would copy that lock held, with no thread to release it,
    and wait forever (the rank with it): a rank runs gloo's, NCCL's or DALI's threads. Workers
    start from a forkserver instead, which runs no thread of the rank's."""
    with rank_process(tmp_path, HELD_LOCK_SCRIPT, labelled_list) as rank:
        try:
            out, err = rank.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("the PIL workers hung: a worker inherited a lock held by another thread")
    assert rank.returncode == 0, err[-2000:]
    assert out.split() == ["20", "samples"]  # 23 images, batch 4: 5 whole batches


KILLED_RANK_SCRIPT = """
import sys, time
from pipelines import build_loader

if __name__ == "__main__":
    loader = build_loader(sys.argv[1], batch_size=4, image_size=32, backend="pil",
                          num_threads=2, train=True)
    next(iter(loader))
    print(*(w.pid for w in loader.loader._iterator._workers), flush=True)
    time.sleep(600)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_pil_workers_end_when_their_rank_is_killed(labelled_list, tmp_path):
    """A rank killed outright (torchrun ending a failed job, the OOM killer) runs no cleanup:
    its workers must notice by themselves and end, or they (and the forkserver they keep
    alive) would run forever, holding memory and the launcher's output pipes."""
    with rank_process(tmp_path, KILLED_RANK_SCRIPT, labelled_list) as rank:
        workers = [int(pid) for pid in rank.stdout.readline().split()]
        assert len(workers) == 2 and all(_running(pid) for pid in workers)
        rank.send_signal(signal.SIGKILL)  # the rank alone
        rank.wait()
        deadline = time.monotonic() + 30
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in workers if _running(pid)]
    assert not left, f"workers {left} outlived their killed rank"


SIGNALLED_WORKERS_SCRIPT = """
import sys
from pipelines import build_loader

if __name__ == "__main__":
    loader = build_loader(sys.argv[1], batch_size=4, image_size=32, backend="pil",
                          num_threads=2, train=True)
    batches = iter(loader)
    next(batches)
    print(*(w.pid for w in loader.loader._iterator._workers), flush=True)
    sys.stdin.readline()  # the workers are signalled meanwhile
    print(1 + sum(1 for _ in batches), "batches", flush=True)
    # Exits with the (persistent) workers alive: the rank's own terminate() must end them.
"""


@pytest.mark.slow
def test_pil_workers_outlive_stop_signals_and_end_with_the_rank(labelled_list, tmp_path):
    """Ctrl-C signals the terminal's whole process group and a scheduler's preemption every
    process of the job; the rank stops at a step boundary, a batch or two later, so its
    workers must keep going. Yet they end when the rank exits with them still running."""
    with rank_process(tmp_path, SIGNALLED_WORKERS_SCRIPT, labelled_list) as rank:
        workers = [int(pid) for pid in rank.stdout.readline().split()]
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGTERM)
        out, err = rank.communicate("go\n", timeout=60)
        assert not any(_running(pid) for pid in workers)
    assert rank.returncode == 0, err[-2000:]
    assert out.split() == ["5", "batches"]  # 23 images, batch 4: the whole epoch


GROUP_SIGNALLED_SCRIPT = """
import signal, sys, time
from pipelines import build_loader

if __name__ == "__main__":
    got = []
    signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))  # the rank saves later
    loader = build_loader(sys.argv[1], batch_size=4, image_size=32, backend="pil",
                          num_threads=2, train=True)
    batches = iter(loader)
    next(batches)
    workers = loader.loader._iterator._workers
    print("ready", flush=True)
    sys.stdin.readline()  # its process group is signalled meanwhile
    time.sleep(1)  # a step or two, and the save: a dead server shows at once (exit 255)
    print(got, all(w.is_alive() for w in workers), flush=True)
    print(1 + sum(1 for _ in batches), "batches", flush=True)
"""


@pytest.mark.slow
def test_pil_workers_and_their_server_outlive_a_stop_signal_to_the_ranks_group(
    labelled_list, tmp_path
):
    """torchrun starts each rank in a session of its own and stops it (a preemption passed
    on, another rank failed) with killpg: SIGTERM reaches the rank's forkserver too. A dead
    server orphans the workers: DataLoader's watchdog ends them, the rank counts them dead
    (exit code 255) and its next batches fail. The server must take no SIGTERM."""
    with rank_process(tmp_path, GROUP_SIGNALLED_SCRIPT, labelled_list) as rank:
        assert rank.stdout.readline().split() == ["ready"]
        os.killpg(rank.pid, signal.SIGTERM)  # as torchrun's SubprocessHandler.close does
        out, err = rank.communicate("go\n", timeout=60)
    assert rank.returncode == 0, err[-2000:]
    assert out.splitlines() == ["[15] True", "5 batches"]  # 23 images, batch 4: the whole epoch


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stdin", "unguarded_file"])
def test_pil_workers_never_run_the_main_script_again(labelled_list, tmp_path, how):
    """Under spawn or a forkserver, Python runs the main script again in each worker, from its
    path: ``python - < script`` names ``<stdin>``, which cannot be read there, and a script
    without the ``__main__`` guard would start over in each. The workers need nothing of it."""
    script = (
        "from pipelines import build_loader\n"
        "print('script body', flush=True)\n"
        f"loader = build_loader({labelled_list!r}, batch_size=4, image_size=32,\n"
        "                      backend='pil', num_threads=2, train=False)\n"
        "print(sum(len(labels) for _, labels in loader), 'samples')\n"
        "import __main__\n"
        "print(__main__.__file__)\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    if how == "stdin":
        command, stdin, main_file = [sys.executable, "-"], script, "<stdin>"
    else:
        (tmp_path / "train.py").write_text(script)
        command, stdin, main_file = [sys.executable, "train.py"], None, str(tmp_path / "train.py")
    proc = subprocess.run(
        command, input=stdin, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Run once; every validation image once; the main module as it was.
    assert proc.stdout.splitlines() == ["script body", "23 samples", main_file]


# --- augmentation pinned by its statistics: each backend's random-resized-crop (area 0.08-1,
# aspect ratio 3/4-4/3), flip p=0.5 and ImageNet normalization, read back from the pixels.


@pytest.fixture(scope="module")
def coordinate_image_list(tmp_path_factory) -> str:
    """A lossless 240x240 image whose red channel is x and green channel is y (0-255), listed
    256 times: every output pixel says where in the source it came from."""
    root = str(tmp_path_factory.mktemp("coords"))
    ramp = np.linspace(0, 255, 240)
    rgb = np.zeros((240, 240, 3), dtype=np.uint8)
    rgb[..., 0] = np.round(ramp)[None, :]
    rgb[..., 1] = np.round(ramp)[:, None]
    rgb[..., 2] = 128
    path = os.path.join(root, "coords.png")
    Image.fromarray(rgb, "RGB").save(path)
    list_file = os.path.join(root, "list.txt")
    write_list(list_file, [(path, 0)] * 256)
    return list_file


def crop_windows(images: torch.Tensor):
    """(width fraction, height fraction, flipped) of each output crop, from its pixels."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = (images.float() * std + mean) * 255  # undo the normalization
    x, y = pixels[:, 0], pixels[:, 1]
    x_left, x_right = x[:, :, 0].mean(1), x[:, :, -1].mean(1)
    y_top, y_bottom = y[:, 0, :].mean(1), y[:, -1, :].mean(1)
    size = images.shape[-1]
    # The edge pixels' centres sit half a pixel in: scale the span out to the full window.
    width = (x_right - x_left).abs() / 255 * size / (size - 1)
    height = (y_bottom - y_top) / 255 * size / (size - 1)
    return width, height, x_right < x_left


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_train_augmentation_statistics(coordinate_image_list, backend):
    images = torch.cat(
        [x for x, _ in loader(coordinate_image_list, train=True, backend=backend, batch_size=64)]
    )
    # The normalization is ImageNet's: the constant blue channel (128) reads back exactly.
    blue = (images[:, 2].float() * 0.225 + 0.406) * 255
    assert torch.allclose(blue, torch.full_like(blue, 128.0), atol=1.5)
    width, height, flipped = crop_windows(images)
    area, ratio = width * height, width / height
    assert len(area) == 256
    # torchvision's RandomResizedCrop on a square image: area uniform over 0.08-1 where the
    # window fits, so a mean near 0.5, small crops and near-whole ones both present.
    assert 0.38 < area.mean() < 0.62, area.mean()
    assert area.min() < 0.15 and area.max() > 0.85
    assert area.min() > 0.07
    # Aspect ratio within 3/4-4/3 (a little slack for pixel rounding), both sides of 1.
    assert ratio.min() > 0.72 and ratio.max() < 1.39, (ratio.min(), ratio.max())
    assert ratio.min() < 0.85 and ratio.max() > 1.18
    # Flip with probability 1/2: 128 expected of 256; 95 and 161 are 4 sigma away.
    assert 95 < int(flipped.sum()) < 161, int(flipped.sum())


def test_val_resize_is_crop_over_0875():
    from pipelines import common

    # torchvision's reference recipe: 224 crops from 256, so 64 from 73.
    assert common.val_resize_size(224) == 256 and common.val_resize_size(64) == 73


@pytest.mark.parametrize("backend", ["dali", "pil", "pil-gpu"])
def test_a_pass_resumed_mid_epoch_gives_the_same_batches(labelled_list, backend):
    check_a_resumed_pass(labelled_list, backend=backend)


@pytest.mark.parametrize("policy", ["auto", "rand", "trivial"])
def test_dali_auto_augment_resumed_mid_epoch_gives_the_same_batches(labelled_list, policy, recwarn):
    # The policies draw from DALI's generators too: the checkpoint must hold their state.
    check_a_resumed_pass(labelled_list, backend="dali", auto_augment=policy)
    # DALI 2.4's policies use ops it calls deprecated and says so at every build, past any
    # filter (pipelines.dali.DaliLoader._build): nothing of it reaches the user.
    assert not [w for w in recwarn if "nvidia.dali.fn.experimental" in str(w.message)]


def check_a_resumed_pass(labelled_list, **options):
    kwargs = dict(train=True, rank=1, world_size=2, seed=5, **options)
    backend = kwargs["backend"]
    whole = epoch(loader(labelled_list, **kwargs), 3)
    stopped_at = 2
    first = loader(labelled_list, **kwargs)
    first.set_epoch(3)
    batches = iter(first)
    head = [(x.clone(), y.clone()) for x, y in itertools.islice(batches, stopped_at)]
    state = first.state()  # after batch 2, as a checkpoint would record it
    assert (state is not None) == (backend == "dali")
    del batches, first
    resumed = loader(labelled_list, **kwargs)  # a new process's loader
    resumed.set_epoch(3, start_step=stopped_at, state=state)
    tail = [(x.clone(), y.clone()) for x, y in resumed]
    assert len(head) + len(tail) == len(whole)
    for (x, y), (x_ref, y_ref) in zip(head + tail, whole, strict=True):
        assert torch.equal(y, y_ref) and torch.equal(x, x_ref)
    # The start applies to one pass: the next one is whole again.
    assert len(epoch(resumed, 4)) == len(whole)
    # Resumed after the last step: an empty pass, not an error.
    resumed.set_epoch(3, start_step=len(whole))
    assert list(resumed) == []


def augmented_fraction(images: torch.Tensor) -> float:
    """Share of a coordinate image's crops (see coordinate_image_list) that are more than a
    crop, flip and resize: blue no longer 128, or x / y no longer monotone across the crop."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = (images.float() * std + mean) * 255
    blue_moved = (pixels[:, 2] - 128).abs().amax(dim=(1, 2)) > 6
    dx = pixels[:, 0].diff(dim=2)
    dy = pixels[:, 1].diff(dim=1)
    x_broken = ((dx > 3).any(dim=(1, 2))) & ((dx < -3).any(dim=(1, 2)))  # both ways at once
    y_broken = (dy < -3).any(dim=(1, 2))  # never flipped vertically
    return float((blue_moved | x_broken | y_broken).float().mean())


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_auto_augment_policies_change_images_alike_in_both_backends(coordinate_image_list, backend):
    def batches(policy):
        loaded = loader(
            coordinate_image_list, train=True, backend=backend, batch_size=64, auto_augment=policy
        )
        return torch.cat([x for x, _ in itertools.islice(iter(loaded), 2)])

    assert augmented_fraction(batches("none")) == 0.0
    fractions = {
        policy: augmented_fraction(batches(policy)) for policy in ("auto", "rand", "trivial")
    }
    # Each policy changes most images (an op may be the identity or leave this image alone).
    assert all(0.4 < f <= 1.0 for f in fractions.values()), fractions
    # Both backends draw the same policies: record the fractions for the other's test.
    EXPECTED_AUTO_AUGMENT[backend] = fractions
    other = EXPECTED_AUTO_AUGMENT.get("pil" if backend == "dali" else "dali")
    if other:
        for policy, fraction in fractions.items():
            assert abs(fraction - other[policy]) < 0.3, (backend, fractions, other)


EXPECTED_AUTO_AUGMENT: dict[str, dict[str, float]] = {}


def test_auto_augment_is_checked(labelled_list):
    with pytest.raises(ValueError, match="auto_augment"):
        loader(labelled_list, train=True, backend="dali", auto_augment="fancy")


@pytest.mark.parametrize(("backend", "workers"), [("dali", 2), ("pil", 0), ("pil", 1)])
def test_progressive_resize_changes_training_crops_only(labelled_list, backend, workers):
    train = loader(labelled_list, train=True, backend=backend, num_threads=workers)
    val = loader(labelled_list, train=False, backend=backend, num_threads=workers)
    assert next(iter(train))[0].shape[-1] == IMAGE_SIZE
    train.set_image_size(24)  # persistent PIL workers must follow too
    for _ in range(2):
        images, _labels = next(iter(train))
        assert images.shape[-2:] == (24, 24)
        assert images.is_contiguous(memory_format=torch.channels_last)
    assert next(iter(val))[0].shape[-1] == IMAGE_SIZE
    with pytest.raises(ValueError, match="only a training loader"):
        val.set_image_size(24)


@pytest.mark.parametrize("policy", ["auto", "rand", "trivial"])
def test_gpu_auto_augment_graphs_are_well_formed_without_a_gpu(policy):
    """As above, for the augmented training graph on GPU images (mixed decode)."""
    from pipelines import dali
    from pipelines.common import derived_seed

    pipe = dali.train_pipeline_auto_augment(
        source=[],
        image_size=IMAGE_SIZE,
        decode_device="mixed",
        to_gpu=True,
        image_dtype=dali.types.FLOAT16,
        decoder_options=dali.decoder_options("mixed", None, train=True),
        auto_augment=policy,
        batch_size=2,
        num_threads=1,
        device_id=0,
        seed=derived_seed(0, 0, 0),
    )
    assert pipe.device_id == 0


@pytest.mark.parametrize(
    ("train", "decode", "auto_augment"),
    [
        (True, "mixed", "none"),
        (True, "mixed", "rand"),
        (True, "cpu", "none"),
        (True, "cpu", "trivial"),
        (False, "mixed", "none"),
        (False, "cpu", "none"),
    ],
)
def test_gpu_graphs_pass_dalis_definition_checks(labelled_list, train, decode, auto_augment):
    """The GPU pipelines (decode on the GPU, or on the CPU with augmentation on the GPU) run
    only on a GPU, but DALI checks each operator's arguments and inputs when it defines the
    graph, before it needs CUDA: ``serialize()`` defines the graph first and only then asks
    for the device. So a GPU graph that DALI would refuse fails here, on every machine."""
    kwargs = dict(backend="dali", train=train, dali_decode=decode, device=torch.device("cuda", 0))
    ld = loader(labelled_list, auto_augment=auto_augment, **kwargs)
    pipe = ld.pipeline(ld.pass_indices())
    if torch.cuda.is_available():
        assert pipe.serialize()
    else:
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            pipe.serialize()
    # The control: the same call does reach DALI's checks (a wrong argument name is refused).
    bad = loader(labelled_list, dali_options={"no_such_option": 1}, **kwargs)
    with pytest.raises(KeyError, match="no_such_option"):
        bad.pipeline(bad.pass_indices()).serialize()
