"""How the trainer is started: processes per machine, loader threads per rank, and the plan
of loader settings it prints (issue 8: fast by default, and the first command runs anywhere).
"""

from __future__ import annotations

import os
import re
import shutil
import socket

import pytest
from PIL import Image
from test_trainer import MAIN, finish, run, start_two_nodes, tiny_flags, torchrun

from pipelines import tuning
from pipelines.lists import read_list
from trainer import dist
from trainer.config import TrainerError, parse_config

LOADER_LINE = re.compile(r"^loader: (.*)$", re.MULTILINE)


def loader_line(stdout: str) -> str:
    match = LOADER_LINE.search(stdout)
    assert match, stdout[-3000:]
    return match.group(1)


def one_epoch(tiny_data, out, *extra: str) -> list[str]:
    flags = tiny_flags(tiny_data, out, "--epochs", "1", *extra)
    # tiny_flags pins --workers 1; these tests are about the default, so drop it.
    at = flags.index("--workers")
    return flags[:at] + flags[at + 2 :]


@pytest.mark.slow
def test_torchrun_omp_num_threads_does_not_limit_loader_threads(tiny_data, tmp_path):
    # torchrun sets OMP_NUM_THREADS=1 for every worker of a multi-process job; here it is set
    # explicitly for a one-process job, so the rank owns every usable core: the loader must
    # get all of them, not OMP's 1.
    cores = dist.usable_cpus()
    proc = run(torchrun(1) + one_epoch(tiny_data, tmp_path), cwd=tmp_path, OMP_NUM_THREADS="1")
    line = loader_line(proc.stdout)
    assert line.startswith(f"dali, cpu decode, {cores} threads/GPU"), line
    assert f"{cores} usable cores / 1 rank on this node" in line
    assert "decode: auto = cpu without a GPU" in line


