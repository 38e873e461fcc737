"""The trainer end to end: real torchrun, two ranks over gloo, real DALI (CPU) on tiny data.

One uninterrupted training run (module fixture) serves most assertions and is the reference
that interrupted runs must end at, bit for bit: runs stopped the way users' runs stop (SIGTERM
to torchrun, kill -9 of one worker process) and resumed. Settings: resnet18, 32 px crops,
batch 8 per rank, AdamW (steadier than SGD on 7 steps per epoch), EMA 0.9, 3 epochs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import types

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "trainer", "main.py")
BIN = os.path.dirname(sys.executable)
EPOCHS = 3
BATCH = 8
METRIC_KEYS = {
    "epoch", "train_loss", "val_top1", "val_top5", "val_loss", "images_per_sec_per_gpu",
    "data_wait_fraction", "lr", "elapsed",
}  # fmt: skip


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    # Not one rank of an outer job (torchrun's or srun's): each test starts its own.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
        out.pop(key, None)
    out.update(extra)
    return out


def torchrun(nproc: int) -> list[str]:
    return [os.path.join(BIN, "torchrun"), "--standalone", f"--nproc_per_node={nproc}", MAIN]


def tiny_flags(tiny_data, output_dir, *extra: str) -> list[str]:
    return [
        "--train-list", tiny_data.train_list, "--arch", "resnet18", "--image-size", "32",
        "--batch-size", str(BATCH), "--optimizer", "adamw", "--lr", "0.002",
        "--warmup-epochs", "1", "--epochs", str(EPOCHS), "--workers", "1",
        "--log-interval", "4", "--ema-decay", "0.9", "--output-dir", str(output_dir),
        # Pictures cost a run about a second of matplotlib: drawn where a test looks at them.
        "--no-plots", *extra,
    ]  # fmt: skip


def run(cmd: list[str], *, cwd, timeout: float = 300, check: bool = True, **env_extra):
    start = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=cwd, env=env(**env_extra), capture_output=True, text=True, timeout=timeout
    )
    proc.elapsed = time.monotonic() - start
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def read_metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """The reference run, once per session (also across xdist workers): its folder, and
    what it printed (``.stdout``, ``.stderr``)."""
    from conftest import build_once

    def train(out):
        proc = run(torchrun(2) + tiny_flags(tiny_data, out, "--plots"), cwd=out)
        return {"stdout": proc.stdout, "stderr": proc.stderr}

    out, printed = build_once(tmp_path_factory, "trained", train)
    return out, types.SimpleNamespace(**printed)


@pytest.mark.slow
def test_two_ranks_learn(trained):
    out, proc = trained
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == list(range(1, EPOCHS + 1))
    for record in metrics:
        assert record.keys() >= METRIC_KEYS
        assert record["images_per_sec_per_gpu"] > 0
        assert 0.0 <= record["data_wait_fraction"] <= 1.0
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert max(m["val_top1"] for m in metrics) > 30.0  # 10 classes: chance is 10%
    # The first batch as the model saw it, drawn once by rank 0 (matplotlib is in the test extra).
    assert (out / "train_batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.stdout.count("the first batch as the model sees it:") == 1
    assert metrics[-1]["val_top5"] >= metrics[-1]["val_top1"]
    # The lr of each epoch's last optimizer step (21 steps; --warmup-epochs 1 is cut to a
    # quarter of the run, 5 steps, and said): one step into the cosine's 16, then its last
    # value, one step short of 0.
    assert "warming up for 0.75 epochs instead" in proc.stdout
    assert metrics[0]["lr"] == pytest.approx(0.002 * 0.5 * (1 + math.cos(math.pi * 1 / 16)))
    assert metrics[-1]["lr"] == pytest.approx(0.002 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    # 120 images, 2 ranks x 7 steps x 8: the 8 of no whole global batch are said to be left out.
    assert "7 steps/epoch (8 images left out of each, drawn anew)" in proc.stdout
    # Rank 0 alone prints: each epoch summary once, not once per rank.
    assert proc.stdout.count(f"epoch {EPOCHS}/{EPOCHS} done") == 1
    # Progress lines: share of the epoch, speed, and the time left in the epoch and the run.
    assert f"epoch 1/{EPOCHS} step 4/7 (57%)" in proc.stdout
    assert " eta epoch " in proc.stdout and " run " in proc.stdout
    # The same records as a CSV and as a picture.
    with open(out / "metrics.csv", encoding="utf-8") as f:
        rows = f.read().splitlines()
    assert len(rows) == EPOCHS + 1 and rows[0].startswith("epoch,train_loss")
    assert (out / "metrics.png").stat().st_size > 1000
    assert f"loss and top-1 per epoch: {out / 'metrics.png'}" in proc.stdout
    # Per-class figures of the exported weights, after the last epoch.
    with open(out / "per_class.csv", encoding="utf-8") as f:
        per_class = f.read().splitlines()
    assert per_class[0] == "class,images,top1,precision,recall" and len(per_class) == 11
    assert "worst classes by top-1: " in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_checkpoints_and_config(trained, tiny_data):
    out, _ = trained
    last = load(out / "last.pt")
    best = load(out / "best.pt")
    assert last["epoch"] == EPOCHS
    assert {"model", "optimizer", "scaler", "scheduler", "best_top1", "config", "rng"} <= set(last)
    # --ema-decay 0.9: the average is saved, differs from the weights, and is evaluated.
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items() if k != "n_averaged"}
    assert ema.keys() == last["model"].keys()
    assert int(last["ema"]["n_averaged"]) == EPOCHS * 7  # one update per optimizer step
    assert not torch.equal(ema["fc.weight"], last["model"]["fc.weight"])
    records = read_metrics(out)
    assert all(r["val_top1_ema"] is not None and r["val_loss_ema"] > 0 for r in records)
    assert last["best_top1"] == max(max(r["val_top1"], r["val_top1_ema"]) for r in records)
    exported = load(out / "model.pt")
    final = records[-1]
    assert exported["weights"] == ("raw" if final["val_top1"] > final["val_top1_ema"] else "ema")
    source = last["model"] if exported["weights"] == "raw" else ema
    assert all(torch.equal(exported["model"][k], source[k]) for k in source)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in last["model"])
    assert best["best_top1"] == last["best_top1"]
    with open(tiny_data.classes_file, encoding="utf-8") as f:
        assert last["class_names"] == f.read().split()
    with open(out / "config.toml", "rb") as f:
        saved = tomllib.load(f)
    # The same resolved settings in both places, data defaults filled in.
    assert saved == {k: v for k, v in last["config"].items() if v is not None}
    assert saved["arch"] == "resnet18" and saved["lr"] == 0.002 and saved["batch_size"] == BATCH
    assert saved["val_list"] == tiny_data.val_list and saved["num_classes"] == 10
    assert not [p for p in os.listdir(out) if ".tmp" in p]  # atomic writes leave no debris


TORCHVISION_ONLY = r"""
import json, os, sys
import PIL.Image, torch, torchvision, torchvision.transforms.v2 as T
model_file, val_list = sys.argv[1], sys.argv[2]
m = torch.load(model_file, map_location="cpu", weights_only=True); p = m["preprocessing"]
net = torchvision.models.get_model(m["arch"], num_classes=len(m["class_names"])).eval()
net.load_state_dict(m["model"])
tf = T.Compose([T.ToImage(), T.Resize(p["resize_size"]), T.CenterCrop(p["image_size"]),
                T.ToDtype(torch.float32, scale=True), T.Normalize(p["mean"], p["std"])])
