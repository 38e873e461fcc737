"""Data in a bucket (``s3://``), against a real S3-compatible server on 127.0.0.1 (moto's,
started by the ``s3_server`` fixture): nothing of S3 is mocked inside the process. DALI reads
the URLs with the AWS SDK inside its wheel, everything else through boto3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from pipelines import s3
from pipelines.lists import read_list

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def tool(name: str, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(TOOLS, name), *args],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


@pytest.fixture
def bucket(s3_env, tiny_data, shard_set, tmp_path, monkeypatch):
    """A fresh bucket holding the tiny tree (with its lists) under tiny/ and its train shard
    set under shards/; the node's cache in tmp_path."""
    name = f"b{abs(hash(str(tmp_path))) % 10**9}"
    s3_env.upload_tree(tiny_data.root, f"s3://{name}/tiny")
    s3_env.upload_tree(shard_set, f"s3://{name}/shards")
    monkeypatch.setenv("DALI_RESNET_TRAINER_CACHE", str(tmp_path / "cache"))
    return f"s3://{name}"


def batches(source, *, backend: str, train: bool):
    from pipelines import build_loader

    loader = build_loader(
        str(source), train=train, backend=backend, batch_size=16, image_size=32,
        num_threads=1, seed=3, world_size=2, rank=1,
    )  # fmt: skip
    loader.set_epoch(2)
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same(got, want) -> None:
    assert len(got) == len(want) > 0
    for (x0, y0), (x1, y1) in zip(got, want, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_a_list_and_a_shard_set_in_a_bucket_give_the_batches_of_their_local_copies(
    bucket, tiny_data, shard_set, backend, capsys
):
    # The tiny lists hold relative paths: in the bucket they resolve under the list's prefix.
    for train in (True, False):
        local = tiny_data.train_list if train else tiny_data.val_list
        remote = f"{bucket}/tiny/{os.path.basename(local)}"
        assert_same(
            batches(remote, backend=backend, train=train),
            batches(local, backend=backend, train=train),
        )
    # A shard set is copied once to the node's cache (the log says so), then read there.
    assert_same(
        batches(f"{bucket}/shards", backend=backend, train=True),
        batches(shard_set, backend=backend, train=True),
    )
    assert "copying 11 files" in capsys.readouterr().err  # 5 shards, their indexes, manifest
    batches(f"{bucket}/shards/manifest.json", backend=backend, train=False)
    assert "copying" not in capsys.readouterr().err  # the copy is whole: nothing fetched again


def test_the_cache_fetches_a_shard_again_when_the_bucket_holds_another(bucket, shard_set):
    from pipelines.shards import fetch_shard_set, read_shard_table

    folder = fetch_shard_set(f"{bucket}/shards")
    before = read_shard_table(folder)
    # Another set written over the first one: same names, other bytes.
    client = s3.client()
    bucket_name = s3.split(bucket)[0]
    data = (shard_set / "shard-000001.tar").read_bytes()
    client.put_object(Bucket=bucket_name, Key="shards/shard-000001.tar", Body=data[::-1])
    fetch_shard_set(f"{bucket}/shards")
    with open(os.path.join(folder, "shard-000001.tar"), "rb") as f:
        assert f.read() == data[::-1]
    assert len(read_shard_table(folder)) == len(before)


@pytest.mark.slow
def test_make_lists_on_a_bucket_and_make_shards_into_one(bucket, tiny_data, tmp_path):
    lists = tmp_path / "lists"
    done = tool("make_lists.py", f"{bucket}/tiny", "--out-dir", str(lists), "--verify")
    assert done.returncode == 0, done.stderr
    assert "(split layout)" in done.stdout and "160 images checked, 0 excluded" in done.stdout
    # The same samples as the local tree's lists, each an s3:// URL.
    root = tiny_data.root.rstrip("/") + "/"
    for name in ("Train.txt", "Test.txt"):
        local = [
            (s.path.replace(root, f"{bucket}/tiny/"), s.label)
            for s in read_list(os.path.join(tiny_data.root, name))
        ]
        remote = [(s.path, s.label) for s in read_list(lists / name)]
        assert remote == local
    with open(tiny_data.classes_file, encoding="utf-8") as f:
        assert (lists / "classes.txt").read_text() == f.read()
    # Into the bucket, from a list of URLs: the very bytes a local run writes.
    remote_set = f"{bucket}/made"
    done = tool(
        "make_shards.py", str(lists / "Train.txt"), "--out-dir", remote_set, "--shard-size",
        "100KB", "--workers", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    local_set = tmp_path / "local_set"
    done = tool(
        "make_shards.py", tiny_data.train_list, "--out-dir", str(local_set), "--shard-size",
        "100KB", "--workers", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    objects = {s3.basename(u): u for u, _, _ in s3.list_objects(remote_set + "/")}
    tars = sorted(n for n in objects if n.endswith(".tar"))
    assert tars == sorted(p.name for p in local_set.glob("*.tar")) and len(tars) == 8
    for name in tars:
        assert s3.read_bytes(objects[name]) == (local_set / name).read_bytes()
    again = tool("make_shards.py", str(lists / "Train.txt"), "--out-dir", remote_set)
    assert again.returncode == 2 and "a shard set is already there" in again.stderr


@pytest.mark.slow
def test_bucket_problems_are_one_line_naming_the_url(bucket, tmp_path, monkeypatch):
    from pipelines import build_loader
    from pipelines.lists import ListError
    from pipelines.shards import ShardError

    def build(source):
        return build_loader(source, train=True, backend="dali", batch_size=8, image_size=32)

    with pytest.raises(s3.S3Error, match=r"^s3://no-such-bucket/Train.txt: no such bucket$"):
        build("s3://no-such-bucket/Train.txt")
    with pytest.raises(ListError, match=rf"^{bucket}/tiny/Nope.txt: list file not found$"):
        build(f"{bucket}/tiny/Nope.txt")
    # An image listed but not in the bucket: named with its list line, before the first step.
    listed = f"{bucket}/tiny/gone.txt"
    s3.write_bytes(listed, b"train/red_horizontal_stripes/train_0000.jpg 0\nnot/there.jpg 1\n")
    with pytest.raises(
        FileNotFoundError,
        match=rf"^{bucket}/tiny/not/there.jpg: image listed at {listed}:2 cannot be read \(no such object\)$",
    ):
        build(listed)
    # A shard listed in the manifest that the bucket lacks.
    s3.client().delete_object(Bucket=s3.split(bucket)[0], Key="shards/shard-000003.tar")
    with pytest.raises(
        ShardError,
        match=rf"^{bucket}/shards/shard-000003.tar: listed in manifest.json but not in the bucket",
    ):
        build(f"{bucket}/shards")
    # No credentials at all, and an endpoint nobody serves: one line each.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    s3._clients.clear()
    with pytest.raises(s3.S3Error, match=r": no AWS credentials found \(set AWS_ACCESS_KEY_ID"):
        build(f"{bucket}/tiny/Train.txt")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    from conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    s3._clients.clear()
    with pytest.raises(
        s3.S3Error, match=r"Train.txt: cannot reach the S3 endpoint http://127.0.0.1:"
    ):
        build(f"{bucket}/tiny/Train.txt")


def test_the_trainer_says_a_missing_bucket_in_one_line(bucket, tmp_path, capsys):
    from test_trainer_faults import fails

    flags = [
        "--train-list", "s3://no-such-bucket/Train.txt", "--arch", "resnet18", "--image-size",
        "32", "--batch-size", "8", "--epochs", "1", "--workers", "1", "--output-dir",
        str(tmp_path / "out"),
    ]  # fmt: skip
    fails(capsys, flags, "s3://no-such-bucket/Train.txt: no such bucket")


@pytest.mark.slow
def test_two_ranks_train_resume_and_predict_from_a_bucket(
    bucket, shard_reference, tiny_data, tmp_path, capsys
):
    """Train from the shard set in the bucket (validating on the list of URLs), kill a rank
    mid-epoch, resume: the weights of an uninterrupted run on the set's local copy, bit for
    bit. Then predict on the bucket's val list: the run's own val top-1. No secret lands in
    any file."""
    from test_trainer import (
        assert_same_val_figures,
        assert_same_weights,
        run,
        start,
        tiny_flags,
        torchrun,
        wait_for_line,
        worker_pids,
    )

    def flags(out, *extra):
        return tiny_flags(
            tiny_data, out, "--train-list", f"{bucket}/shards", "--val-list",
            f"{bucket}/tiny/Test.txt", "--epochs", "2", "--log-interval", "1", *extra,
        )  # fmt: skip

    # kill -9 of a rank (tests/test_shards.py stops its run with SIGTERM): the run resumes
    # from its last step checkpoint.
    out = tmp_path / "killed"
    proc = start(torchrun(2) + flags(out, "--checkpoint-every", "2"), cwd=tmp_path)
    seen = wait_for_line(proc, "epoch 2/2 step 5/7")
    assert any("120 train / 40 val images" in line for line in seen)
    os.kill(worker_pids(proc)[0], signal.SIGKILL)
    _, stopped_stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    resumed = run(
        torchrun(2) + flags(out, "--checkpoint-every", "2", "--resume", "auto"), cwd=tmp_path
    )
    assert "resuming epoch 2 at step 5" in resumed.stdout, resumed.stdout  # after step 4
    assert_same_weights(out, shard_reference)
    assert_same_val_figures(out, shard_reference)

    # Predictions on the bucket's val list are those on its local copy, line for line (in
    # this process: test_predict.py runs the command itself).
    from test_predict import predict_main

    def predict(source: str) -> list[str]:
        assert predict_main(["--model", str(out / "model.pt"), source]) == 0
        printed = capsys.readouterr().out.splitlines()
        # A busy machine's torch-threads note may differ between the two.
        return [line for line in printed if not line.startswith("note: torch ran")]

    lines = predict(f"{bucket}/tiny/Test.txt")
    assert len(lines) == 40 + 2 and "over 40 labelled images" in lines[-2]
    root = tiny_data.root.rstrip("/") + "/"
    local = [line.replace(root, f"{bucket}/tiny/") for line in predict(tiny_data.val_list)]
    assert lines[:-1] == local[:-1]
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    for path in out.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path
    printed = "".join(seen) + stopped_stderr + resumed.stdout + resumed.stderr
    assert secret.decode() not in printed


@pytest.mark.slow
def test_an_endpoint_lost_mid_epoch_is_one_line_and_resume_continues(
    tiny_data, tmp_path, monkeypatch
):
    """The server dies mid-epoch while a list of URLs is read: the run stops with one line
    naming the image's URL, and once the server is back --resume auto finishes the run."""
    from conftest import start_s3_server
    from test_trainer import read_metrics, run, start, tiny_flags

    server = start_s3_server()
    try:
        # One attempt a request (boto3 and DALI's SDK read it): the dead endpoint is found
        # at once, not after the retries a real run wants.
        for name, value in {**server.env(), "AWS_MAX_ATTEMPTS": "1"}.items():
            monkeypatch.setenv(name, value)
        s3._clients.clear()
        server.upload_tree(tiny_data.root, "s3://lost/tiny")
        flags = tiny_flags(
            tiny_data, tmp_path / "out", "--train-list", "s3://lost/tiny/Train.txt",
            "--epochs", "1", "--log-interval", "1", "--checkpoint-every", "4",
        )  # fmt: skip
        proc = start(
            [
                sys.executable,
                "-u",
                os.path.join(os.path.dirname(TOOLS), "trainer", "main.py"),
                *flags,
            ],
            cwd=tmp_path,
        )
        for line in proc.stdout:
            if "epoch 1/1 step 5/" in line:  # after the step checkpoint at step 4
                break
        server.process.kill()
        server.process.wait()
        out, err = proc.communicate(timeout=300)
        assert proc.returncode != 0
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, err
        assert "s3://lost/tiny/" in errors[0] and "cannot reach the S3 endpoint" in errors[0]
        assert "continue with --resume auto" in errors[0] and "Traceback" not in err
        server = start_s3_server(server.port)  # back, empty: the data put there again
        s3._clients.clear()
        server.upload_tree(tiny_data.root, "s3://lost/tiny")
        resumed = run(
            [
                sys.executable,
                os.path.join(os.path.dirname(TOOLS), "trainer", "main.py"),
                *flags,
                "--resume",
                "auto",
            ],
            cwd=tmp_path,
        )
        # From its last step checkpoint, mid-epoch.
        assert "resuming epoch 1 at step" in resumed.stdout, resumed.stdout
        assert [m["epoch"] for m in read_metrics(tmp_path / "out")] == [1]
    finally:
        server.process.kill()


def test_the_data_sources_benchmark_reads_the_same_images_four_ways(
    s3_env, tiny_data, tmp_path, capsys
):
    import json

    from benchmarks import data_sources

    out = tmp_path / "sources.json"
    cache = os.environ.get("DALI_RESNET_TRAINER_CACHE")
    argv = [
        "--list", tiny_data.train_list, "--s3-url", "s3://sources-bench/run", "--batch-size",
        "8", "--image-size", "32", "--threads", "1", "--iters", "2", "--repeats", "2",
        "--warmup", "1", "--shard-size", "100KB", "--json", str(out),
    ]  # fmt: skip
    assert data_sources.main(argv) == 0
    table = capsys.readouterr().out
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")]
    assert rows == ["| source", "| files", "| local shards", "| s3 shards", "| s3 files"]
    results = json.loads(out.read_text())["results"]
    for name in data_sources.SOURCES:
        assert len(results[name]["loader_windows"]) == 2
        assert results[name]["loader_images_per_sec"] > 0
    assert os.environ.get("DALI_RESNET_TRAINER_CACHE") == cache  # the run's own, then gone
