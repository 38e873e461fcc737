"""Long lists: the file check split over the ranks, epoch boundaries whose cost does not grow
with the list, and the compact storage of paths and labels (real DALI, CPU mode)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from pipelines import build_loader, common
from pipelines.lists import SampleTable, format_line, read_table, write_list

IMAGE_SIZE = 32
LONG = 200_000  # lines of the long list: a sixth of ImageNet's, parsed in about 0.3 s


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(8):
        path = str(root / f"img{i}.jpg")
        Image.new("RGB", (48 + i, 40), (30 * i, 90, 200 - 20 * i)).save(path, quality=90)
        paths.append(path)
    return paths


def write_repeated(list_file: str, paths: list[str], lines: int) -> str:
    """``lines`` lines cycling through ``paths`` (label = index of the path), written fast."""
    block = [format_line(p, k) for k, p in enumerate(paths)]
    with open(list_file, "w", encoding="utf-8") as f:
        f.write("".join(block[i % len(block)] for i in range(lines)))
    return list_file


@pytest.fixture(scope="module")
def long_list(tmp_path_factory, images) -> str:
    return write_repeated(str(tmp_path_factory.mktemp("long") / "list.txt"), images, LONG)


def loader(list_file, **kwargs):
    args = dict(backend="dali", batch_size=4, image_size=IMAGE_SIZE, num_threads=2)
    return build_loader(list_file, **{**args, **kwargs})


# --- the file check, split over the ranks ----------------------------------------------------


def test_ranks_check_disjoint_slices_that_cover_the_list(tmp_path, images):
    list_file = write_repeated(str(tmp_path / "list.txt"), images, 23)
    table = read_table(list_file)
    for world in (1, 2, 3, 8, 30):  # 30 ranks: some check nothing
        slices = [
            common.check_files_exist(table, list_file=list_file, rank=r, world_size=world)
            for r in range(world)
        ]
        checked = [i for s in slices for i in s]
        assert checked == list(range(23)), world  # each entry once, in order
        assert max(len(s) for s in slices) - min(len(s) for s in slices) <= 1


@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
def test_a_missing_file_fails_the_rank_whose_slice_holds_it(tmp_path, images, train):
    paths = [images[i % len(images)] for i in range(24)]
    missing = str(tmp_path / "missing.jpg")
    paths[20] = missing  # world 3: entries 16-23 are rank 2's
    list_file = str(tmp_path / "list.txt")
    write_list(list_file, [(p, 0) for p in paths])
    for rank in (0, 1):  # they never stat it
        ld = loader(list_file, train=train, rank=rank, world_size=3)
        assert len(ld) > 0
    with pytest.raises(FileNotFoundError, match="missing.jpg: image file listed at "):
        loader(list_file, train=train, rank=2, world_size=3)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):  # one process checks all
        loader(list_file, train=train)
    assert len(loader(list_file, train=train, check_files=False)) > 0


# --- epoch boundaries ------------------------------------------------------------------------


def boundary_seconds(ld, epochs=(1, 2)) -> float:
    """The slowest set_epoch -> first batch of ``epochs``, each after a whole pass."""
    worst = 0.0
    for epoch in epochs:
        start = time.perf_counter()
        ld.set_epoch(epoch)
        batches = iter(ld)
        next(batches)
        worst = max(worst, time.perf_counter() - start)
        batches.close()
    return worst


def test_epoch_boundary_does_not_grow_with_the_list(tmp_path, images, long_list):
    short_list = write_repeated(str(tmp_path / "short.txt"), images, 200)
    short = loader(short_list, train=True, world_size=8, check_files=False)
    long = loader(long_list, train=True, world_size=8, check_files=False)
    assert len(long) == LONG // 8 // 4
    next(iter(short)), next(iter(long))  # first passes: DALI's one-off start-up
    short_s, long_s = boundary_seconds(short), boundary_seconds(long)
    # A 200k-entry files= list made this 0.7 s more than the short list's; fed batch by
    # batch it costs one permutation of the list (about 20 ms) more.
    assert long_s < 1.0
    assert long_s < short_s + 0.3, (short_s, long_s)


def test_long_list_epochs_keep_the_plan(long_list):
    """Rank 3 of 8 reads its block of the epoch's global permutation (labels = positions of
    the 8 cycled files), and the next epoch reads another."""
    ld = loader(long_list, train=True, rank=3, world_size=8, check_files=False)
    per_rank = len(ld) * 4
    for epoch in (0, 1):
        ld.set_epoch(epoch)
        batches = iter(ld)
        labels = [int(v) for _, y in (next(batches) for _ in range(3)) for v in y]
        batches.close()
        order = common.epoch_permutation(LONG, seed=0, epoch=epoch)
        expected = order[3 * per_rank : 3 * per_rank + 12] % 8
        assert labels == expected.tolist()


# --- compact storage -------------------------------------------------------------------------


def test_loaders_hold_the_list_compactly(long_list, images):
    ld = loader(long_list, train=True, world_size=8, check_files=False)
    table = ld.table
    assert isinstance(table, SampleTable)
    assert table.blob.dtype == np.uint8 and table.offsets.dtype == np.int64
    assert table.labels.dtype == np.int64 and len(table) == LONG
    path_bytes = sum(len(images[i % 8].encode()) + 1 for i in range(LONG))  # + 1: NUL each
    assert table.nbytes == path_bytes + 8 * (LONG + 1) + 8 * LONG
    # No Python list of the samples anywhere on the loader.
    sequences = [v for v in vars(ld).values() if isinstance(v, list | tuple | dict)]
    assert all(len(v) < 100 for v in sequences), [type(v) for v in sequences]
    # The batches DALI is fed are views into the table's buffer, not copies.
    from pipelines.dali import PathBatches

    paths, labels = next(iter(PathBatches(table, ld.pass_indices(), 4)))
    assert all(np.shares_memory(p, table.blob) for p in paths)
    assert [bytes(p).decode() for p in paths] == [table.path(int(i)) for i in ld.pass_indices()[:4]]
    assert labels.shape == (4, 1)


@pytest.mark.slow  # 3 s on an idle 2-core machine, twice that on a busy one
def test_a_million_line_list_parses_in_seconds(tmp_path, images):
    """ImageNet's length: parsed in a few seconds (about 1.3 s here, 3.3 s as a list of
    samples) into three arrays: the paths' bytes, and 16 bytes a line (offset and label)."""
    list_file = write_repeated(str(tmp_path / "imagenet.txt"), images, 1_281_167)
    start = time.perf_counter()
    table = read_table(list_file, num_classes=8)
    seconds = time.perf_counter() - start
    assert len(table) == 1_281_167 and table.path(1_281_166) == images[1_281_166 % 8]
    assert seconds < 10.0  # a loose bound: the machine may be shared
    path_bytes = len(images[0]) + 1  # the images' paths have one length; + 1: the NUL
    assert table.nbytes == 1_281_167 * (path_bytes + 16) + 8  # n + 1 offsets
    os.remove(list_file)


