"""tools/make_shards.py and pipelines/shards.py: list files -> WebDataset tar shards, read back
by DALI's own reader (CPU) and by the webdataset package, as they are."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from pipelines.lists import read_list, write_list
from pipelines.shards import MANIFEST, parse_size, read_manifest, tar_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_cli():
    spec = importlib.util.spec_from_file_location(
        "make_shards_cli", os.path.join(REPO, "tools", "make_shards.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


make_shards_main = _load_cli()


def members(tar_path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_every_sample_once_as_its_own_bytes_classes_mixed(shard_set, tiny_data):
    manifest = read_manifest(str(shard_set))
    samples = read_list(tiny_data.train_list)
    assert manifest["num_samples"] == len(samples) == 120 and manifest["num_classes"] == 10
    assert len(manifest["shards"]) > 2
    want = sorted((digest(open(s.path, "rb").read()), s.label) for s in samples)  # noqa: SIM115
    got, keys = [], []
    for shard in manifest["shards"]:
        tar_path = shard_set / shard["name"]
        assert os.path.getsize(tar_path) == shard["bytes"] <= parse_size("150KB")
        content = members(tar_path)
        images = {k: v for k, v in content.items() if not k.endswith(".cls")}
        assert len(images) == shard["samples"]
        labels = [int(content[k.rsplit(".", 1)[0] + ".cls"]) for k in images]
        assert labels == shard["labels"]  # the manifest holds them too, in order
        got += [(digest(data), label) for data, label in zip(images.values(), labels, strict=True)]
        keys += [k.rsplit(".", 1)[0] for k in images]
        assert len(set(labels)) >= 5  # a seeded random order: every shard mixes the classes
    assert sorted(got) == want  # the files' own bytes, each once, with its label
    assert keys == [f"{i:09d}" for i in range(120)]
    assert (shard_set / "classes.txt").read_text() == open(  # noqa: SIM115
        os.path.join(os.path.dirname(tiny_data.train_list), "classes.txt")
    ).read()


def test_the_index_is_dalis_own_and_dali_and_webdataset_read_the_shards(shard_set):
    manifest = read_manifest(str(shard_set))
    first = shard_set / manifest["shards"][0]["name"]
    # DALI's wds2idx (installed with the wheel) writes the very same index.
    wds2idx = os.path.join(os.path.dirname(sys.executable), "wds2idx")
    subprocess.run([wds2idx, str(first), str(shard_set.parent / "ref.idx")], check=True,
                   capture_output=True)  # fmt: skip
    assert (shard_set.parent / "ref.idx").read_text() == (
        shard_set / manifest["shards"][0]["index"]
    ).read_text()

    from nvidia.dali import fn, pipeline_def

    paths = [str(shard_set / s["name"]) for s in manifest["shards"]]
    indexes = [str(shard_set / s["index"]) for s in manifest["shards"]]

    @pipeline_def(batch_size=manifest["num_samples"], num_threads=1, device_id=None)
    def read():
        image, label = fn.readers.webdataset(
            paths=paths, index_paths=indexes, ext=["jpg;jpeg;png", "cls"],
            missing_component_behavior="error",
        )  # fmt: skip
        return fn.decoders.image(image, device="cpu"), label

    pipe = read()
    pipe.build()
    images, labels = pipe.run()
    dali_labels = [int(bytes(np.asarray(labels[i]))) for i in range(len(labels))]
    assert len(dali_labels) == 120 and all(np.asarray(images[i]).shape[2] == 3 for i in range(3))

    import webdataset

    dataset = (
        webdataset.WebDataset(paths, shardshuffle=False)
        .decode("pil")
        .to_tuple("jpg;jpeg;png", "cls")
    )
    read_back = [label for _, label in dataset]
    assert read_back == dali_labels  # both read the same samples in the same (file) order


def test_the_same_input_gives_the_same_bytes_and_a_cut_run_is_finished(
    shard_set, tiny_data, tmp_path, capsys
):
    out = tmp_path / "again"
    flags = [tiny_data.train_list, "--out-dir", str(out), "--shard-size", "150KB", "--workers", "1"]
    assert make_shards_main(flags) == 0
    names = sorted(os.listdir(shard_set))
    assert sorted(os.listdir(out)) == names
    assert all((out / n).read_bytes() == (shard_set / n).read_bytes() for n in names)
    # A run cut short: no manifest yet, one shard never written, one cut mid-write (an
    # atomic write leaves only its temporary file, but a tar copied in by hand may be short).
    (out / MANIFEST).unlink()
    (out / "shard-000001.tar").unlink()
    with open(out / "shard-000002.tar", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(Exception):  # noqa: B017 - no manifest: no shard set to read
        read_manifest(str(out))
    capsys.readouterr()
    assert make_shards_main(flags) == 0
    shards = len(read_manifest(str(out))["shards"])
    assert f"wrote {shards} shards ({shards - 2} kept from an earlier, cut run)" in (
        capsys.readouterr().out
    )
    assert all((out / n).read_bytes() == (shard_set / n).read_bytes() for n in names)


def test_a_finished_set_is_never_replaced_without_overwrite(shard_set, tiny_data, capsys):
    before = (shard_set / MANIFEST).read_bytes()
    flags = [tiny_data.train_list, "--out-dir", str(shard_set), "--workers", "1"]
    assert make_shards_main(flags) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {shard_set / MANIFEST}: a shard set is already there; choose another "
        "--out-dir, or --overwrite to replace it"
    )
    assert (shard_set / MANIFEST).read_bytes() == before


def test_bad_input_is_one_line(tiny_data, tmp_path, capsys, make_image):
    missing = tmp_path / "gone.jpg"
    make_image(missing)
    listed = tmp_path / "list.txt"
    write_list(listed, [(str(missing), 0), (str(tmp_path / "other.jpg"), 1)])
    assert make_shards_main([str(listed), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other.jpg: image file listed at " in err[0] and "list.txt:" in err[0]
    assert not (tmp_path / "out" / MANIFEST).exists()
    with pytest.raises(SystemExit):
        make_shards_main([str(listed), "--out-dir", str(tmp_path / "o"), "--shard-size", "big"])
    assert "a size such as 64MB" in capsys.readouterr().err


def test_verify_leaves_out_and_names_what_fails(tmp_path, capsys, make_image):
    good = [make_image(tmp_path / f"c{k % 2}" / f"{k}.jpg") for k in range(6)]
    bad = tmp_path / "c1" / "cut.jpg"
    bad.write_bytes(open(good[1], "rb").read()[:300])  # noqa: SIM115 - a truncated JPEG
    listed = tmp_path / "list.txt"
    write_list(listed, [(p, k % 2) for k, p in enumerate(good)] + [(str(bad), 1)])
    out = tmp_path / "out"
    assert make_shards_main([str(listed), "--out-dir", str(out), "--verify", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"excluded: {bad}: " in printed and "1 excluded by --verify" in printed
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["num_samples"] == 6 and manifest["classes"] is None  # no classes.txt
    assert manifest["num_classes"] == 2


def test_shard_sizes_are_planned_to_the_byte():
    assert parse_size("64MB") == 64_000_000 and parse_size("512MiB") == 512 * 2**20
    assert tar_bytes(0) == 10240  # an empty archive: two zero blocks, padded to a record


# --- reading: every backend, the semantics of lists ----------------------------------------


@pytest.fixture(scope="module")
def ordered_list(shard_set, tiny_data, tmp_path_factory):
    """A list file of the shard set's own samples in the set's order (matched by bytes), with
    its classes.txt: what the loaders must read identically from the shards."""
    import shutil

    from pipelines.shards import read_shard_table

    table = read_shard_table(str(shard_set))
    by_bytes = {}
    for sample in read_list(tiny_data.train_list):
        with open(sample.path, "rb") as f:
            by_bytes[f.read()] = sample.path
    folder = tmp_path_factory.mktemp("ordered")
    listed = folder / "Train.txt"
    write_list(listed, [(by_bytes[table.source(i)], int(table.labels[i])) for i in range(120)])
    shutil.copy(shard_set / "classes.txt", folder / "classes.txt")
    return listed


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_shards_give_the_very_batches_of_the_same_list(shard_set, ordered_list, backend):
    import torch

    from pipelines import build_loader

    for train in (True, False):
        batches = []
        for source in (ordered_list, shard_set):
            loader = build_loader(
                str(source), train=train, backend=backend, batch_size=16, image_size=32,
                num_threads=1, seed=3, world_size=2, rank=1,
            )  # fmt: skip
            if train:
                loader.set_epoch(2)
            batches.append([(x.clone(), y.clone()) for x, y in loader])
        assert len(batches[0]) == len(batches[1]) > 0
        for (x0, y0), (x1, y1) in zip(*batches, strict=True):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)


def broken_copy(shard_set, tmp_path, damage) -> str:
    import shutil

    out = tmp_path / "set"
    shutil.copytree(shard_set, out)
    damage(out)
    return str(out)


def test_a_missing_or_truncated_shard_or_a_wrong_index_is_one_line_at_start(shard_set, tmp_path):
    from pipelines import build_loader
    from pipelines.shards import ShardError

    def build(path):
        return build_loader(path, train=True, backend="dali", batch_size=8, image_size=32)

    gone = broken_copy(shard_set, tmp_path / "a", lambda d: (d / "shard-000001.tar").unlink())
    with pytest.raises(ShardError, match=r"shard-000001.tar: shard listed in manifest.json "):
        build(gone)
    cut = broken_copy(
        shard_set, tmp_path / "b", lambda d: os.truncate(d / "shard-000002.tar", 5000)
    )
    with pytest.raises(ShardError, match=r"shard-000002.tar: 5000 bytes, its manifest says "):
        build(cut)

    def drop_a_line(d):
        lines = (d / "shard-000000.idx").read_text().splitlines()
        (d / "shard-000000.idx").write_text("\n".join(lines[:-1]) + "\n")

    other = broken_copy(shard_set, tmp_path / "c", drop_a_line)
    with pytest.raises(ShardError, match=r"shard-000000.idx: .* the manifest does not match"):
        build(other)


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_a_corrupt_image_inside_a_shard_is_named_with_its_member(shard_set, tmp_path, backend):
    from pipelines import ImageError, build_loader
    from pipelines.shards import read_shard_table

    table = read_shard_table(str(shard_set))
    victim = 40  # its bytes overwritten in place: the shard keeps its size, the JPEG breaks
    name = table.path(victim).split(os.sep)[-1]

    def corrupt(d):
        with open(d / name.split(":")[0], "r+b") as f:
            f.seek(int(table.offsets[victim]) + 20)
            f.write(b"\x00" * int(table.sizes[victim] - 40))

    broken = broken_copy(shard_set, tmp_path, corrupt)
    loader = build_loader(
        broken, train=False, backend=backend, batch_size=8, image_size=32, num_threads=1
    )
    with pytest.raises(ImageError) as failed:
        for _ in loader:
            pass
    assert str(failed.value).startswith(os.path.join(broken, name) + ": ")


# --- the trainer on shards -------------------------------------------------------------


@pytest.fixture(scope="module")
def val_set(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("val_shards") / "set"
    flags = [tiny_data.val_list, "--out-dir", str(out), "--shard-size", "100KB", "--workers", "1"]
    assert make_shards_main(flags) == 0
    return out


@pytest.mark.slow
def test_two_ranks_train_from_shards_and_resume_mid_epoch_bit_for_bit(
    shard_set, val_set, shard_reference, tiny_data, tmp_path
):
    # Validating on the val shard set this time: the same figures as on the val list.
    import signal

    from test_trainer import (
        assert_same_val_figures,
        assert_same_weights,
        run,
        start,
        tiny_flags,
        torchrun,
        wait_for_line,
    )

    def flags(out, *extra):
        return tiny_flags(
            tiny_data, out, "--train-list", str(shard_set), "--val-list", str(val_set),
            "--epochs", "2", "--log-interval", "1", *extra,
        )  # fmt: skip

    out = tmp_path / "stopped"
    proc = start(torchrun(2) + flags(out), cwd=tmp_path)
    seen = wait_for_line(proc, "epoch 2/2 step 2/7")
    assert any("120 train / 40 val images" in line for line in seen)
    proc.send_signal(signal.SIGTERM)  # as a scheduler does; torchrun forwards it to each rank
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in stderr.splitlines() if ln.startswith("stopped by SIGTERM")]
    assert lines == [  # once, from rank 0
        f"stopped by SIGTERM (a preemption, Ctrl-C, or torchrun ending the job after another "
        f"rank failed); saved {out / 'last.pt'} at this step: continue with --resume auto"
    ]
    resumed = run(torchrun(2) + flags(out, "--resume", "auto"), cwd=tmp_path)
    assert "resuming epoch 2 at step" in resumed.stdout
    assert_same_weights(out, shard_reference)
    assert_same_val_figures(out, shard_reference)


def test_the_trainer_names_a_missing_shard_in_one_line(shard_set, val_set, tmp_path, capsys):
    from test_trainer_faults import fails

    broken = broken_copy(shard_set, tmp_path, lambda d: (d / "shard-000000.tar").unlink())
    flags = [*base_flags_for(broken, val_set, tmp_path / "out")]
    fails(capsys, flags, f"{broken}/shard-000000.tar: shard listed in manifest.json")
    folder = tmp_path / "not_a_set"
    folder.mkdir()
    fails(
        capsys,
        base_flags_for(folder, val_set, tmp_path / "o2"),
        "a folder, not a list file",
        "holds manifest.json",
    )


def base_flags_for(train, val, out) -> list[str]:
    return [
        "--train-list", str(train), "--val-list", str(val), "--arch", "resnet18",
        "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--workers", "1",
        "--no-plots", "--output-dir", str(out),
    ]  # fmt: skip


def test_every_process_reads_a_set_with_the_same_codes(shard_set):
    """The node check compares the ranks' digests of the set: the codes of its image kinds
    (.jpg, .png) must not follow a process's string hashing (PYTHONHASHSEED)."""
    import subprocess
    import sys

    script = (
        "import sys; from pipelines.shards import read_shard_table; "
        "t = read_shard_table(sys.argv[1]); print(t.ext_names, t.exts.tobytes().hex())"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seen = {
        subprocess.run(
            [sys.executable, "-c", script, str(shard_set)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": repo},
            check=True,
        ).stdout  # fmt: skip
        for seed in range(6)
    }
    assert len(seen) == 1 and "png" in seen.pop()  # two kinds, one order in every process