correct = total = 0
base = os.path.dirname(val_list)
with torch.no_grad():
    for line in open(val_list):
        path, label = line.rsplit(None, 1)
        image = PIL.Image.open(os.path.join(base, path)).convert("RGB")
        correct += int(net(tf(image)[None]).argmax()) == int(label)
        total += 1
ours = [k for k in sys.modules if k.split(".")[0] in ("trainer", "pipelines")]
print(json.dumps({"top1": 100.0 * correct / total, "ours": ours, "classes": m["class_names"]}))
"""


@pytest.mark.slow
def test_model_pt_loads_with_torchvision_only(trained, tiny_data):
    out, _ = trained
    proc = run(
        [sys.executable, "-c", TORCHVISION_ONLY, str(out / "model.pt"), tiny_data.val_list],
        cwd=out,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ours"] == []
    assert len(result["classes"]) == tiny_data.num_classes
    # PIL float32 vs DALI bf16 preprocessing: the same model within a few of 40 images.
    final = read_metrics(out)[-1]["val_top1"]
    assert abs(result["top1"] - final) <= 12.5, (result["top1"], final)


@pytest.mark.slow
def test_distributed_eval_equals_single_process(trained, tiny_data, tmp_path):
    out, _ = trained
    # 39 val images in batches of 19: rank 0 gets 19 (one batch), rank 1 gets 20 (two), so
    # the ranks run different numbers of batches and one batch is a 1-image tail.
    with open(tiny_data.val_list) as f:
        lines = [ln for ln in f if ln.strip()][:39]
    val_list = tmp_path / "val39.txt"
    val_list.write_text("".join(os.path.join(tiny_data.root, ln) for ln in lines))
    flags = tiny_flags(tiny_data, tmp_path / "x") + [
        "--val-list", str(val_list), "--classes", tiny_data.classes_file, "--batch-size", "19",
        "--eval-only", "--resume", str(out / "last.pt"), "--plots",
    ]  # fmt: skip
    # One process, no launcher at all.
    single = tmp_path / "single"
    run([sys.executable, MAIN, *flags, "--output-dir", str(single)], cwd=tmp_path)
    # Two processes through the legacy launcher, which passes --local-rank=N to the script.
    double = tmp_path / "double"
    legacy = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2"]
    proc = run([*legacy, "--standalone", MAIN, *flags, "--output-dir", str(double)], cwd=tmp_path)
    assert proc.stdout.count("eval: top1") == 1
    with open(single / "eval.json") as f:
        one = json.load(f)
    with open(double / "eval.json") as f:
        two = json.load(f)
    assert one["val_images"] == two["val_images"] == 39  # every val image exactly once
    # What was scored is kept with the figures.
    assert one["weights"] == str(out / "last.pt") and one["epoch"] == two["epoch"] >= 1
    assert one["val_list"] == str(val_list)
    assert two["val_top1"] == pytest.approx(one["val_top1"], abs=1e-6)
    assert two["val_top5"] == pytest.approx(one["val_top5"], abs=1e-6)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-3)
    assert one["val_top1"] > 10.0  # a trained model, not a constant guess
    # Per class too: the all-reduced confusion matrix counts each image once, as one process.
    for name in ("per_class.csv", "confusion_matrix.csv"):
        assert (single / name).read_text() == (double / name).read_text()
    with open(single / "confusion_matrix.csv", newline="") as f:
        rows = list(csv.reader(f))
    counts = [[int(v) for v in row[1:]] for row in rows[1:]]
    assert sum(map(sum, counts)) == 39
    assert 100.0 * sum(counts[i][i] for i in range(10)) / 39 == pytest.approx(one["val_top1"])
    with open(single / "per_class.csv", newline="") as f:
        per_class = list(csv.DictReader(f))
    assert [r["class"] for r in per_class] == rows[0][1:]
    assert sum(int(r["images"]) for r in per_class) == 39
    assert (single / "confusion_matrix.png").stat().st_size > 1000
    assert "worst classes by top-1: " in proc.stdout


@pytest.mark.slow
def test_eval_only_in_a_run_folder_writes_beside_it(trained, tiny_data, tmp_path):
    # --eval-only --resume auto into the training run's own folder: the run's config.toml
    # and per-class files stay as they were; the evaluation gets eval-1/.
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    before = {n: (out / n).read_bytes() for n in ("config.toml", "per_class.csv")}
    flags = tiny_flags(tiny_data, out, "--eval-only", "--resume", "auto")
    proc = run([sys.executable, MAIN, *flags], cwd=tmp_path)
    assert f"eval-only: results in {out / 'eval-1'}" in proc.stdout
    assert {n: (out / n).read_bytes() for n in before} == before
    assert (out / "eval-1" / "eval.json").is_file() and (out / "eval-1" / "config.toml").is_file()
    from trainer.run_dir import eval_results_dir, unlock_output_dir

    assert eval_results_dir(str(out)) == str(out / "eval-2")
    assert eval_results_dir(str(tmp_path / "fresh")) == str(tmp_path / "fresh")
    unlock_output_dir()  # the evaluation's lock on fresh/


def test_eval_only_writes_beside_a_run_starting_in_its_folder(tmp_path):
    # A run locks its folder at start but writes config.toml only once its data and loaders
    # are ready: an --eval-only into the folder in between wrote its config.toml, eval.json
    # and per-class files there, and the run then wrote over and beside them (the folder
    # held the run's results with another model's eval.json).
    import fcntl

    from trainer.run_dir import eval_results_dir, unlock_output_dir

    starting = tmp_path / "starting"
    starting.mkdir()
    run_lock = os.open(starting, os.O_RDONLY)  # the run's own lock, as lock_output_dir takes it
    try:
        fcntl.flock(run_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert eval_results_dir(str(starting)) == str(starting / "eval-1")
    finally:
        os.close(run_lock)
    # An evaluation writing into a folder of its own holds it: a run started there (which
    # locks it at its check, or once it made the folder) is refused, as beside another run.
    fresh = tmp_path / "fresh"
    try:
        assert eval_results_dir(str(fresh)) == str(fresh)
        other = os.open(fresh, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    finally:
        unlock_output_dir()


@pytest.mark.slow
def test_saved_weights_evaluate_as_the_two_rank_run_did(trained, tiny_data, tmp_path):
    # Without SyncBN each rank's BatchNorm running statistics follow its own last batches;
    # they are averaged over ranks before evaluation and saving, so the epoch's 2-rank val
    # figures are those of the saved weights evaluated by one process.
    out, _ = trained
    flags = tiny_flags(tiny_data, tmp_path / "x", "--eval-only", "--resume", str(out / "last.pt"))
    run([sys.executable, MAIN, *flags, "--output-dir", str(tmp_path / "one")], cwd=tmp_path)
    with open(tmp_path / "one" / "eval.json") as f:
        one = json.load(f)
    final = read_metrics(out)[-1]
    assert one["val_images"] == 40
    assert one["val_top1"] == pytest.approx(final["val_top1"], abs=1e-6)
    assert one["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)


# --- two torchrun "nodes" on this machine (c10d rendezvous on localhost, one process each):
# every rank has local rank 0, so a trainer sharding by local rank would feed both nodes the
# same half of each epoch. The run must retrace the one-node, two-process run exactly.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_nodes(
    flags: list[str], *, cwd, node1_extra: list[str] = (), **env_extra
) -> list[subprocess.Popen]:
    """Start both nodes; ``cwd`` is one folder or one per node (a node's own disk);
    ``node1_extra``: flags node 1 alone gets after ``flags``."""
    cwds = cwd if isinstance(cwd, list | tuple) else [cwd, cwd]
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            os.path.join(BIN, "torchrun"),
            "--nnodes=2",
            f"--node-rank={node}",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            # Both "nodes" resolve to this host: say which one serves the rendezvous store.
            f"--rdzv-conf=is_host={'true' if node == 0 else 'false'}",
            "--rdzv-id=multinode-test",
            MAIN,
            *flags,
            *(node1_extra if node == 1 else ()),
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=cwds[node],
                env=env(**env_extra),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 300):
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def two_nodes(flags: list[str], *, cwd, timeout: float = 300, **env_extra):
    return finish(start_two_nodes(flags, cwd=cwd, **env_extra), timeout)


@pytest.mark.slow
def test_srun_tasks_are_ranks_and_a_preempted_job_resumes_bit_for_bit(trained, tiny_data, tmp_path):
    # `srun -n 2 python trainer/main.py`: Slurm starts both processes and says who each is in
    # SLURM_* variables only (no RANK, no MASTER_ADDR). Each must be one rank of one job, not
    # a launcher of its own (two separate runs into one folder), and train exactly what
    # torchrun's two processes train. The variables are the ones srun sets for such a step.
    # Preempted mid-epoch (Slurm sends every task SIGTERM; tests/test_shards.py stops a
    # torchrun job, whose agent forwards it), the job saves at one step and resumes there.
    reference_dir, _ = trained
    out = tmp_path / "srun"

    def srun(*extra: str) -> list[subprocess.Popen]:
        slurm = {
            "SLURM_JOB_ID": "4242",
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_STEP_NODELIST": "127.0.0.1",
            "SLURM_STEP_TASKS_PER_NODE": "2",
            "SLURMD_NODENAME": "127.0.0.1",
            "SLURM_NODEID": "0",
            "MASTER_PORT": str(free_port()),
        }
        return [
            start(
                [sys.executable, MAIN, *tiny_flags(tiny_data, out, *extra)],
                cwd=tmp_path,
                **slurm,
                SLURM_PROCID=str(task),
                SLURM_LOCALID=str(task),
            )
            for task in (0, 1)
        ]

    tasks = srun("--log-interval", "1")
    seen = wait_for_line(tasks[0], f"epoch 2/{EPOCHS} step 3/7")
    assert not any("starting" in line for line in seen)
    assert any("on 2 x cpu" in line for line in seen)
    for task in tasks:
        task.send_signal(signal.SIGTERM)
    stopped = finish(tasks, timeout=120)
    assert all(task.returncode != 0 for task in stopped)
    assert stopped[1].stdout == ""  # rank 1 prints nothing: rank 0 speaks for the job
    saved = load(out / "last.pt")
    assert saved["epoch"] == 1 and 3 < saved["position"]["step"] <= 6  # within 2 steps
    assert len(saved["ranks"]) == 2 and all(r["loader"] for r in saved["ranks"])
    lines = [
        ln
        for task in stopped
        for ln in task.stderr.splitlines()
        if ln.startswith("stopped by SIGTERM")
    ]
    assert lines == [
        f"stopped by SIGTERM (a preemption, Ctrl-C, or torchrun ending the job after another "
        f"rank failed); saved {out / 'last.pt'} at this step: continue with --resume auto"
    ]
    resumed = finish(srun("--resume", "auto"))
    for task in resumed:
        assert task.returncode == 0, task.stdout[-3000:] + task.stderr[-3000:]
    assert f"resuming epoch 2 at step {saved['position']['step'] + 1}" in resumed[0].stdout
    assert resumed[1].stdout == ""
    assert_same_weights(out, reference_dir)


@pytest.mark.slow
def test_two_nodes_killed_mid_epoch_resume_at_the_epoch_end_and_match_one_node(
    trained, tiny_data, tmp_path
):
    # The same flags as the one-node, two-process reference. Each rank has local rank 0: a
    # trainer sharding by local rank would feed both nodes shard 0 and diverge at once. A
    # rank killed with no step checkpoint due (--checkpoint-minutes 30 by default) loses the
    # epoch under way; the resumed run still ends where the uninterrupted one did, bit for bit.
    reference_dir, _ = trained
    out = tmp_path / "two-nodes"
    node0, node1 = start_two_nodes(tiny_flags(tiny_data, out, "--log-interval", "1"), cwd=tmp_path)
    seen = wait_for_line(node0, f"epoch 2/{EPOCHS} step 3/7")
    assert any("on 2 x cpu" in line for line in seen)
    os.kill(worker_pids(node1)[0], signal.SIGKILL)  # node 1's only rank dies
    killed = finish([node0, node1])
    assert all(node.returncode != 0 for node in killed)
    assert load(out / "last.pt")["epoch"] == 1 and "position" not in load(out / "last.pt")
    assert [m["epoch"] for m in read_metrics(out)] == [1]
    resumed = two_nodes(tiny_flags(tiny_data, out, "--resume", "auto"), cwd=tmp_path)
    for node in resumed:
        assert node.returncode == 0, node.stdout[-3000:] + node.stderr[-3000:]
    assert "resumed from" in resumed[0].stdout and "1 epoch(s) done" in resumed[0].stdout
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3]
    assert_same_weights(out, reference_dir)  # as if never stopped, and as on one node
    metrics = read_metrics(out)
    # Time carries over the restart: the resumed run's first epoch ends after the first run's
    # time and its own.
    assert metrics[1]["elapsed"] >= metrics[0]["elapsed"] + metrics[1]["epoch_seconds"]


@pytest.mark.slow
def test_a_node_that_cannot_read_rank0s_checkpoint_fails_the_job_naming_it(
    trained, tiny_data, tmp_path
):
    # Each "node" has its own disk (its own working folder) and a relative --output-dir:
    # node 0 holds last.pt, node 1 does not. Rank 1 must not start from scratch in silence.
    reference_dir, _ = trained
    disk0, disk1 = tmp_path / "node0", tmp_path / "node1"
    (disk0 / "run").mkdir(parents=True)
    disk1.mkdir()
    (disk0 / "run" / "last.pt").write_bytes((reference_dir / "last.pt").read_bytes())
    flags = tiny_flags(tiny_data, "run", "--resume", "auto", "--epochs", str(EPOCHS + 1))
    node0, node1 = two_nodes([*flags, "--dist-timeout", "30"], cwd=[disk0, disk1], timeout=120)
    assert node0.returncode != 0 and node1.returncode != 0
    for node in (node0, node1):  # node 0's log said only "stopping: another rank failed"
        errors = [ln for ln in node.stderr.splitlines() if ln.startswith("error: ")]
        assert errors == [
            "error: rank 1: run/last.pt: rank 0 resumes from this checkpoint, but it is not "
            "there on this node; put --output-dir on a filesystem every node sees"
        ], node.stderr[-3000:]


def start(cmd: list[str], *, cwd, **env_extra) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=cwd, env=env(**env_extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def wait_for_line(proc: subprocess.Popen, text: str) -> list[str]:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"{text!r} never printed:\n{''.join(seen)[-3000:]}")


def assert_same_val_figures(got_dir, want_dir) -> None:
    """Each epoch's val top-1 and top-5 of the two runs are equal."""
    want = [(m["val_top1"], m["val_top5"]) for m in read_metrics(want_dir)]
    assert [(m["val_top1"], m["val_top5"]) for m in read_metrics(got_dir)] == want


def assert_same_weights(got_dir, want_dir) -> None:
    got, want = load(got_dir / "last.pt"), load(want_dir / "last.pt")
    assert got["epoch"] == want["epoch"] and "position" not in got  # both complete
    for part in ("model", "ema"):
        assert got[part].keys() == want[part].keys()
        different = [k for k in want[part] if not torch.equal(got[part][k], want[part][k])]
        assert different == [], (part, different[:5])
    assert [m["train_loss"] for m in read_metrics(got_dir)] == [
        m["train_loss"] for m in read_metrics(want_dir)
    ]


def worker_pids(torchrun_proc: subprocess.Popen) -> list[int]:
    out = subprocess.run(
        ["ps", "--ppid", str(torchrun_proc.pid), "-o", "pid="], capture_output=True, text=True
    ).stdout
    return [int(pid) for pid in out.split()]


@pytest.mark.slow
def test_kill_9_of_one_rank_loses_at_most_checkpoint_every_steps_pil(tiny_data, tmp_path):
    # The PIL loader this time, against its own uninterrupted reference (1 epoch of 7 steps).
    # A rank killed without a word: the job ends promptly, and resumes from its step checkpoint.
    flags = ["--loader", "pil", "--epochs", "1", "--log-interval", "1"]
    reference = tmp_path / "reference"
    proc = run(torchrun(2) + tiny_flags(tiny_data, reference, *flags), cwd=tmp_path)
    (record,) = read_metrics(reference)
    assert record.keys() >= METRIC_KEYS and record["epoch"] == 1
    assert load(reference / "last.pt")["config"]["loader"] == "pil"
    # --no-plots (tiny_flags): the figures as files, no picture, none named in the log.
    assert (reference / "per_class.csv").exists() and not list(reference.glob("*.png"))
    assert ".png" not in proc.stdout
    out = tmp_path / "killed"
    proc = start(
        torchrun(2) + tiny_flags(tiny_data, out, *flags, "--checkpoint-every", "2"), cwd=tmp_path
    )
    seen = wait_for_line(proc, "epoch 1/1 step 5/7")
    assert any("step checkpoint: epoch 1 step 4" in line for line in seen)
    victim = worker_pids(proc)[-1]
    os.kill(victim, signal.SIGKILL)  # no warning, no handler: a node that died
    killed_at = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 30  # torchrun stops the survivor: no hang until
    assert "[rank0]: Traceback" not in stderr  # --dist-timeout (300 s), and no traceback
    saved = load(out / "last.pt")
    assert (saved["epoch"], saved["position"]["step"]) == (0, 4)  # lost: steps 5 (and 6)
    resumed = run(
        torchrun(2) + tiny_flags(tiny_data, out, *flags, "--resume", "auto"), cwd=tmp_path
    )
    assert "resuming epoch 1 at step 5" in resumed.stdout
    assert load(out / "last.pt")["epoch"] == 1
    assert_same_weights(out, reference)


@pytest.mark.slow
def test_ctrl_c_on_another_node_delivered_twice_still_saves_and_is_named(tiny_data, tmp_path):
    # Ctrl-C on node 1's terminal reaches its worker directly and again through its torchrun
    # agent a moment later. A second copy handled apart from the first used to stop rank 1 at
    # once, without the save (rank 0 then said only "another rank failed"; the unit test in
    # test_trainer_faults pins that case), and rank 0, never signalled itself, named SIGTERM.
    # Now both ranks stop at one step, saved, as stopped by SIGINT.
    out = tmp_path / "run"
    flags = tiny_flags(tiny_data, out, "--epochs", "2", "--log-interval", "1")
    node0, node1 = start_two_nodes(flags, cwd=tmp_path)
    wait_for_line(node0, "epoch 1/2 step 2/7")
    (worker,) = worker_pids(node1)
    os.kill(worker, signal.SIGINT)  # Ctrl-C: the terminal signals the worker and its agent,
    os.kill(node1.pid, signal.SIGINT)  # which sends the worker a second SIGINT

    node0, node1 = finish([node0, node1], timeout=120)
    assert node0.returncode != 0 and node1.returncode != 0
    saved = load(out / "last.pt")
    assert saved["epoch"] == 0 and 2 < saved["position"]["step"] <= 5
    for node in (node0, node1):  # each node's log says it once
        stopped = [ln for ln in node.stderr.splitlines() if ln.startswith("stopped by")]
        assert stopped == [
            f"stopped by SIGINT (a preemption, Ctrl-C, or torchrun ending the job after another "
            f"rank failed); saved {out / 'last.pt'} at this step: continue with --resume auto"
        ], node.stderr[-3000:]