# --- benchmarks/imagenet_scale.py: refusals before any work, and a real run ------------------

SMALL_RUN = ["--world-size", "2", "--batch-size", "4", "--image-size", "32", "--threads", "1"]
SMALL_RUN += ["--epochs", "1", "--steps", "2", "--train-size", "400", "--val-size", "40"]


def copy_lists(src: str, dst) -> dict[str, bytes]:
    """The tiny data's three list files copied into ``dst`` (absolute paths kept valid by
    rewriting them through read_table); returns their bytes."""
    from pipelines.lists import CLASSES_FILE, TRAIN_LIST, VAL_LIST

    os.makedirs(dst, exist_ok=True)
    out = {}
    for name in (TRAIN_LIST, VAL_LIST):
        table = read_table(os.path.join(src, name))
        write_list(
            os.path.join(dst, name),
            list(zip(table.paths(), table.labels.tolist(), strict=True)),
            absolute=True,
        )
    with open(os.path.join(src, CLASSES_FILE), "rb") as f:
        (dst / CLASSES_FILE).write_bytes(f.read())
    for name in (TRAIN_LIST, VAL_LIST, CLASSES_FILE):
        out[name] = (dst / name).read_bytes()
    return out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "error: argument --steps: 0 is below the minimum, 1 (see --help)"),
        (["--rank", "9"], "--rank 9 is outside [0, --world-size 2)"),
        (["--batch-size", "64"], "too few for 2 ranks x batch 64: each rank needs 2 steps, 256"),
        (["--train-size", "10"], "the long list (--train-size, --val-size): 10 train lines"),
    ],
)
def test_scale_refuses_bad_values_in_one_line(tiny_data, tmp_path, capsys, flags, message):
    from benchmarks import imagenet_scale

    argv = ["--data", tiny_data.root, "--work-dir", str(tmp_path / "w"), *SMALL_RUN, *flags]
    try:
        status = imagenet_scale.main(argv)
    except SystemExit as e:  # argparse's own refusal
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and not (tmp_path / "w").exists()


