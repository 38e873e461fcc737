"""The one place for distributed setup: launcher env -> rank, device, process group.

torchrun (and ``torch.distributed.launch --use-env``) set RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; the legacy launcher passes ``--local-rank`` as an
argument instead of LOCAL_RANK, so that value is accepted too. Without a launcher the same code
runs as one process with no process group at all. Backend: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from trainer import cpu_load
from trainer.cpu_load import TorchThreads


@dataclass(frozen=True)
class DistInfo:
    rank: int  # global rank: the shard id of the data
    world_size: int
    local_rank: int  # rank on this node: picks the GPU, never the data shard
    local_world_size: int
    device: torch.device
    is_main: bool  # rank 0: the one that prints and writes files
    # torch's intra-op threads on a CPU rank, and why that many (None on a GPU rank)
    torch_threads: TorchThreads | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_info: DistInfo | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def usable_cpus() -> int:
    # The affinity mask, not os.cpu_count(): containers and taskset give us fewer cores.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def physical_cores() -> int:
    """The physical cores among the usable CPUs: hardware threads of one core (SMT siblings)
    counted once, from Linux's topology files; the usable CPUs where they are missing."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(usable_cpus())
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{base}/core_id") as f:
                core = f.read().strip()
            with open(f"{base}/physical_package_id") as f:
                package = f.read().strip()
        except OSError:
            return usable_cpus()
        cores.add((package, core))
    return max(1, len(cores))