@pytest.mark.slow
def test_plain_python_with_processes_starts_torchrun_and_splits_cores(tiny_data, tmp_path):
    import sys

    cmd = [sys.executable, MAIN, "--processes", "2", *one_epoch(tiny_data, tmp_path)]
    proc = run(cmd, cwd=tmp_path)
    assert "starting 2 processes with torchrun (--processes)" in proc.stdout
    assert "on 2 x cpu" in proc.stdout
    threads = max(1, dist.usable_cpus() // 2)
    line = loader_line(proc.stdout)
    assert line.startswith(f"dali, cpu decode, {threads} threads/GPU"), line
    assert f"{dist.usable_cpus()} usable cores / 2 ranks on this node" in line
    assert os.path.isfile(tmp_path / "model.pt")


@pytest.mark.slow
def test_processes_under_torchrun_is_refused(tiny_data, tmp_path):
    proc = run(
        torchrun(1) + ["--processes", "2", "--train-list", tiny_data.train_list],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0  # torchrun returns 1 for a worker's exit status 2
    assert (
        "error: --processes is for runs without torchrun; under torchrun, --nproc_per_node decides"
        in proc.stderr.splitlines()
    )


def test_more_local_ranks_than_gpus_is_one_clear_error(monkeypatch):
    # The README's old quick start (torchrun --nproc_per_node=2) on a one-GPU workstation made
    # rank 1 die in torch.cuda.set_device(1). Here: asking for CUDA with 2 local ranks on a
    # machine with fewer GPUs (none, on CI) fails before any CUDA call, naming the fix.
    import torch

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    gpus = torch.cuda.device_count()
    if gpus >= 2:
        pytest.skip("this machine has 2+ GPUs: the launch fits")
    with pytest.raises(dist.DistSetupError) as info:
        dist.setup_distributed(device="cuda")
    message = str(info.value)
    assert "\n" not in message
    assert f"2 processes on this node but {gpus} GPU" in message
    assert f"--nproc_per_node={gpus}" in message


SRUN_STEP = {  # what srun sets in task 3 of `srun -N 2 --ntasks-per-node=2 ...` on gpu[07-08]
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURMD_NODENAME": "gpu08",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
}


def test_slurm_host_and_task_lists_expand_as_slurm_writes_them():
    assert dist.expand_hostlist("gpu[01-03,7],cpu1") == ["gpu01", "gpu02", "gpu03", "gpu7", "cpu1"]
    assert dist.expand_hostlist("r[1-2]-n[08-09]") == ["r1-n08", "r1-n09", "r2-n08", "r2-n09"]
    assert dist.expand_hostlist("node1") == ["node1"]
    assert dist.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(dist.DistSetupError, match="not Slurm's format"):
        dist.expand_tasks_per_node("two")


def test_an_srun_task_gets_torchruns_variables():
    env = dist.slurm_step_env(SRUN_STEP)
    assert env == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu07",  # the step's first node
        "MASTER_PORT": str(15000 + 123456 % 10000),
    }
    # Steps of one job side by side (srun ... & srun ... &) get ports of their own.
    ports = {dist.slurm_step_env({**SRUN_STEP, "SLURM_STEP_ID": str(k)})["MASTER_PORT"]
             for k in range(64)}  # fmt: skip
    assert len(ports) == 64 and all(15000 <= int(port) < 25000 for port in ports)
    # The user's own rendezvous address wins.
    mine = dist.slurm_step_env({**SRUN_STEP, "MASTER_ADDR": "head", "MASTER_PORT": "29400"})
    assert (mine["MASTER_ADDR"], mine["MASTER_PORT"]) == ("head", "29400")
    # Not a task of a several-task step: a batch script's own process (SLURM_NTASKS may be 8
    # there, but it runs once), a one-task step, torchrun under srun (RANK set already).
    assert dist.slurm_step_env({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) is None
    assert dist.slurm_step_env({**SRUN_STEP, "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert dist.slurm_step_env({**SRUN_STEP, "RANK": "0"}) is None
    # Variables that do not say who this task is: one line, naming the way out.
    broken = {k: v for k, v in SRUN_STEP.items() if k != "SLURM_PROCID"}
    with pytest.raises(dist.DistSetupError, match="srun started 4 tasks.*SLURM_PROCID"):
        dist.slurm_step_env(broken)


def test_srun_variables_that_contradict_each_other_are_one_line():
    # SLURM_STEP_TASKS_PER_NODE that does not add up to the step's tasks and nodes made a wrong
    # LOCAL_WORLD_SIZE (a wrong share of the cores) without a word; a SLURM_PROCID beyond the
    # step's tasks made a rank the rendezvous waits for in vain.
    for bad, said in [
        ({"SLURM_STEP_TASKS_PER_NODE": "3(x2)"}, "is 6 tasks on 2 node"),
        ({"SLURM_STEP_TASKS_PER_NODE": "4"}, "is 4 tasks on 1 node"),
        ({"SLURM_PROCID": "4"}, "SLURM_PROCID=4 and SLURM_LOCALID=1 do not fit 4 tasks"),
        ({"SLURM_LOCALID": "2"}, "do not fit 4 tasks, 2 on this node"),
        ({"SLURM_PROCID": "x"}, "SLURM_PROCID"),
    ]:
        with pytest.raises(dist.DistSetupError, match="srun started 4 tasks") as info:
            dist.slurm_step_env({**SRUN_STEP, **bad})
        assert said in str(info.value) and "\n" not in str(info.value)


def test_a_rendezvous_host_that_does_not_resolve_is_one_line_at_once(monkeypatch, capsys):
    # node[01-02] in SLURM_STEP_NODELIST where node01 does not resolve: the rendezvous retried
    # with a C++ warning each time for twice --dist-timeout (10 minutes by default), then died
    # in a DistNetworkError traceback. Now one line before any retry, from every node.
    from trainer import main as trainer_main

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")  # not rank 0: the first rank of its node says it too
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "node01.invalid")
    monkeypatch.setenv("MASTER_PORT", "19999")
    with pytest.raises(dist.DistSetupError, match="MASTER_ADDR='node01.invalid'") as info:
        dist.setup_distributed(device="cpu", timeout_s=5)
    assert info.value.every_node and "\n" not in str(info.value)
    assert trainer_main.main(["--train-list", "/nowhere/Train.txt", "--dist-timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "does not resolve" in err


def test_a_rendezvous_that_never_answers_is_one_line(monkeypatch):
    # Rank 0 never came up (or a firewall, or the port taken): torch's DistNetworkError with
    # its C++ frames became one line naming the address and what to check.
    import torch.distributed as torch_dist

    def never(**kwargs):
        raise torch_dist.DistNetworkError(
            "The client socket has timed out after 5000ms while trying to connect to (h, 1).\n"
            "Exception raised from throwTimeoutError at socket.cpp:1030"
        )

    monkeypatch.setattr(torch_dist, "init_process_group", never)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                        "MASTER_ADDR": "localhost", "MASTER_PORT": "19998"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    with pytest.raises(dist.DistSetupError) as info:
        dist.setup_distributed(device="cpu", timeout_s=5)
    assert str(info.value) == (
        "rank 1 could not join the job's rendezvous at localhost:19998 (The client socket has "
        "timed out after 5000ms while trying to connect to (h, 1).); is rank 0 running there, "
        "reachable from this node, and the port free? (MASTER_ADDR / MASTER_PORT choose it)"
    )

    def alone(**kwargs):  # rank 0 hosts the store; the other rank never came
        raise torch_dist.DistStoreError(
            "Timed out after 6 seconds waiting for clients. 1/2 clients joined."
        )

    monkeypatch.setattr(torch_dist, "init_process_group", alone)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(dist.DistSetupError) as info:
        dist.setup_distributed(device="cpu", timeout_s=5)
    assert str(info.value) == (
        "rank 0 waited --dist-timeout (5 s) at the rendezvous localhost:19998 for the other "
        "ranks (Timed out after 6 seconds waiting for clients. 1/2 clients joined.); did every "
        "rank start, and does each reach this address and port?"
    )


def test_an_srun_task_bound_to_its_cores_keeps_them(monkeypatch):
    # srun --cpus-per-task=4 binds each task to 4 cores: its affinity mask is its share
    # already, and dividing it by the ranks on the node again would leave 2 of its 4 idle.
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(dist, "usable_cpus", lambda: 4)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert dist.cpu_threads_per_rank(2) == 4
    assert dist.loader_threads_reason(2) == "4 cores srun bound to this task"
    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # not bound: the node's cores, shared
    assert dist.cpu_threads_per_rank(2) == 2


def test_cpu_threads_per_rank_ignores_omp_num_threads(monkeypatch):
    cores = dist.usable_cpus()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert dist.cpu_threads_per_rank(1) == cores
    assert dist.cpu_threads_per_rank(cores + 5) == 1  # never 0
    # torch's own intra-op threads do honour it: that is what the variable is for.
    assert dist.torch_threads_per_rank(1) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert dist.torch_threads_per_rank(1) == cores


def plan(**kwargs) -> tuning.LoaderPlan:
    args = dict(backend="dali", device_type="cuda", cores_reason="test cores")
    return tuning.plan_loader(**{**args, **kwargs})


def test_plan_gpu_decode_with_few_cores_per_gpu():
    # An 8-GPU node with 16 cores: 2 per GPU, too few to decode on the host.
    p = plan(cores_per_rank=2)
    assert (p.decode, p.threads, p.hw_decoder_load, p.prefetch) == ("mixed", 2, 0.99, 2)
    assert p.dali_options() == {"hw_decoder_load": 0.99}
    assert "auto = mixed" in p.describe() and "test cores" in p.describe()


def test_plan_caps_threads_for_gpu_decode():
    p = plan(cores_per_rank=12)
    assert (p.decode, p.threads) == ("mixed", tuning.MIXED_MAX_THREADS)


def test_plan_decodes_on_host_with_16_cores_per_gpu():
    p = plan(cores_per_rank=16)
    assert (p.decode, p.threads, p.hw_decoder_load) == ("cpu", 16, None)
    assert p.dali_options() == {}


def test_auto_decode_counts_physical_cores_and_the_models_appetite():
    from trainer.model import model_gflops

    resnet50, resnet18 = model_gflops("resnet50"), model_gflops("resnet18")
    assert (resnet50, resnet18) == (pytest.approx(4.089), pytest.approx(1.814))
    # A DGX H100: 224 hardware threads, 112 physical cores, 8 GPUs: 28 threads, 14 cores a GPU.
    dgx = dict(cores_per_rank=28, physical_cores_per_rank=14)
    assert plan(**dgx, model_gflops=resnet50).decode == "cpu"  # ~6,550 decoded vs ~3,970 trained
    small = plan(**dgx, model_gflops=resnet18)  # resnet18 trains ~2.3x faster: the GPU decodes
    assert small.decode == "mixed" and "14 physical cores/GPU" in small.describe()
    # Hardware threads alone are not cores: 16 threads on 8 physical cores decode on the GPU.
    assert plan(cores_per_rank=16, physical_cores_per_rank=8).decode == "mixed"
    # A model of unknown cost is taken as resnet50, and the start line says so.
    assert "resnet50 (assumed)" in plan(cores_per_rank=16).describe()


def test_physical_cores_are_at_most_the_usable_cpus():
    assert 1 <= dist.physical_cores() <= dist.usable_cpus()
    assert dist.physical_cores_per_rank(1000) == 1


def test_plan_respects_what_the_user_gave():
    p = plan(cores_per_rank=64, dali_decode="mixed", threads=12, hw_decoder_load=0.5, prefetch=3)
    assert (p.decode, p.threads, p.hw_decoder_load, p.prefetch) == ("mixed", 12, 0.5, 3)
    # Explicit threads decide auto's placement too.
    assert plan(cores_per_rank=64, threads=4).decode == "mixed"
    p = plan(cores_per_rank=4, dali_decode="cpu", hw_decoder_load=0.9)
    assert p.hw_decoder_load is None and "ignored" in p.describe()


def test_plan_without_gpu_and_for_pil():
    assert plan(device_type="cpu", cores_per_rank=2).decode == "cpu"
    p = plan(backend="pil", cores_per_rank=6)
    assert (p.decode, p.threads, p.hw_decoder_load) == (None, 6, None)
    assert p.describe().startswith("pil, 6 workers/GPU")


def test_new_loader_flags_parse_and_check():
    cfg = parse_config(["--dali-hw-decoder-load", "0.8", "--prefetch", "3", "--processes", "2"])
    assert (cfg.dali_hw_decoder_load, cfg.prefetch, cfg.processes) == (0.8, 3, 2)
    for bad in (["--dali-hw-decoder-load", "1.5"], ["--prefetch", "0"], ["--processes", "0"]):
        with pytest.raises(TrainerError):
            parse_config(bad)


@pytest.mark.slow
def test_processes_job_with_bad_input_ends_in_the_workers_line(tiny_data, tmp_path):
    # Started by --processes, torchrun runs inside the launcher: the job's output is the
    # failing rank's one error line and its exit status 2, not torchrun's traceback.
    import sys

    bad = tmp_path / "bad.txt"
    from pathlib import Path

    bad.write_text(Path(tiny_data.train_list).read_text() + f"{tiny_data.train_list} 99\n")
    (tmp_path / "classes.txt").write_text(Path(tiny_data.classes_file).read_text())
    cmd = [sys.executable, MAIN, "--processes", "2", "--train-list", str(bad)]
    proc = run(cmd, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "bad.txt:" in errors[0] and "label 99" in errors[0], errors


def test_worker_failure_status_picks_the_rank_that_said_why(capsys):
    from types import SimpleNamespace as Failure

    from trainer.launch import worker_failure_status

    # rank 1 found the bad file (2); torchrun then stopped rank 0 (SIGTERM) and rank 2 (3).
    failures = {0: Failure(exitcode=-15, pid=10), 1: Failure(exitcode=2, pid=11)}
    failures[2] = Failure(exitcode=3, pid=12)
    assert worker_failure_status(failures) == 2
    assert capsys.readouterr().err == ""
    # A rank killed without a word (kill -9, the OOM killer) gets one line, even when the
    # ranks stopped after it (exit 3) sort before it.
    failures = {0: Failure(exitcode=3, pid=9), 1: Failure(exitcode=-9, pid=77)}
    assert worker_failure_status(failures) == 137
    assert capsys.readouterr().err.startswith("error: rank 1 (pid 77) was killed by SIGKILL")
    # torchrun stops the survivors with SIGTERM after the kill: the SIGKILL is the cause.
    failures = {0: Failure(exitcode=-15, pid=9, timestamp=2), 1: Failure(exitcode=-9, pid=77,
                timestamp=1)}  # fmt: skip
    assert worker_failure_status(failures) == 137
    assert capsys.readouterr().err.startswith("error: rank 1 (pid 77) was killed by SIGKILL")


def test_nodes_started_differently_are_one_line_naming_the_difference(monkeypatch):
    # Node 1 started with another --batch-size (or its own copy of a list with other lines)
    # used to issue other collectives than node 0: the job died at --dist-timeout in a gloo
    # traceback. Each rank's settings and lists are compared with rank 0's first.
    import torch

    from trainer import main as trainer_main
    from trainer import nodes
    from trainer.data import DataSpec

    def on_rank(rank):
        return dist.DistInfo(rank, 2, 0, 1, torch.device("cpu"), rank == 0)

    def node1_sends(value):  # every rank gathers (host, value): rank 0's is this process's
        monkeypatch.setattr(
            dist, "all_gather_objects", lambda mine: [("n0", mine[1]), ("n1", value)]
        )

    def settings(cfg):
        return {k: v for k, v in vars(cfg).items() if k not in nodes.NODE_LOCAL_FIELDS}

    cfg = parse_config(["--train-list", "/a/Train.txt", "--batch-size", "16"])
    # Node-local settings may differ: paths, loader threads, patience.
    local = parse_config(["--train-list", "/b/Train.txt", "--batch-size", "16", "--workers", "3",
                          "--output-dir", "/mnt/x", "--dist-timeout", "9"])  # fmt: skip
    node1_sends(settings(local))
    nodes.check_same_command(cfg, on_rank(0))
    other = parse_config(["--train-list", "/a/Train.txt", "--batch-size", "8"])
    node1_sends(settings(other))
    with pytest.raises(TrainerError) as said:
        nodes.check_same_command(cfg, on_rank(0))
    assert str(said.value) == (
        "rank 1 (on n1) was started with other settings than rank 0 (on n0): --batch-size 8 "
        "there, 16 on rank 0; start every node with the same command"
    )
    # A flag one node leaves to its default is said so, not as None.
    node1_sends(settings(parse_config(["--train-list", "/a/Train.txt", "--batch-size", "16",
                                       "--lr", "0.2"])))  # fmt: skip
    with pytest.raises(TrainerError, match=r"--lr 0\.2 there, not given \(the default\) on"):
        nodes.check_same_command(cfg, on_rank(0))
    # On rank 1 (node 1's own log says it too):
    monkeypatch.setattr(dist, "all_gather_objects", lambda mine: [("n0", settings(cfg)), mine])
    with pytest.raises(trainer_main.RankError, match=r"^this node \(.*\) was started with"):
        nodes.check_same_command(other, on_rank(1))

    from pipelines.lists import SampleTable

    class Loader:
        def __init__(self, labels, root="/a/img", names=None):
            names = names or [f"c{k}/{i}.jpg" for i, k in enumerate(labels)]
            self.table = SampleTable.from_pairs([f"{root}/{n}" for n in names], labels)

    data = DataSpec("/a/Train.txt", None, ["cat", "dog"], "/a/classes.txt", False)
    node1 = {"train": ("/b/Train.txt", nodes.list_digest(Loader([0, 1, 1], "/copy/b/img"))),
             "val": (None, None), "classes": ("/b/classes.txt", ["cat", "dog"])}  # fmt: skip
    node1_sends(node1)
    nodes.check_same_data(data, on_rank(0), Loader([0, 1, 1]), None)  # a copy elsewhere
    with pytest.raises(TrainerError) as said:
        nodes.check_same_data(data, on_rank(0), Loader([0, 1, 1, 0]), None)
    assert str(said.value) == (
        "rank 1 (on n1) reads another train list than rank 0 (on n0): /b/Train.txt there, "
        "/a/Train.txt on rank 0: 3 samples there, 4 on rank 0; every node needs the same train "
        "list (a copy of one file)"
    )
    with pytest.raises(TrainerError, match="the same 3 samples, other labels or another order"):
        nodes.check_same_data(data, on_rank(0), Loader([1, 0, 1]), None)
    # A copy whose line names another image of the same class: the labels alone agreed, and
    # rank 1 trained on other images without a word. The names below the shared folder count.
    other_image = ["c0/0.jpg", "c1/1.jpg", "c1/7.jpg"]
    with pytest.raises(TrainerError, match="the same 3 samples and labels, but other images"):
        nodes.check_same_data(data, on_rank(0), Loader([0, 1, 1], names=other_image), None)
    # Node 1 finds a Test.txt beside its train list, rank 0 none: said so, not as None.
    node1_sends({**node1, "val": ("/b/Test.txt", nodes.list_digest(Loader([0])))})
    with pytest.raises(TrainerError) as said:
        nodes.check_same_data(data, on_rank(0), Loader([0, 1, 1]), None)
    assert "/b/Test.txt there, none on rank 0: no val list on rank 0 (no --val-list given" in str(
        said.value
    )
    node1_sends({**node1, "classes": ("/b/classes.txt", ["cat", "dgo"])})
    with pytest.raises(TrainerError, match="class 1 is 'dgo' there, 'dog' on rank 0"):
        nodes.check_same_data(data, on_rank(0), Loader([0, 1, 1]), None)


@pytest.mark.slow
def test_two_nodes_with_another_batch_size_stop_at_once_saying_so(tiny_data, tmp_path):
    flags = one_epoch(tiny_data, tmp_path / "out", "--dist-timeout", "60")
    nodes = finish(start_two_nodes(flags, cwd=tmp_path, node1_extra=["--batch-size", "4"]), 120)
    for node in nodes:  # each node's log says it, not only the one holding rank 0
        assert node.returncode != 0
        errors = [ln for ln in node.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1, node.stderr[-3000:]
        assert "--batch-size" in errors[0] and "start every node with the same command" in errors[0]
        assert "]: Traceback" not in node.stderr  # no worker traceback, only the line
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_resume_every_node_sees_differently_is_one_line(monkeypatch, tmp_path):
    # Node-local output folders: the nodes hold copies of the run saved at different steps.
    # Each rank used to go on from its own copy (another epoch, another step count: a hang).
    import torch

    from trainer import nodes

    cfg = parse_config(["--train-list", "/a/Train.txt", "--resume", "auto",
                        "--output-dir", str(tmp_path)])  # fmt: skip
    info = dist.DistInfo(0, 2, 0, 1, torch.device("cpu"), True)
    at_step = {"epoch": 1, "position": {"step": 4}, "elapsed": 9.0}
    node1 = ("read", 2, None, 12.5)  # node 1's copy: saved at the end of epoch 2
    monkeypatch.setattr(dist, "all_gather_objects", lambda mine: [("n0", mine[1]), ("n1", node1)])
    with pytest.raises(TrainerError) as said:
        nodes.check_same_resume(cfg, info, "run/last.pt", at_step)
    assert str(said.value) == (
        "rank 1 (on n1) reads run/last.pt as saved at the end of epoch 2, rank 0 (on n0) at "
        "epoch 2 step 4: the nodes hold different copies of the run; put --output-dir on a "
        "filesystem every node sees"
    )
    node1 = ("read", 1, 4, 9.0)
    nodes.check_same_resume(cfg, info, "run/last.pt", at_step)  # the same save: fine


@pytest.mark.slow
def test_rank0_finding_no_checkpoint_while_another_node_holds_one_stops(tiny_data, tmp_path):
    # Node-local output folders, and c10d made the other node rank 0 this time: rank 0 finds
    # no last.pt and used to start the run afresh (one "starting fresh" line), the run's
    # last.pt left on node 1.
    disk0, disk1 = tmp_path / "node0", tmp_path / "node1"
    disk0.mkdir()
    (disk1 / "run").mkdir(parents=True)
    (disk1 / "run" / "last.pt").write_bytes(b"the run's checkpoint")  # only its presence counts
    flags = one_epoch(tiny_data, "run", "--resume", "auto", "--dist-timeout", "30")
    nodes = finish(start_two_nodes(flags, cwd=[disk0, disk1]), 120)
    host = socket.gethostname()
    want = (
        f"holds run/last.pt, but rank 0 (on {host}) finds no last.pt in run and would start the "
        "run afresh: put --output-dir on a filesystem every node sees (or copy the run there)"
    )
    for node in nodes:
        assert node.returncode != 0
        errors = [ln for ln in node.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and errors[0].endswith(want), node.stderr[-3000:]
    assert not (disk0 / "run").exists() and os.listdir(disk1 / "run") == ["last.pt"]


def test_a_rank_gone_silent_is_one_line_after_dist_timeout(monkeypatch, capsys, tmp_path):
    # A frozen node (kill -STOP of its worker, a lost network): rank 0's collective gives up
    # after --dist-timeout with gloo's RuntimeError, which used to end in a traceback.
    import torch

    from trainer import main as trainer_main

    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
        "20000ms for recv operation to complete"
    )
    assert dist.peer_timed_out(gloo) and not dist.peer_failed(gloo)
    info = dist.DistInfo(0, 2, 0, 1, torch.device("cpu"), True)
    monkeypatch.setattr(dist, "setup_distributed", lambda **kwargs: info)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)

    def run(cfg, info, control):
        raise gloo

    monkeypatch.setattr(trainer_main, "run", run)
    argv = ["--train-list", "x.txt", "--dist-timeout", "20", "--output-dir", str(tmp_path)]
    monkeypatch.setenv("RANK", "0")  # as under torchrun: no relaunch
    assert trainer_main.main(argv) == 3
    assert capsys.readouterr().err.splitlines() == [
        "error: rank 0: waited --dist-timeout (20 s) for another rank that went silent (a hung "
        "or stopped process, a lost node or network); the job stops: continue with --resume "
        "auto once every node is back"
    ]


def test_a_missing_train_list_is_named_as_missing(tmp_path, capsys):
    # It read "<list>: no classes.txt beside it; give --classes FILE or --num-classes N".
    from trainer import main as trainer_main

    missing = str(tmp_path / "nowhere" / "Train.txt")
    assert trainer_main.main(["--train-list", missing, "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: --train-list {missing}: no such file"]


def test_a_folder_given_as_a_list_is_named_as_a_folder(tmp_path, capsys):
    # The image tree itself passed as --train-list (or --val-list) read "no such file" (or
    # "list file not found") for a folder that is there.
    from trainer import main as trainer_main

    tree = tmp_path / "flowers"
    (tree / "roses").mkdir(parents=True)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "classes.txt").write_text("a\nb\n")
    (lists / "Train.txt").write_text("x.jpg 0\ny.jpg 1\n")
    for name in ("x.jpg", "y.jpg"):
        Image.new("RGB", (8, 8)).save(lists / name)
    hint = "tools/make_lists.py FOLDER --out-dir DIR writes"
    for flags, start in [
        (["--train-list", str(tree)], f"error: --train-list {tree}: a folder, not a list file ("),
        (
            [
                "--train-list",
                str(lists / "Train.txt"),
                "--val-list",
                str(tree),
                "--batch-size",
                "1",
            ],
            f"error: {tree}: a folder, not a list file (",
        ),
    ]:
        assert trainer_main.main([*flags, "--output-dir", str(tmp_path / "o")]) == 2
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
        assert len(errors) == 1 and errors[0].startswith(start) and hint in errors[0], errors


@pytest.mark.slow
def test_a_node_missing_its_list_is_named_by_rank0_at_once(tiny_data, tmp_path):
    # Node 1 without its copy of the train list exited 2 without a word (only rank 0 speaks),
    # while rank 0 said "another rank failed (its error line ... says why)": no line said why.
    # Then rank 0 said it, but node 1's own log still held only torchrun's report.
    flags = one_epoch(tiny_data, tmp_path / "out", "--dist-timeout", "60")
    missing = str(tmp_path / "node1" / "Train.txt")
    nodes = finish(start_two_nodes(flags, cwd=tmp_path, node1_extra=["--train-list", missing]), 120)
    assert all(node.returncode != 0 for node in nodes)
    for node in nodes:  # and node 1's own log says it too, not only torchrun's report
        errors = [ln for ln in node.stderr.splitlines() if ln.startswith("error: ")]
        assert errors == [f"error: rank 1: --train-list {missing}: no such file"], node.stderr
    assert not (tmp_path / "out").exists()


def test_an_input_error_every_node_meets_is_said_on_each_node(monkeypatch):
    # Shared storage: an image missing there is met by a rank of every node (each node checks
    # every file), rank 0's node first, so rank 0's line was the one raised everywhere and
    # node 1's log held no reason. Each other node's first failing rank now says its own.
    import torch

    from trainer import nodes
    from trainer.config import RankError

    def outcome(rank, local_rank, messages):
        info = dist.DistInfo(rank, 4, local_rank, 2, torch.device("cpu"), rank == 0)
        monkeypatch.setattr(dist, "all_gather_objects", lambda mine: messages)

        def action():
            if messages[rank] is not None:
                raise TrainerError(messages[rank])

        with pytest.raises(TrainerError) as raised:
            nodes.agreed_by_all(info, action)
        return type(raised.value) is RankError, str(raised.value)

    shared = ["gone.jpg", "gone.jpg", "gone.jpg", None]  # ranks 0, 1 on node 0; 2, 3 on node 1
    assert outcome(0, 0, shared) == (False, "gone.jpg")  # rank 0 says it on node 0
    assert outcome(1, 1, shared) == (False, "gone.jpg")  # node 0: rank 0's line only
    assert outcome(2, 0, shared) == (True, "gone.jpg")  # node 1's first failing rank
    assert outcome(3, 1, shared) == (False, "gone.jpg")  # silent: not its error
    later = [None, None, "a", "b"]  # node 1 alone: its rank 2 says it, rank 3 not again
    assert outcome(2, 0, later) == (True, "a")
    assert outcome(3, 1, later) == (False, "rank 2: a")
    assert outcome(1, 1, [None, "c", None, None]) == (False, "rank 1: c")  # rank 0's node


@pytest.mark.slow
def test_an_image_missing_on_one_node_alone_is_found_there_at_start(tiny_data, tmp_path):
    # Node 1 reads its own copy of the data, which lacks an image near the list's top. The
    # ranks split the file check job-wide, so that image was rank 0's to check, on node 0's
    # copy: the run started, and node 1 failed mid-epoch whenever it first drew the image
    # (or trained on, if it did not). Every node checks its own copy; node 1 names it.
    copy = tmp_path / "node1"
    shutil.copytree(os.path.dirname(tiny_data.train_list), copy)
    gone = read_list(copy / "Train.txt")[1].path  # in rank 0's half of the list
    os.remove(gone)
    flags = one_epoch(tiny_data, tmp_path / "out", "--dist-timeout", "60")
    node1_list = ["--train-list", str(copy / "Train.txt")]
    nodes = finish(start_two_nodes(flags, cwd=tmp_path, node1_extra=node1_list), 120)
    want = f"error: rank 1: {gone}: image file listed at {copy / 'Train.txt'}:2 cannot be read"
    for node in nodes:
        assert node.returncode != 0
        errors = [ln for ln in node.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(want), node.stderr[-3000:]
    assert not (tmp_path / "out").exists()  # found before anything was written


def test_processes_under_srun_names_srun(monkeypatch, capsys):
    from trainer import main as trainer_main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID"):  # fmt: skip
        monkeypatch.setenv(name, "")  # recorded, so what main sets is undone after the test
        monkeypatch.delenv(name)
    for name, value in {**SRUN_STEP, "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                        "SLURMD_NODENAME": "gpu07", "SLURM_NODEID": "0"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    assert trainer_main.main(["--train-list", "/nowhere/Train.txt", "--processes", "2"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --processes is for runs without a launcher; under srun, its --ntasks (or "
        "--ntasks-per-node) decides"
    ]