def test_scale_never_writes_over_lists_it_did_not_write(tiny_data, tmp_path, capsys):
    from benchmarks import imagenet_scale

    mine = tmp_path / "mine"
    before = copy_lists(tiny_data.root, mine)
    for work in (mine, tmp_path / "missing_data"):
        data = str(mine) if work == mine else str(tmp_path / "nope")
        status = imagenet_scale.main(["--data", data, "--work-dir", str(mine), *SMALL_RUN])
        assert status == 2
    err = capsys.readouterr().err.splitlines()
    assert (
        err[0]
        == f"error: --work-dir {mine} is the --data folder: the long lists would replace its lists; choose another folder"
    )
    assert err[1] == f"error: --data {tmp_path / 'nope'} is not a folder"
    status = imagenet_scale.main(["--data", tiny_data.root, "--work-dir", str(mine), *SMALL_RUN])
    err = capsys.readouterr().err
    assert (
        status == 2
        and "holds Train.txt, Test.txt, classes.txt that this script did not write" in err
    )
    assert {name: (mine / name).read_bytes() for name in before} == before


@pytest.mark.slow
def test_scale_run_names_the_list_lengths_and_keeps_its_json(tiny_data, tmp_path, capsys):
    from benchmarks import imagenet_scale

    work, out = tmp_path / "work", tmp_path / "scale.json"
    argv = ["--data", tiny_data.root, "--work-dir", str(work), "--json", str(out), *SMALL_RUN]
    argv += ["--steps", "20"]  # more than the 120-line list's 15 steps per epoch hold
    assert imagenet_scale.main(argv) == 0
    table = capsys.readouterr().out
    assert "| --data list (120 lines) | 400-line list |" in table
    assert "| steps timed per epoch (median below) | 14 | 20 |" in table
    assert (work / imagenet_scale.WORK_MARKER).exists() and len(
        read_table(str(work / "Train.txt"))
    ) == 400
    result = json.loads(out.read_text())
    assert result["results"]["400-line list"]["train_samples"] == 400
    assert result["results"]["--data list (120 lines)"]["steps_timed"] == 14
    # A second run may reuse its own work dir, but not write over the JSON it wrote.
    assert imagenet_scale.main(argv) == 2
    assert "scale.json exists: choose another name or pass --overwrite" in capsys.readouterr().err
    assert json.loads(out.read_text()) == result


@pytest.mark.slow
def test_scale_measures_shard_sets_that_repeat_real_images(tiny_data, tmp_path, capsys):
    from benchmarks import imagenet_scale
    from pipelines.shards import read_shard_table

    work = tmp_path / "work"
    argv = ["--data", tiny_data.root, "--work-dir", str(work), *SMALL_RUN, "--shards"]
    assert imagenet_scale.main([*argv, "--shard-samples", "30"]) == 0
    table = capsys.readouterr().out
    assert (
        "| --data list (120 lines) | 400-line list | shards of the --data list | 400-sample shard set |"
        in table
    )
    assert "| train samples | 120 | 400 | 120 | 400 |" in table
    long_set = read_shard_table(str(work / "long-shards-train"))
    small_set = read_shard_table(str(work / "shards-train"))
    assert len(long_set) == 400 and len(long_set.shard_names) == 14  # 13 x 30 + 10
    # Each long shard repeats the members of a real one: the same bytes, the same labels.
    for i in (0, 29, 30, 399):
        shard = int(long_set.shard_of[i])
        origin = os.path.realpath(long_set.shard_path(shard))
        j = next(
            k for k in range(len(small_set))
            if os.path.realpath(small_set.shard_path(int(small_set.shard_of[k]))) == origin
            and small_set.offsets[k] == long_set.offsets[i]
        )  # fmt: skip
        assert long_set.source(i) == small_set.source(j)
        assert long_set.labels[i] == small_set.labels[j]