def physical_cores_per_rank(local_world_size: int) -> int:
    """``cpu_threads_per_rank`` counted in physical cores."""
    if bound_by_slurm():
        return physical_cores()
    return max(1, physical_cores() // max(1, local_world_size))


def cpu_threads_per_rank(local_world_size: int) -> int:
    """This rank's share of the cores it may run on: usable cores / ranks on this node.

    The default for DALI threads and PIL workers. OMP_NUM_THREADS is not consulted: torchrun
    sets it to 1 for every worker of a multi-process job, and it governs torch's intra-op
    threads, not the loader's (an 8-GPU node would otherwise get 1 loader thread per GPU).
    """
    if bound_by_slurm():
        return usable_cpus()
    return max(1, usable_cpus() // max(1, local_world_size))


def bound_by_slurm() -> bool:
    """A task srun bound to cores of its own (--cpus-per-task, --cpu-bind): its affinity
    mask is already its share, not the node's to divide."""
    return slurm_task() and usable_cpus() < (os.cpu_count() or 1)


def loader_threads_reason(local_world_size: int) -> str:
    """Why ``cpu_threads_per_rank`` gave what it gave, for the startup line."""
    cores = usable_cpus()
    if bound_by_slurm():
        return f"{cores} cores srun bound to this task"
    ranks = max(1, local_world_size)
    return f"{cores} usable cores / {ranks} rank{'s' if ranks > 1 else ''} on this node"


def choose_torch_threads(local_world_size: int, requested: int | None = None) -> TorchThreads:
    """A CPU rank's torch threads: ``requested`` when given, else its share of the cores
    (``torch_threads_per_rank``) less its part of the cores other processes keep busy at
    start (sampled for 0.3 s; see trainer/cpu_load.py)."""
    if requested is not None:
        return TorchThreads(requested, "as asked by --cpu-threads")
    share = torch_threads_per_rank(local_world_size)
    if share <= 1:
        return TorchThreads(share, _share_reason(local_world_size))
    usable = usable_cpus()
    busy = cpu_load.busy_cores_of_others(local_world_size)
    return cpu_load.choose_torch_threads(
        share=share,
        usable=usable,
        local_world_size=local_world_size,
        busy_others=busy,
        share_reason=_share_reason(local_world_size),
    )


def _share_reason(local_world_size: int) -> str:
    omp = os.environ.get("OMP_NUM_THREADS", "")
    capped = omp.isdigit() and 0 < int(omp) < cpu_threads_per_rank(local_world_size)
    return f"OMP_NUM_THREADS={omp}" if capped else loader_threads_reason(local_world_size)


def torch_threads_per_rank(local_world_size: int) -> int:
    """torch's intra-op threads on a CPU rank: the rank's share of cores, capped by
    OMP_NUM_THREADS when that is set (the variable is meant for exactly these threads)."""
    threads = cpu_threads_per_rank(local_world_size)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        threads = min(threads, int(omp))
    return threads


class DistSetupError(RuntimeError):
    """The launch does not fit the machine (e.g. more local ranks than GPUs); one line.

    ``every_node``: a fault each node meets on its own (its rendezvous address does not
    resolve, or cannot be reached), so the first rank of every node says it, not rank 0 alone.
    """

    def __init__(self, message: str, *, every_node: bool = False):
        super().__init__(message)
        self.every_node = every_node


def check_rendezvous_host(addr: str, port: str) -> None:
    """MASTER_ADDR must name a host: one that does not resolve would have the rendezvous retry
    (a C++ warning each time) until twice --dist-timeout, then end in a traceback."""
    import socket

    try:
        socket.getaddrinfo(addr, None)
    except (OSError, UnicodeError) as exc:
        raise DistSetupError(
            f"the rendezvous host MASTER_ADDR={addr!r} (port {port}) does not resolve on this "
            f"node ({exc}); set MASTER_ADDR to a name or address of the node running rank 0",
            every_node=True,
        ) from None


# --- Slurm: `srun -n N python trainer/main.py` without torchrun --------------------------------
# srun starts every task itself and says who each is in SLURM_* variables; torchvision's
# reference scripts and Lightning read them, and so do we: a step of several tasks becomes
# torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT, and
# everything after reads only those. A batch script's own process (SLURM_NTASKS may be 8 there,
# but it runs once) has no SLURM_STEP_NUM_TASKS and is left alone.


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list, expanded: ``gpu[01-03,7],cpu1`` -> gpu01 gpu02 gpu03
    gpu7 cpu1 (zero padding kept; several bracket groups in one name multiply out)."""
    names, depth, start = [], 0, 0
    for i, ch in enumerate(hostlist + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            if hostlist[start:i]:
                names.append(hostlist[start:i])
            start = i + 1
    hosts = []
    for name in names:
        match = re.search(r"\[([^\]]*)\]", name)
        if match is None:
            hosts.append(name)
            continue
        head, tail = name[: match.start()], name[match.end() :]
        for part in match.group(1).split(","):
            low, _, high = part.partition("-")
            for n in range(int(low), int(high or low) + 1):
                hosts.extend(expand_hostlist(f"{head}{n:0{len(low)}d}{tail}"))
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's ``2(x3),1`` -> [2, 2, 2, 1]: tasks on each node of the step, in node order."""
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise DistSetupError(f"SLURM_STEP_TASKS_PER_NODE={spec!r} is not Slurm's format")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _slurm_int(environ, name: str) -> int:
    value = environ[name]
    if not value.strip().isdigit():
        raise ValueError(f"{name}={value!r} is not a number")
    return int(value)


def slurm_port(environ) -> int:
    """The rendezvous port of a Slurm step: from the job id, so jobs sharing a node differ,
    and the step id, so steps of one job run side by side (``srun ... & srun ... &`` in one
    allocation, a small sweep) differ too. 4099 is coprime with the 10,000 ports, so the
    steps of one job never share a port; step 0 keeps 15000 + job id mod 10000."""
    job = _slurm_int(environ, "SLURM_JOB_ID") if environ.get("SLURM_JOB_ID") else 0
    step = environ.get("SLURM_STEP_ID", "")
    step = int(step) if step.isdigit() else 0  # the batch step's "batch" and the like: 0
    return 15000 + (job + 4099 * step) % 10000


def slurm_step_env(environ=os.environ) -> dict[str, str] | None:
    """torchrun's variables for this task of a Slurm step of several tasks; None when not in
    one, or when a launcher (torchrun under srun) has set them already."""
    tasks = environ.get("SLURM_STEP_NUM_TASKS", "")
    if "RANK" in environ or not tasks.isdigit() or int(tasks) <= 1:
        return None
    try:
        hosts = expand_hostlist(environ["SLURM_STEP_NODELIST"])
        per_node = expand_tasks_per_node(environ["SLURM_STEP_TASKS_PER_NODE"])
        node = environ.get("SLURMD_NODENAME", "")
        node_index = hosts.index(node) if node in hosts else _slurm_int(environ, "SLURM_NODEID")
        rank = _slurm_int(environ, "SLURM_PROCID")
        local_rank = _slurm_int(environ, "SLURM_LOCALID")
        # Variables that contradict each other would make a wrong rank or a wrong share of the
        # node's cores, or leave the rendezvous waiting for a rank that never comes.
        if sum(per_node) != int(tasks) or len(per_node) != len(hosts):
            raise ValueError(
                f"SLURM_STEP_TASKS_PER_NODE={environ['SLURM_STEP_TASKS_PER_NODE']!r} is "
                f"{sum(per_node)} tasks on {len(per_node)} node(s), but the step has {tasks} "
                f"on {len(hosts)} (SLURM_STEP_NODELIST={environ['SLURM_STEP_NODELIST']!r})"
            )
        if not (0 <= rank < int(tasks) and 0 <= local_rank < per_node[node_index]):
            raise ValueError(
                f"SLURM_PROCID={rank} and SLURM_LOCALID={local_rank} do not fit {tasks} tasks, "
                f"{per_node[node_index]} on this node"
            )
        env = {
            "RANK": str(rank),
            "WORLD_SIZE": tasks,
            "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(per_node[node_index]),
            # The step's first node hosts the rendezvous (Lightning's choice too); a port
            # from the job id, so two jobs sharing a node do not collide.
            "MASTER_ADDR": environ.get("MASTER_ADDR") or hosts[0],
            "MASTER_PORT": environ.get("MASTER_PORT") or str(slurm_port(environ)),
        }
    except (KeyError, ValueError, IndexError) as exc:
        raise DistSetupError(
            f"srun started {tasks} tasks, but Slurm's variables do not say who this one is "
            f"({type(exc).__name__}: {exc}); start torchrun under srun instead (one task per "
            "node), as the README shows"
        ) from None
    return env


def slurm_task() -> bool:
    """True in a task srun started itself (a step of several tasks), not under torchrun."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    return tasks.isdigit() and int(tasks) > 1 and "TORCHELASTIC_RUN_ID" not in os.environ


def adopt_slurm_step() -> None:
    """In a Slurm step of several tasks, set torchrun's variables from Slurm's (idempotent:
    once RANK is set this does nothing)."""
    env = slurm_step_env()
    if env is not None:
        os.environ.update(env)


def setup_distributed(
    *,
    timeout_s: float = 300.0,
    local_rank: int | None = None,
    device: str | None = None,
    cpu_threads: int | None = None,
) -> DistInfo:
    """Read the launcher's env, pick the device, and join the process group when world > 1.

    ``timeout_s`` bounds how long a collective waits for a rank that went silent, so a hung
    peer fails the job instead of holding it forever (torchrun already stops every rank when
    one exits non-zero). ``local_rank`` is the legacy launcher's ``--local-rank`` argument.
    ``device`` forces "cpu" or "cuda"; by default CUDA when available. ``cpu_threads``: torch's
    threads on a CPU rank (default: ``choose_torch_threads``'s).
    """
    global _info
    adopt_slurm_step()
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", local_rank if local_rank is not None else rank)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)

    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    threads = None
    if use_cuda:
        gpus = torch.cuda.device_count()
        gpu = local_rank
        if slurm_task() and 0 < gpus < local_world_size:
            # srun binds GPUs per task (--gpus-per-task, --gpu-bind): each task sees only its
            # own, so its local rank says nothing about which one. torchvision's rule then.
            gpu = local_rank % gpus
        if gpu >= gpus or (local_world_size > gpus and not slurm_task()):
            # Checked on every rank before joining the group, so all fail alike and at once
            # (rank 0 says it) instead of rank k dying in set_device with a CUDA error.
            raise DistSetupError(
                f"{local_world_size} processes on this node but {gpus} GPU"
                f"{'s' if gpus != 1 else ''}: local rank {local_rank} would have no GPU; start "
                f"one process per GPU (torchrun --nproc_per_node={gpus}, or plain "
                "`python trainer/main.py`, which starts one per GPU by itself)"
            )
        torch.cuda.set_device(gpu)
        dev = torch.device("cuda", gpu)
        # Fixed input shapes every step: let cuDNN pick the fastest kernels once.
        torch.backends.cudnn.benchmark = True
    else:
        dev = torch.device("cpu")
        # Each rank is its own process: without this every rank would use all cores and the
        # ranks would oversubscribe the machine (and starve the loader threads); and cores
        # other processes keep busy are not ours either.
        threads = choose_torch_threads(local_world_size, cpu_threads)
        torch.set_num_threads(threads.threads)

    if world_size > 1 and not torch_dist.is_initialized():
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
        if addr:
            check_rendezvous_host(addr, port)
        try:
            torch_dist.init_process_group(
                backend="nccl" if use_cuda else "gloo",
                timeout=datetime.timedelta(seconds=timeout_s),
                # Bind the group to our GPU so NCCL never guesses the device from the rank.
                device_id=dev if use_cuda else None,
            )
        except getattr(torch_dist, "DistError", RuntimeError) as exc:
            # The rendezvous store never answered (rank 0 not started, a firewall, the wrong
            # address) or its port is taken: torch's own words, without its C++ traceback.
            said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "clients joined" in said:  # the store is up (here) but ranks are missing
                message = (
                    f"rank {rank} waited --dist-timeout ({timeout_s:g} s) at the rendezvous "
                    f"{addr}:{port} for the other ranks ({said}); did every rank start, and "
                    "does each reach this address and port?"
                )
            else:
                message = (
                    f"rank {rank} could not join the job's rendezvous at {addr}:{port} ({said}); "
                    "is rank 0 running there, reachable from this node, and the port free? "
                    "(MASTER_ADDR / MASTER_PORT choose it)"
                )
            raise DistSetupError(message, every_node=True) from None
    _info = DistInfo(rank, world_size, local_rank, local_world_size, dev, rank == 0, threads)
    return _info


def current() -> DistInfo:
    """The DistInfo of setup_distributed (a single process's when it was not called)."""
    if _info is not None:
        return _info
    return DistInfo(0, 1, 0, 1, torch.device("cpu"), True)


def cleanup_distributed() -> None:
    """Leave the process group (a no-op for a single process)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


teardown_distributed = cleanup_distributed


def is_main_process() -> bool:
    if _info is not None:
        return _info.is_main
    return _env_int("RANK", 0) == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed so the lines interleave sanely under torchrun."""
    if is_main_process():
        kwargs.setdefault("flush", True)
        try:
            print(*args, **kwargs)
        except BrokenPipeError:
            # The reader went away (`... | head`): the run goes on, its log lines unread,
            # rather than dying over a closed pipe. Python's own recipe: point the stdout
            # descriptor at /dev/null, so later writes and the flush at exit succeed.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


def _active() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def is_distributed() -> bool:
    """True when a process group of more than one rank is up."""
    return _active() and torch_dist.get_world_size() > 1


def broadcast_from_main(value):
    """Rank 0's ``value`` (any picklable object) on every rank: how rank 0 decides for all."""
    if not _active():
        return value
    holder = [value]
    torch_dist.broadcast_object_list(holder, src=0)
    return holder[0]


# What gloo and NCCL say when the rank at the other end of a collective has gone away.
_PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
    "remote process exited",
)


def peer_failed(exc: BaseException) -> bool:
    """True when ``exc`` is a collective failing because another rank died."""
    dist_error = getattr(torch_dist, "DistError", ())
    if dist_error and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _PEER_GONE)


# What gloo and NCCL say when a collective gave up waiting (--dist-timeout) for a rank that is
# still there but silent: a hung or stopped process, a node lost without closing its sockets.
_PEER_SILENT = (
    "Timed out waiting",  # gloo: "Timed out waiting 300000ms for recv operation to complete"
    "Watchdog caught collective operation timeout",  # NCCL
)


def peer_timed_out(exc: BaseException) -> bool:
    """True when ``exc`` is a collective that waited the whole timeout for another rank."""
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _PEER_SILENT)


def all_gather_objects(value) -> list:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not _active():
        return [value]
    gathered = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if _active():
        if _info is not None and _info.device.type == "cuda":
            torch_dist.barrier(device_ids=[_info.device.index])
        else:
            torch_dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns the tensor. Identity for a single process."""
    if _active():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place: for values every rank weighs equally (same step count)."""
    if _active():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        tensor /= torch_dist.get_world_size()
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if _active():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor
