"""What every node of a multi-node job must agree on, checked once at start.

torchrun starts the same script on each node, but each node reads its own command line, its
own copies of the lists and its own view of the output folder. A node that differs issues
other collectives than the rest (another batch size, another list length, another resume
point), and the job would hang until --dist-timeout and end in a gloo or NCCL traceback.
Each check gathers every rank's view and compares it with rank 0's; a difference is one line,
said by rank 0 and by the rank that differs, so the logs of both nodes show it.

``decided_by_main`` and ``agreed_by_all`` hand rank 0's decision, or an error any rank met, to
every rank, so that all go on alike or stop together; ``load_agreed_checkpoint`` loads the
checkpoint rank 0 chose on every rank.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import asdict

import numpy as np

from pipelines.shards import ShardTable
from trainer import checkpoint as ckpt_io
from trainer import dist
from trainer.config import Config, RankError, TrainerError

# Flags a node may set for itself: its own paths to the run's files (the lists' contents are
# compared apart, in check_same_data), its loader's threads and decode, its own patience.
NODE_LOCAL_FIELDS = (
    "train_list", "val_list", "classes", "output_dir", "workers", "dali_decode",
    "dali_hw_decoder_load", "prefetch", "dist_timeout", "overwrite", "config", "local_rank",
    "processes",
)  # fmt: skip


def node_differs(info: dist.DistInfo, rank: int, host: str, what: str) -> TrainerError:
    """The error for rank ``rank`` differing from rank 0: said by rank 0 and by that rank
    itself (as ``rank K: ...``), so the logs of both nodes show it."""
    if info.rank == rank:
        return RankError(f"this node ({host}) {what}")
    return TrainerError(f"rank {rank} (on {host}) {what}")


def _shown(value) -> str:
    # None is a flag left to its default (--lr: scaled from the batch), not a value given.
    return "not given (the default)" if value is None else repr(value)


def check_same_command(cfg: Config, info: dist.DistInfo) -> None:
    """Every rank must run with rank 0's settings: a node started with another --batch-size,
    --epochs or --arch would issue other collectives than the rest, and the job would fail
    only at --dist-timeout, in a gloo or NCCL traceback. One line naming the rank, its host
    and each difference instead, before anything is written."""
    if not info.distributed:
        return
    mine = {k: v for k, v in asdict(cfg).items() if k not in NODE_LOCAL_FIELDS}
    everyone = dist.all_gather_objects((socket.gethostname(), mine))
    host0, first = everyone[0]
    for rank, (host, theirs) in enumerate(everyone[1:], start=1):
        differ = [
            f"--{name.replace('_', '-')} {_shown(theirs.get(name))} there, {_shown(value)} on "
            "rank 0"
            for name, value in first.items()
            if theirs.get(name) != value
        ]
        if differ:
            raise node_differs(
                info,
                rank,
                host,
                f"was started with other settings than rank 0 (on {host0}): "
                f"{'; '.join(differ)}; start every node with the same command",
            )


def list_digest(loader, *, chunk: int = 65536) -> tuple[int, str, str] | None:
    """What must be the same on every node for a list: its sample count, its labels in order,
    and its images in order below the folder they all share (that folder may differ: each
    node may hold its own copy of the tree, and of the list, anywhere)."""
    if loader is None:
        return None
    table = loader.table
    labels = table.labels
    if len(table) == 0:
        return 0, hashlib.sha1(labels.tobytes()).hexdigest(), hashlib.sha1().hexdigest()
    if isinstance(table, ShardTable):
        # A shard set: its shards' and members' names and where each sample lies in them,
        # whatever folder (or cache) holds the copy; arrays, not 1.28M formatted names.
        names = hashlib.sha1("\0".join(table.shard_names + ["|"] + table.ext_names).encode())
        for array in (table.shard_of, table.offsets, table.sizes, table.exts):
            names.update(np.ascontiguousarray(array).tobytes())
        if table.keys is not None:
            names.update(np.ascontiguousarray(table.keys).tobytes())
        return len(labels), hashlib.sha1(labels.tobytes()).hexdigest(), names.hexdigest()
    # The folder every path lies in ("/data/flowers/" for a copy of a class-per-folder tree),
    # cut at a "/" so that a name is never split: the common prefix of all paths is the
    # common prefix of the first and the last in sorted order.
    first = last = table.path(0)
    for start in range(0, len(table), chunk):
        paths = table.paths(start, start + chunk)
        first, last = min(first, *paths), max(last, *paths)
    cut = os.path.commonprefix([first, last]).rfind("/") + 1
    # Hashed a chunk at a time: 1.28M paths as strings at once would add 200 MB to a rank's
    # peak memory at start.
    names = hashlib.sha1()
    for start in range(0, len(table), chunk):
        for path in table.paths(start, start + chunk):
            names.update(path[cut:].encode("utf-8", "surrogateescape") + b"\0")
    return len(labels), hashlib.sha1(labels.tobytes()).hexdigest(), names.hexdigest()


def check_same_data(
    data, info: dist.DistInfo, train_loader, val_loader, *, train_digest=None
) -> None:
    """Every rank must read the same lists and class names: a node whose copy of a list
    holds other lines shuffles and shards another list, runs another number of steps, and
    the job would hang until --dist-timeout. ``train_digest``: the caller's cached
    ``list_digest(train_loader)`` (step checkpoints record it too), else computed here."""
    if not info.distributed:
        return
    train = train_digest() if train_digest is not None else list_digest(train_loader)
    mine = {
        "train": (data.train_list, train),
        "val": (data.val_list, list_digest(val_loader)),
        "classes": (data.classes_file, data.class_names),
    }
    everyone = dist.all_gather_objects((socket.gethostname(), mine))
    host0, first = everyone[0]
    for rank, (host, theirs) in enumerate(everyone[1:], start=1):
        for what, (path0, value0) in first.items():
            path, value = theirs[what]
            if value == value0:
                continue
            noun = "classes file" if what == "classes" else f"{what} list"
            if what == "classes":
                how = f"{len(value)} class names there, {len(value0)} on rank 0"
                if len(value) == len(value0):
                    k = next(
                        i for i, (a, b) in enumerate(zip(value, value0, strict=True)) if a != b
                    )
                    how = f"class {k} is {value[k]!r} there, {value0[k]!r} on rank 0"
            elif value is None or value0 is None:  # one side has no such list at all
                how = f"no {noun} {'there' if value is None else 'on rank 0'}"
                if what == "val":
                    how += " (no --val-list given, and no Test.txt beside its train list)"
            elif value[0] != value0[0]:
                how = f"{value[0]} samples there, {value0[0]} on rank 0"
            elif value[1] != value0[1]:
                how = f"the same {value[0]} samples, other labels or another order"
            else:
                how = (
                    f"the same {value[0]} samples and labels, but other images (their paths "
                    "below the folder they share differ)"
                )
            raise node_differs(
                info,
                rank,
                host,
                f"reads another {noun} than rank 0 (on {host0}): {path or 'none'} there, "
                f"{path0 or 'none'} on rank 0: {how}; every node needs the same {noun} (a copy "
                "of one file)",
            )


def check_same_resume(cfg: Config, info: dist.DistInfo, resume_path, checkpoint) -> None:
    """Rank 0 decided what the run resumes from; every node must see that, not its own copy.
    With node-local output folders torchrun's c10d rendezvous may make another node rank 0
    at each launch: rank 0 then finds no last.pt and starts afresh while the run's last.pt
    sits on another node, or the nodes hold copies saved at different steps."""
    if not info.distributed or cfg.resume is None:
        return
    if checkpoint is not None:  # what was read: the same save on every rank?
        position = checkpoint.get("position") or {}
        mine = ("read", checkpoint.get("epoch"), position.get("step"), checkpoint.get("elapsed"))
    else:  # rank 0 found nothing to resume: does any node hold a last.pt?
        last = os.path.join(cfg.output_dir, ckpt_io.LAST)
        mine = ("found", last) if os.path.isfile(last) else None
    everyone = dist.all_gather_objects((socket.gethostname(), mine))
    host0, first = everyone[0]
    fix = "put --output-dir on a filesystem every node sees"
    for rank, (host, theirs) in enumerate(everyone[1:], start=1):
        if theirs == first:
            continue
        if first is None:
            raise node_differs(
                info, rank, host,
                f"holds {theirs[1]}, but rank 0 (on {host0}) finds no {ckpt_io.LAST} in "
                f"{cfg.output_dir} and would start the run afresh: {fix} (or copy the run "
                "there)",
            )  # fmt: skip

        def saved(read):  # as the step checkpoint and epoch lines say it
            _, epoch, step, _ = read
            return f"the end of epoch {epoch}" if step is None else f"epoch {epoch + 1} step {step}"

        if saved(theirs) != saved(first):
            how = f"as saved at {saved(theirs)}, rank 0 (on {host0}) at {saved(first)}"
        else:
            how = f"as another save of {saved(first)} than rank 0 (on {host0})"
        raise node_differs(
            info, rank, host,
            f"reads {resume_path} {how}: the nodes hold different copies of the run; {fix}",
        )  # fmt: skip


def decided_by_main(info: dist.DistInfo, decide):
    """Run ``decide()`` on rank 0 only and hand its result to every rank; a TrainerError it
    raises is raised on every rank (rank 0 prints it), so all stop together."""
    outcome = None
    if info.is_main:
        try:
            outcome = ("ok", decide())
        except TrainerError as exc:
            outcome = ("error", str(exc))
    kind, value = dist.broadcast_from_main(outcome)
    if kind == "error":
        raise TrainerError(value)
    return value


def agreed_by_all(info: dist.DistInfo, action, *, input_errors: tuple = ()):
    """Run ``action()`` on every rank; if it raised TrainerError on any rank, raise on every
    rank the first such error (naming the rank that met it when that is not rank 0).
    ``input_errors``: other exception types that mean bad input here, taken alike. On each
    node but rank 0's, the first rank that met one says its own too (its files, its log)."""
    error = None
    try:
        result = action()
    except (TrainerError, *input_errors) as exc:
        error, result = str(exc), None
    messages = dist.all_gather_objects(error)
    failed = [rank for rank, message in enumerate(messages) if message is not None]
    if not failed:
        return result
    # Ranks are numbered node by node: this node's start at rank - local rank. Off rank 0's
    # node, the node's first rank that met an error says its own, even when a lower rank's is
    # the one raised: with shared storage every node meets a missing image, rank 0's node
    # first, and rank 0's line alone left the other nodes' logs without a reason.
    node_start = info.rank - info.local_rank
    first_here = all(m is None for m in messages[node_start : info.rank])
    if error is not None and node_start > 0 and first_here:
        raise RankError(error)
    first = failed[0]
    raise TrainerError(messages[first] if first == 0 else f"rank {first}: {messages[first]}")


def load_agreed_checkpoint(path: str, info: dist.DistInfo) -> dict:
    """Every rank loads the checkpoint rank 0 chose; a rank that cannot fails the job naming
    the file (each node reads it from its own view of the output folder). Agreed, so that
    rank 0's log says it too, not only "another rank failed"."""

    def load() -> dict:
        try:
            return ckpt_io.load_checkpoint(path)
        except TrainerError:
            if info.is_main or os.path.isfile(path):
                raise
            raise TrainerError(
                f"{path}: rank 0 resumes from this checkpoint, but it is not there on this "
                "node; put --output-dir on a filesystem every node sees"
            ) from None

    return agreed_by_all(info, load)
