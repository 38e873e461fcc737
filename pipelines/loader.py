"""``build_loader``: checks the arguments and the list, then hands over to one backend."""

from __future__ import annotations

import os

import torch

from . import common, shards
from .lists import SampleTable, classes_beside, read_classes, read_table

BACKENDS = ("dali", "pil", "pil-gpu")


def build_loader(
    list_file: str | os.PathLike,
    *,
    train: bool,
    backend: str,
    batch_size: int,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    num_threads: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_classes: int | None = None,
    dali_decode: str = "auto",
    prefetch: int = 2,
    dali_options: dict | None = None,
    check_files: bool = True,
    check_split: tuple[int, int] | None = None,
    auto_augment: str = "none",
):
    """A loader for one rank: iterate it for one epoch of ``(images, labels)``.

    ``list_file``: a list file, or a shard set of ``tools/make_shards.py`` (its folder or
    manifest.json), read with the same plan and semantics (``pipelines.shards``); a local
    path or an ``s3://`` URL (``pipelines.s3``). Or a table already read (a SampleTable or
    ShardTable, e.g. a ``ShardTable.subset``).

    images: ``(B, 3, image_size, image_size)``, channels_last memory, ``dtype``, on ``device``;
    labels: int64 ``(B,)`` on ``device``. The loader has ``len()`` (steps this epoch on this
    rank), ``set_epoch(epoch)``, ``num_samples`` (samples this rank yields per epoch),
    ``dataset_size`` (samples in the list) and ``num_classes`` (None when unknown).

    train: random-resized-crop + flip, a fresh global permutation each epoch (call
    ``set_epoch``), the same number of whole batches on every rank; same seed, same batches.
    Otherwise validation: resize shorter side to ``image_size / 0.875`` + center crop, every
    image exactly once across ranks (a rank may get a short last batch, or nothing).

    backend: "dali"; "pil" (torchvision's recipe, ``num_threads`` DataLoader workers); "pil-gpu"
    (the same with normalization on the device). dali_decode: "auto" (GPU decode on CUDA,
    otherwise CPU), "mixed" (GPU decode), "cpu" (CPU decode, GPU augmentation on CUDA).
    dali_options: extra or overriding arguments for DALI's decoder (e.g. ``hw_decoder_load``).
    num_classes: None takes the count from ``classes.txt`` beside the list when there is one;
    labels outside ``[0, num_classes)`` are an error naming ``file:line``.
    check_files: before the first step, stat the files of this rank's 1/world_size slice of
    the list (``common.check_slice``; missing or empty files fail here, named): all ranks
    together check every file once, about a second per million files on a local disk. A file
    in another rank's slice fails that rank, and a failed rank ends the job.
    check_split: ``(k, n)`` checks slice k of n instead of ``(rank, world_size)``'s: the
    trainer passes (local rank, ranks on this node), so that each node checks its own copy of
    every file (nodes may hold their own copies; one missing only on node 1 but in a node-0
    rank's slice would otherwise be met mid-epoch, whenever node 1 first reads it).
    """
    given_table = list_file if isinstance(list_file, SampleTable | shards.ShardTable) else None
    if given_table is not None:  # read already (tools/predict.py's items): named by where
        list_file = (
            given_table.origin or given_table.folder
            if isinstance(given_table, shards.ShardTable)
            else "the given samples"
        )
    list_file = os.fspath(list_file)
    device = common.resolve_device(device)
    common.check_args(
        batch_size=batch_size,
        image_size=image_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        dtype=dtype,
    )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if num_threads < (1 if backend == "dali" else 0):
        raise ValueError(f"num_threads must be >= 1 for DALI, >= 0 for PIL; got {num_threads}")
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    if given_table is not None:
        table = given_table
        if num_classes is None and isinstance(table, shards.ShardTable):
            num_classes = table.num_classes
    elif shards.manifest_path(list_file) is not None:
        # A shard set (its folder or manifest.json): the same plan and semantics, each
        # sample read from its tar at the offset DALI's index gives.
        table = shards.read_shard_table(list_file, num_classes=num_classes)
        num_classes = table.num_classes  # the manifest's, unless given
        if check_files:  # one stat a shard: every rank checks them all
            shards.check_shards(table)
    else:
        if num_classes is None:
            classes_file = classes_beside(list_file)
            if classes_file is not None:
                num_classes = len(read_classes(classes_file))
        table = read_table(list_file, num_classes=num_classes)
        if check_files:
            k, n = check_split if check_split is not None else (rank, world_size)
            common.check_files_exist(table, list_file=list_file, rank=k, world_size=n)

    shared = dict(
        list_file=list_file,
        train=train,
        batch_size=batch_size,
        image_size=image_size,
        rank=rank,
        world_size=world_size,
        device=device,
        seed=seed,
        dtype=dtype,
        prefetch=prefetch,
        auto_augment=auto_augment,
    )
    if backend == "dali":
        from .dali import DaliLoader  # DALI is imported only by those who use it

        loader = DaliLoader(
            table,
            num_threads=num_threads,
            dali_decode=dali_decode,
            dali_options=dali_options,
            **shared,
        )
    else:
        from .pil import PilLoader

        loader = PilLoader(
            table,
            num_workers=num_threads,
            normalize_on_device=backend == "pil-gpu",
            **shared,
        )
    loader.num_classes = num_classes
    return loader
