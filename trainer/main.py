"""Train an image classifier with DDP:  python trainer/main.py [flags]

Run without a launcher it starts one process per visible GPU through torchrun (one process,
no torchrun, on a CPU-only machine or a one-GPU one); ``torchrun --nproc_per_node=N
trainer/main.py`` works as well, on one machine or several. With no flags it generates the
demo data once (reused afterwards) and trains the demo recipe on it; ``--train-list
Train.txt`` trains on your data with ImageNet-like defaults (resnet50, 224 px). ``--help``
lists every flag with its default.

Phases, one function each: parse the config, set up the ranks, resolve the data, build the
loaders, the model and the optimizer, resume, then per epoch train_one_epoch -> evaluate ->
log -> checkpoint; at the end export model.pt. Bad input (lists, classes, weights, config)
fails before training with one ``error: ...`` line on rank 0 and exit status 2.

Beside it: trainer/launch.py (starting the job), data.py (which lists and classes), run_dir.py
(the output folder), nodes.py (what the ranks agree on).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

if __package__ in (None, ""):
    # `torchrun trainer/main.py` puts trainer/ first on sys.path, where config.py, model.py...
    # could shadow other top-level modules; the project root belongs there instead.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pipelines import build_loader, heap, tuning  # noqa: E402
from pipelines.fileio import atomic_link, atomic_write_text  # noqa: E402
from pipelines.lists import EmptyListError, FetchError, ImageError, ListError  # noqa: E402
from pipelines.tuning import LoaderPlan  # noqa: E402
from trainer import checkpoint as ckpt_io  # noqa: E402
from trainer import dist  # noqa: E402
from trainer import metrics as run_metrics  # noqa: E402
from trainer import weights as named_weights  # noqa: E402
from trainer.batch_picture import TRAIN_BATCH, draw_batch  # noqa: E402
from trainer.config import (  # noqa: E402
    Config,
    RankError,
    TrainerError,
    config_dict,
    default_lr,
    default_weight_decay,
    global_batch,
    parse_config,
    save_config,
    train_image_size,
)
from trainer.cpu_load import TorchThreads  # noqa: E402
from trainer.data import DataSpec, check_train_labels, resolve_data  # noqa: E402
from trainer.engine import (  # noqa: E402
    average_batchnorm_buffers,
    evaluate,
    make_ema,
    make_optimizer,
    make_scaler,
    make_scheduler,
    resolve_amp,
    set_schedule_position,
    train_one_epoch,
)
from trainer.launch import (  # noqa: E402
    fail,
    launched_by_torchrun,
    processes_to_start,
    relaunch_under_torchrun,
    write_error_file,
)
from trainer.model import (  # noqa: E402
    build_model,
    check_input_sizes,
    compile_model,
    head_tensor_names,
    model_gflops,
    wrap_ddp,
)
from trainer.nodes import (  # noqa: E402
    agreed_by_all,
    check_same_command,
    check_same_data,
    check_same_resume,
    decided_by_main,
    list_digest,
    load_agreed_checkpoint,
)
from trainer.preemption import StepControl, Stopped  # noqa: E402
from trainer.run_dir import (  # noqa: E402
    CONFIG_FILE,
    EVAL_FILE,
    check_output_dir,
    eval_results_dir,
    lock_output_dir,
    unlock_output_dir,
)
from trainer.tensorboard import Curves, check_available  # noqa: E402

MAX_WARMUP_FRACTION = 0.25  # of the run's epochs


def plan_loader(cfg: Config, info: dist.DistInfo) -> LoaderPlan:
    """The loader's decode placement, threads, hardware-decoder share and prefetch, and why."""
    return tuning.plan_loader(
        backend=cfg.loader,
        device_type=info.device.type,
        cores_per_rank=dist.cpu_threads_per_rank(info.local_world_size),
        cores_reason=dist.loader_threads_reason(info.local_world_size),
        dali_decode=cfg.dali_decode,
        threads=cfg.workers,
        hw_decoder_load=cfg.dali_hw_decoder_load,
        prefetch=cfg.prefetch,
        physical_cores_per_rank=dist.physical_cores_per_rank(info.local_world_size),
        model_gflops=model_gflops(cfg.arch),
    )


def resolve_config(cfg: Config, data: DataSpec, info: dist.DistInfo, plan: LoaderPlan) -> Config:
    """Fill in what was left to defaults: the data found, lr and decay for this world size,
    the loader settings chosen."""
    return replace(
        cfg,
        train_list=data.train_list,
        val_list=data.val_list,
        classes=data.classes_file,
        num_classes=len(data.class_names),
        lr=cfg.lr if cfg.lr is not None else default_lr(cfg, info.world_size),
        weight_decay=cfg.weight_decay
        if cfg.weight_decay is not None
        else default_weight_decay(cfg),
        workers=plan.threads,
        cpu_threads=info.torch_threads.threads if info.torch_threads else cfg.cpu_threads,
        dali_decode=plan.decode or cfg.dali_decode,
        dali_hw_decoder_load=plan.hw_decoder_load,
        prefetch=plan.prefetch,
    )


def build_loaders(
    cfg: Config, data: DataSpec, info: dist.DistInfo, plan: LoaderPlan, dtype: torch.dtype
):
    common = dict(
        backend=cfg.loader,
        batch_size=cfg.batch_size,
        image_size=cfg.image_size,
        rank=info.rank,
        world_size=info.world_size,
        device=info.device,
        num_threads=cfg.workers,
        seed=cfg.seed,
        dtype=dtype,
        num_classes=len(data.class_names),
        dali_decode=cfg.dali_decode,
        prefetch=cfg.prefetch,
        dali_options=plan.dali_options(),
        auto_augment=cfg.auto_augment,  # the val loader ignores it
        # The ranks of each node split the file check: every node checks its own copy of
        # every file once (a file missing on one node alone is found at start, on that node).
        check_split=(info.local_rank, info.local_world_size),
    )

    def build():
        train = None if cfg.eval_only else build_loader(data.train_list, train=True, **common)
        if train is not None:
            check_train_labels(train, data)
        val = None
        if data.val_list:
            try:
                val = build_loader(data.val_list, train=False, **common)
            except EmptyListError:
                # make_lists --val-fraction 0 writes a val list of comments only: that asks
                # for no validation (but eval-only has nothing to do without one).
                if cfg.eval_only:
                    raise
                dist.print0(f"{data.val_list} holds no samples: training without validation")
        return train, val

    # Each rank checks only its node's slice of the files, so a missing one is found by one
    # rank: all ranks learn of it here and stop together, rank 0 saying which rank found what
    # (and that rank too, when on another node).
    # Bad lists, files and sizes (ValueError, OSError) are the user's input: the loaders name
    # the file.
    return agreed_by_all(info, build, input_errors=(ValueError, OSError))


def run_eval_only(
    cfg, data, info, model, val_loader, amp_dtype, *, results_dir: str, weights: dict
) -> dict:
    """``weights``: which file and epoch were scored, kept in eval.json beside the figures (a
    results folder read later must say what it measured, not only the console)."""
    if val_loader is None:
        raise TrainerError("--eval-only needs a validation list (--val-list)")
    metrics = evaluate(
        model,
        val_loader,
        num_classes=len(data.class_names),
        amp_dtype=amp_dtype,
        device=info.device,
        confusion=True,
    )
    confusion = metrics.pop("confusion")
    dist.print0(
        f"eval: top1 {metrics['val_top1']:.2f}% top5 {metrics['val_top5']:.2f}% "
        f"loss {metrics['val_loss']:.4f} over {metrics['val_images']} images"
    )
    if info.is_main:
        record = {**metrics, **weights, "val_list": cfg.val_list}
        atomic_write_text(os.path.join(results_dir, EVAL_FILE), json.dumps(record) + "\n")
        report_per_class(results_dir, confusion, data.class_names, plots=cfg.plots)
    return metrics


def report_per_class(run_dir: str, confusion, class_names: list[str], *, plots: bool) -> None:
    """Rank 0: per_class.csv, confusion_matrix.csv (and .png with ``plots``), and the 5 worst
    classes."""
    rows = run_metrics.write_per_class(run_dir, confusion, class_names)
    dist.print0(f"worst classes by top-1: {run_metrics.describe_worst(rows)}")
    picture = ""
    if plots:
        try:
            picture = f", {run_metrics.plot_confusion(run_dir, confusion, class_names)}"
        except run_metrics.PlotUnavailable as exc:
            picture = f" (no {run_metrics.CONFUSION_PNG}: {exc})"
    dist.print0(
        f"per-class figures: {os.path.join(run_dir, run_metrics.PER_CLASS)}, "
        f"{os.path.join(run_dir, run_metrics.CONFUSION_CSV)}{picture}"
    )


@dataclass
class Training:
    """What one optimization run carries from epoch to epoch."""

    model: nn.Module  # DDP-wrapped (and compiled) when asked; checkpoints unwrap it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    amp_dtype: torch.dtype | None
    ema: nn.Module | None = None  # AveragedModel of the weights (--ema-decay), or None
    batch_transform: Callable | None = None  # mixup / cutmix on the device, or None
    start_epoch: int = 0
    best_top1: float = 0.0
    elapsed_before: float = 0.0  # training seconds of the runs this one resumes
    # Resumed mid-epoch: the next step of start_epoch, and this rank's saved state there.
    start_step: int = 0
    rank_state: dict | None = None
    optimizer_steps_per_epoch: int = 0  # what one epoch advances the lr schedule by
    progress: dict | None = None
    fit_start: float = 0.0  # perf_counter() when fit() began
    # The final epoch's confusion matrices, of the raw and the EMA weights.
    confusion: dict = field(default_factory=dict)
    bare: nn.Module | None = None  # the model under those wrappers (default: model)
    head: frozenset = frozenset()  # the classifier's parameter names (model.head_tensor_names)
    frozen: bool | None = None  # the backbone frozen (--freeze-backbone-epochs); None: unwrapped
    frozen_modules: list = field(default_factory=list)  # its BatchNorm layers, kept in eval
    curves: Curves | None = None  # --tensorboard's writer (rank 0)

    def __post_init__(self) -> None:
        if self.bare is None:
            self.bare = self.model


def make_batch_transform(cfg: Config) -> Callable | None:
    """Mixup and/or CutMix (torchvision's, one of the two per batch when both are on) on the
    device after the loader: soft targets, which the label-smoothed loss takes as they are.
    Their random draws come from torch's generator, seeded per (seed, epoch, rank)."""
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        return None  # before importing v2, which imports torch._dynamo (torchvision_import.py)
    from torchvision.transforms import v2

    mixes = []
    if cfg.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=cfg.num_classes))
    if cfg.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=cfg.num_classes))
    mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    def mix_keeping_layout(images: torch.Tensor, labels: torch.Tensor):
        mixed, targets = mix(images, labels)
        # MixUp mixes each image with its neighbour by roll(1, 0), whose CUDA kernel returns
        # contiguous NCHW: the model would get NCHW batches (a layout conversion in its first
        # conv). A no-op where the layout is already right (CutMix, and MixUp on a CPU).
        if images.is_contiguous(memory_format=torch.channels_last):
            mixed = mixed.contiguous(memory_format=torch.channels_last)
        return mixed, targets

    return mix_keeping_layout


def build_training(
    cfg: Config, model: nn.Module, *, steps_per_epoch: int, amp_dtype, device
) -> Training:
    # The classifier: what --head-lr-mult speeds up and --freeze-backbone-epochs trains alone.
    head = frozenset()
    if cfg.head_lr_mult != 1.0 or cfg.freeze_backbone_epochs:
        head = frozenset(head_tensor_names(cfg.arch, cfg.num_classes))
    scaler = make_scaler(amp_dtype, device)
    # Every parameter, frozen ones too (they join the training later): built before any
    # freezing, since the optimizer leaves out parameters that need no gradient.
    optimizer = make_optimizer(
        model,
        name=cfg.optimizer,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        head=head,
        head_lr_mult=cfg.head_lr_mult,
        loss_scaling=scaler.is_enabled(),
    )
    # The schedule counts optimizer steps: with accumulation, fewer than batches.
    optimizer_steps = math.ceil(steps_per_epoch / cfg.grad_accum_steps)
    scheduler = make_scheduler(
        optimizer,
        warmup_steps=round(cfg.warmup_epochs * optimizer_steps),
        total_steps=cfg.epochs * optimizer_steps,
    )
    return Training(
        model=model,
        head=head,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        amp_dtype=amp_dtype,
        ema=make_ema(model, cfg.ema_decay),
        batch_transform=make_batch_transform(cfg),
        optimizer_steps_per_epoch=optimizer_steps,
    )


def resume_training(
    training: Training,
    checkpoint: dict,
    path: str,
    run_dir: str,
    *,
    batch_size: int,
    loader: str,
    train_digest: Callable[[], tuple],
    loader_graph: dict | None = None,
) -> None:
    """Load a checkpoint into the bare model and the optimizer, scheduler and scaler.

    A mid-epoch position is resumed there only when its loader state can be restored: the
    same ranks, batch, list and ``--loader``, and on every rank the same loader graph
    (``loader_graph``, this start's: DALI's decode placement, automatic augmentation, crop
    size). ``--dali-decode auto`` may resolve otherwise on another machine; a DALI state
    restored into another graph would draw other samples' augmentations, or fail. Otherwise
    the epoch restarts from its first step, with one note."""
    training.start_epoch, training.best_top1, notes = ckpt_io.restore_training_state(
        checkpoint,
        model=training.model,
        optimizer=training.optimizer,
        scaler=training.scaler,
        scheduler=training.scheduler,
        ema=training.ema,
    )
    training.elapsed_before = float(checkpoint.get("elapsed", 0.0))
    for line in notes:
        dist.print0(line)
    position = checkpoint.get("position")
    saved_steps = checkpoint.get("optimizer_steps_per_epoch")
    where = ""
    if position is not None:
        info = dist.current()
        same = position["world_size"] == info.world_size and position["batch_size"] == batch_size
        # Another list (moved data, another subset) gives epochs of another length.
        same = same and saved_steps in (None, training.optimizer_steps_per_epoch)
        # A loader's saved mid-epoch state (DALI's generators, PIL's seeds) fits itself only.
        same_loader = checkpoint["config"].get("loader", loader) == loader
        # The position is a step into the epoch's permutation of the list's lines: on a list
        # of other lines of the same length (reordered, images swapped) it would skip images
        # of this list and repeat others. A moved copy of the same list continues exactly.
        saved_list = position.get("train_list")
        same_list = saved_list is None or tuple(saved_list) == tuple(train_digest())
        # Each rank's own graph against the one it saved; every rank must agree (a
        # collective: all ranks reach it, the checkpoint being rank 0's for all).
        saved_ranks = checkpoint.get("ranks") or []
        saved_graph = (
            saved_ranks[info.rank].get("loader_graph") if info.rank < len(saved_ranks) else None
        )
        own_same = saved_graph is None or loader_graph is None or saved_graph == loader_graph
        same_graphs = dist.all_gather_objects(own_same if same_loader else True)
        same_graph = all(same_graphs)
        if same and same_loader and same_list and same_graph:
            training.start_step = int(position["step"])
            training.rank_state = checkpoint["ranks"][info.rank]
            training.progress = training.rank_state["progress"]
            where = f", resuming epoch {training.start_epoch + 1} at step {training.start_step + 1}"
            if training.ema is not None and training.rank_state.get("ema_buffers"):
                # Each rank's EMA averaged its own BatchNorm statistics: put back this rank's.
                for name, buffer in training.ema.module.named_buffers():
                    if name in training.rank_state["ema_buffers"]:
                        buffer.copy_(training.rank_state["ema_buffers"][name])
        else:
            ranks = "rank" if position["world_size"] == 1 else "ranks"
            saved_as = f"{position['world_size']} {ranks} x batch {position['batch_size']}"
            now = f"{info.world_size} x {batch_size}"
            if not same_loader:
                saved_as += f" with --loader {checkpoint['config']['loader']}"
                now += f" with --loader {loader}"
            if saved_steps not in (None, training.optimizer_steps_per_epoch):
                saved_as += f" ({saved_steps} optimizer steps an epoch)"
                now += f" ({training.optimizer_steps_per_epoch})"
            if not same_list:
                now += " on a train list of other images, labels or order"
            if not same_graph:
                rank = same_graphs.index(False)
                now += (
                    f" with another loader graph on rank {rank} (its decode placement, "
                    "augmentation or crop size differs from the one that saved the position)"
                )
            where = (
                f"; saved mid-epoch on {saved_as}, now {now}: epoch "
                f"{training.start_epoch + 1} restarts from its first step"
            )
    # The lr schedule counts optimizer steps. Resumed where it stopped, it goes on as saved;
    # but an epoch that restarts from its first step, or epochs of another length (another
    # world size, batch or list), would leave it ahead of or behind the epochs trained (a run
    # finished at lr 0 with epochs still to go): it is set to the start of the next epoch.
    restarts = position is not None and training.start_step == 0
    if restarts or saved_steps not in (None, training.optimizer_steps_per_epoch):
        set_schedule_position(
            training.scheduler, training.start_epoch * training.optimizer_steps_per_epoch
        )
        where += f"; lr schedule set to the start of epoch {training.start_epoch + 1}"
    else:
        # The optimizer's saved lr is the next step's on the saved schedule: with --epochs
        # changed (the cosine stretched or cut, the warmup with it) the first resumed step
        # would apply the old schedule's lr. Placed at its own position the lr follows the
        # schedule built now; unchanged, this is the saved lr to the bit.
        set_schedule_position(training.scheduler, training.scheduler.last_epoch)
    dist.print0(
        f"resumed from {path}: {training.start_epoch} epoch(s) done, "
        f"best top-1 {training.best_top1:.2f}%{where}"
    )
    if dist.is_main_process():
        run_metrics.truncate(run_dir, completed_epochs=training.start_epoch)


# The settings that make a run what it is: a resumed run that changed one would go on as
# another run (another order of samples, optimizer state that does not fit, a jump in the
# learning rate) under the first one's name and metrics.
SAME_RUN_FIELDS = (
    "optimizer", "lr", "momentum", "weight_decay", "label_smoothing",
    "seed", "batch_size", "grad_accum_steps", "clip_grad_norm", "ema_decay", "mixup_alpha",
    "cutmix_alpha", "auto_augment", "image_size", "progressive_resize", "amp", "head_lr_mult",
    "freeze_backbone_epochs",
)  # fmt: skip


def check_same_run(
    checkpoint: dict, path: str, cfg: Config, world_size: int, *, lr_given: bool
) -> None:
    """Refuse to resume with settings other than the checkpoint's, naming each difference
    (--epochs may change: a longer or shorter run, said in a line; so may the lists, moved
    or not, with a note)."""
    saved = checkpoint["config"]
    # Epochs begun: a step checkpoint is inside epoch "epoch" + 1. A run cut to fewer epochs
    # than that has nothing to train, and exported the checkpoint's weights (mid-epoch ones,
    # or later epochs') as a run of --epochs N: model.pt and per_class.csv were not those of
    # the epochs its metrics.jsonl and config.toml describe. The end of epoch N is not kept.
    reached = int(checkpoint["epoch"]) + (checkpoint.get("position") is not None)
    if cfg.epochs < reached:
        where = (
            f"in epoch {reached} (step {checkpoint['position']['step']})"
            if checkpoint.get("position") is not None
            else f"at the end of epoch {reached}"
        )
        raise TrainerError(
            f"{path}: saved {where}, past the end of --epochs {cfg.epochs}, whose weights are "
            f"not kept; resume with --epochs {reached} or more (best.pt holds the best epoch's "
            "weights)"
        )
    epochs_changed = saved.get("epochs") not in (None, cfg.epochs)
    # The warmup is capped at a quarter of --epochs, so it may change with them, not alone.
    fields = SAME_RUN_FIELDS if epochs_changed else (*SAME_RUN_FIELDS, "warmup_epochs")
    differ = [
        f"--{name.replace('_', '-')} {saved[name]!r} there, {getattr(cfg, name)!r} now"
        for name in fields
        if name in saved and saved[name] != getattr(cfg, name)
    ]
    if differ:
        hint = ""
        if any(d.startswith("--lr ") for d in differ) and not lr_given:
            hint = (
                " (the default lr follows the global batch, now "
                f"{global_batch(cfg, world_size)} = batch {cfg.batch_size} x {world_size} "
                f"rank{'s' if world_size != 1 else ''} x {cfg.grad_accum_steps} accumulated)"
            )
        raise TrainerError(
            f"{path}: resuming with other settings than the run's: {'; '.join(differ)}{hint}; "
            f"resume with the run's own (--config {os.path.join(cfg.output_dir, CONFIG_FILE)} "
            "--resume auto), or start a new run from its weights with --pretrained"
        )
    for name in ("train_list", "val_list"):
        if saved.get(name) not in (None, getattr(cfg, name)):
            dist.print0(
                f"note: --{name.replace('_', '-')} {getattr(cfg, name)} is not the run's "
                f"({saved[name]}): resuming on it as asked"
            )
    if epochs_changed:
        warmup = ""
        if saved.get("warmup_epochs") not in (None, cfg.warmup_epochs):
            warmup = f" (warmup {saved['warmup_epochs']:g} -> {cfg.warmup_epochs:g} epochs)"
        dist.print0(
            f"--epochs {cfg.epochs} (the run was started for {saved['epochs']}): the learning "
            f"rate schedule is stretched to the new length from here on{warmup}"
        )


def keep_run_cpu_threads(
    cfg: Config, info: dist.DistInfo, checkpoint: dict
) -> tuple[Config, TorchThreads | None]:
    """A resumed CPU run goes on with the torch threads it started with: the count changes
    the CPU arithmetic (the order of sums), so another count would end elsewhere than the
    uninterrupted run. Not where the run had more than this start's share of the cores.
    Returns the config and the threads run (``info``'s when the saved count is not kept)."""
    chosen = info.torch_threads
    saved = checkpoint["config"].get("cpu_threads")
    if chosen is None or not saved or saved == chosen.threads:
        return cfg, chosen
    if saved > dist.torch_threads_per_rank(info.local_world_size):
        return cfg, chosen
    torch.set_num_threads(saved)
    return replace(cfg, cpu_threads=saved), TorchThreads(
        saved,
        f"the run's own, for a bit for bit continuation; this start alone would run "
        f"{chosen.threads}: {chosen.reason}; --cpu-threads to choose",
    )


def training_state(cfg: Config, training: Training, data: DataSpec, *, next_epoch: int) -> dict:
    """What last.pt holds at an epoch end and at a step checkpoint alike (rank 0's)."""
    state = ckpt_io.checkpoint_state(
        model=training.model,
        optimizer=training.optimizer,
        scaler=training.scaler,
        scheduler=training.scheduler,
        next_epoch=next_epoch,
        best_top1=training.best_top1,
        config=config_dict(cfg),
        class_names=data.class_names,
        ema=training.ema,
    )
    # How far one epoch moves the lr schedule: a resume on epochs of another length sees it.
    state["optimizer_steps_per_epoch"] = training.optimizer_steps_per_epoch
    return state


def end_epoch(cfg: Config, training: Training, data: DataSpec, record: dict) -> None:
    """Rank 0: print the summary, append metrics.jsonl, write last.pt (and best.pt)."""
    top1 = record["val_top1"]
    # With an EMA, an epoch is as good as the better of its two sets of weights.
    score = max(top1, record["val_top1_ema"] or 0.0) if top1 is not None else None
    is_best = score is None or score > training.best_top1
    if score is not None:
        training.best_top1 = max(training.best_top1, score)
    val_text = (
        f"val top1 {top1:.2f}% top5 {record['val_top5']:.2f}% loss {record['val_loss']:.4f} "
        if top1 is not None
        else ""
    )
    if record["val_top1_ema"] is not None:
        val_text += f"(EMA top1 {record['val_top1_ema']:.2f}%) "
    dist.print0(
        f"epoch {record['epoch']}/{cfg.epochs} done: train loss {record['train_loss']:.4f} "
        f"{val_text}{record['images_per_sec_per_gpu']:.1f} img/s/gpu "
        f"data-wait {record['data_wait_fraction']:.0%} ({record['elapsed']:.0f}s)"
    )
    if not dist.is_main_process():
        return
    run_metrics.append(cfg.output_dir, record)
    state = training_state(cfg, training, data, next_epoch=record["epoch"])
    state["elapsed"] = record["elapsed"]
    # best.pt before last.pt: last.pt records this epoch's score as the best, so once it is
    # written a resume never saves this epoch as best.pt again. A run that stopped between
    # the two (killed, or best.pt's write failing on a full disk) kept a best.pt of an earlier,
    # worse epoch (or none) after --resume auto; this way it redoes the epoch and saves both.
    last = os.path.join(cfg.output_dir, ckpt_io.LAST)
    if is_best:
        best = os.path.join(cfg.output_dir, ckpt_io.BEST)
        ckpt_io.atomic_save(state, best)
        # The same bytes: written once (a ResNet50's with SGD is 200 MB, on shared storage
        # while every rank waits), last.pt a second name of best.pt's file.
        if atomic_link(best, last):
            return
    ckpt_io.atomic_save(state, last)


def evaluate_weights(
    training: Training, kind: str, val_loader, data: DataSpec, info: dist.DistInfo, confusion: bool
) -> dict:
    """Evaluate the raw ("raw") or averaged ("ema") weights; keep the confusion matrix."""
    model = training.model if kind == "raw" else training.ema.module
    metrics = evaluate(
        model,
        val_loader,
        num_classes=len(data.class_names),
        amp_dtype=training.amp_dtype,
        device=info.device,
        confusion=confusion,
    )
    training.confusion[kind] = metrics.pop("confusion", None)
    return metrics


def wrap_for_epoch(cfg: Config, info: dist.DistInfo, training: Training, epoch: int) -> None:
    """Wrap the model (compile, DDP) for ``epoch``, with its backbone frozen while ``epoch`` is
    within --freeze-backbone-epochs: only the head's parameters need gradients (backward
    stops there: those epochs cost about a forward pass), and the frozen part's BatchNorm
    layers keep their pretrained statistics. DDP hooks the parameters that need gradients
    when it is built, so each change builds a new wrapper. A function of the epoch alone:
    a run resumed inside or after those epochs trains as the uninterrupted one did."""
    frozen = epoch < cfg.freeze_backbone_epochs
    if training.frozen is not None and frozen == training.frozen:
        return
    bare = training.bare
    for name, param in bare.named_parameters():
        param.requires_grad_(not frozen or name in training.head)
    training.frozen_modules = [
        module
        for module in (bare.modules() if frozen else ())
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and not any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    if training.frozen is not None:
        dist.print0(
            f"epoch {epoch + 1}: the whole model trains from here (--freeze-backbone-epochs "
            f"{cfg.freeze_backbone_epochs})"
        )
    elif frozen:
        last = min(cfg.freeze_backbone_epochs, cfg.epochs)
        epochs = f"epoch {last}" if last == epoch + 1 else f"epochs {epoch + 1}-{last}"
        dist.print0(
            f"{epochs}: the backbone is frozen (its BatchNorm statistics too), training "
            f"{', '.join(sorted(training.head))} alone (--freeze-backbone-epochs)"
        )
    training.frozen = frozen
    training.model = bare  # the old wrapper, and its gradient hooks, go before a new one
    training.model = wrap_ddp(compile_model(bare, cfg.compile), info.device, info.world_size)


def fit(
    cfg: Config,
    info: dist.DistInfo,
    data: DataSpec,
    training: Training,
    loaders,
    control: StepControl | None = None,
) -> None:
    """The epoch loop: train_one_epoch -> evaluate -> end_epoch."""
    train_loader, val_loader = loaders
    start_time = training.fit_start = time.perf_counter()
    if control is not None:
        control.in_training = True  # from here a signal is acted on at an agreed step
    if training.start_epoch >= cfg.epochs and val_loader is not None:
        # Resumed from the last epoch's checkpoint: the run was stopped after it was saved
        # (a signal during the final evaluation, a kill during the export). The per-class
        # figures come from that evaluation, which the stop lost: evaluate the final weights
        # again, or the finished run would have no per_class.csv and confusion matrix.
        evaluate_weights(training, "raw", val_loader, data, info, True)
        if training.ema is not None:
            evaluate_weights(training, "ema", val_loader, data, info, True)
    for epoch in range(training.start_epoch, cfg.epochs):
        # Seeded per epoch and rank, so a resumed run draws what the uninterrupted one would.
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1_009 + info.rank)
        start_step, rank_state, progress = 0, None, None
        if epoch == training.start_epoch and training.start_step:
            start_step, rank_state, progress = (
                training.start_step,
                training.rank_state,
                training.progress,
            )
            torch.set_rng_state(rank_state["torch_rng"])
            if rank_state.get("cuda_rng") is not None and info.device.type == "cuda":
                torch.cuda.set_rng_state(rank_state["cuda_rng"], info.device)
        wrap_for_epoch(cfg, info, training, epoch)
        size = train_image_size(cfg, epoch)
        if size != train_loader.image_size:
            train_loader.set_image_size(size)
            dist.print0(f"epoch {epoch + 1}: training crops of {size} px (--progressive-resize)")
        epoch_start = time.perf_counter()
        stats = train_one_epoch(
            training.model,
            train_loader,
            epoch=epoch,
            epochs=cfg.epochs,
            criterion=training.criterion,
            optimizer=training.optimizer,
            scaler=training.scaler,
            scheduler=training.scheduler,
            amp_dtype=training.amp_dtype,
            device=info.device,
            log_interval=cfg.log_interval,
            ema=training.ema,
            start_step=start_step,
            loader_state=rank_state["loader"] if rank_state else None,
            progress=progress,
            control=control,
            grad_accum_steps=cfg.grad_accum_steps,
            clip_grad_norm=cfg.clip_grad_norm or None,
            batch_transform=training.batch_transform,
            frozen_modules=training.frozen_modules,
            on_log=training.curves.log_window if training.curves else None,
            on_first_batch=first_batch_picture(cfg, info, data, train_loader)
            if epoch == 0 and start_step == 0
            else None,
        )
        # One set of BatchNorm statistics for evaluation and the checkpoint, whatever the rank.
        # The EMA's too, validated or not: without validation model.pt is the EMA's weights.
        average_batchnorm_buffers(training.model)
        if training.ema is not None:
            average_batchnorm_buffers(training.ema)
        val = {"val_top1": None, "val_top5": None, "val_loss": None}
        ema_val = {"val_top1": None, "val_loss": None}
        if val_loader is not None:
            # Per-class figures (the confusion matrix) for the final weights only.
            last_epoch = epoch == cfg.epochs - 1

            val = evaluate_weights(training, "raw", val_loader, data, info, last_epoch)
            if training.ema is not None:
                ema_val = evaluate_weights(training, "ema", val_loader, data, info, last_epoch)
        record = {
            "epoch": epoch + 1,
            "train_loss": stats["train_loss"],
            "val_top1": val["val_top1"],
            "val_top5": val["val_top5"],
            "val_loss": val["val_loss"],
            "val_top1_ema": ema_val["val_top1"],
            "val_loss_ema": ema_val["val_loss"],
            "train_image_size": train_loader.image_size,
            "images_per_sec_per_gpu": stats["images_per_sec_per_gpu"],
            "data_wait_fraction": stats["data_wait_fraction"],
            "lr": stats["lr"],
            **({"lr_head": stats["lr_head"]} if stats["lr_head"] is not None else {}),
            "epoch_seconds": time.perf_counter() - epoch_start,
            "elapsed": training.elapsed_before + time.perf_counter() - start_time,
        }
        end_epoch(cfg, training, data, record)
        if training.curves is not None:
            training.curves.log_epoch(record)
        if control is not None:  # a signal during the last steps or evaluation stops here
            control.after_epoch(saved=os.path.join(cfg.output_dir, ckpt_io.LAST))
    if control is not None:
        control.in_training = False


def first_batch_picture(cfg: Config, info: dist.DistInfo, data: DataSpec, train_loader):
    """Rank 0 of a run starting at its first step: a callback drawing that first batch into
    ``train_batch.png`` (what the model sees; ``tools/show_batch.py`` draws any), or None."""
    if not info.is_main or not cfg.plots:
        return None

    def draw(images: torch.Tensor, labels: torch.Tensor) -> None:
        path = os.path.join(cfg.output_dir, TRAIN_BATCH)
        title = f"first training batch of rank 0: {cfg.loader}, {train_loader.image_size} px"
        try:
            draw_batch(images, labels, data.class_names, path, title=title, max_images=32)
        except run_metrics.PlotUnavailable:
            return  # no matplotlib: the run goes on without the picture
        dist.print0(f"the first batch as the model sees it: {path}")

    return draw


def final_weights(training: Training, records: list[dict]) -> tuple[nn.Module, str]:
    """The weights model.pt gets: the EMA's when it scored at least as well on the last
    epoch's validation (or when there was none), else the raw ones; and which it was."""
    if training.ema is None:
        return training.model, "raw"
    last = records[-1] if records else {}
    raw, ema = last.get("val_top1"), last.get("val_top1_ema")
    if raw is not None and ema is not None and raw > ema:
        return training.model, "raw"
    return training.ema.module, "ema"


def save_position(
    cfg: Config,
    info: dist.DistInfo,
    data: DataSpec,
    training: Training,
    train_loader,
    *,
    epoch: int,
    next_step: int,
    progress,
    train_digest: Callable[[], tuple],
) -> str:
    """A step checkpoint (every rank takes part): last.pt at ``next_step`` of ``epoch``.

    The shared state (weights, optimizer, scaler, schedule, EMA) is rank 0's, as at an epoch
    end; what differs per rank is gathered: the loader's state (DALI's random generators),
    torch's generators, the EMA's BatchNorm statistics and the epoch's running sums.
    """
    rank_state = {
        "loader": train_loader.state(),
        "loader_graph": train_loader.graph(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(info.device) if info.device.type == "cuda" else None,
        "progress": progress(),
        "ema_buffers": (
            {n: b.detach().cpu() for n, b in training.ema.module.named_buffers()}
            if training.ema is not None
            else None
        ),
    }
    ranks = dist.all_gather_objects(rank_state)
    path = os.path.join(cfg.output_dir, ckpt_io.LAST)
    if info.is_main:
        state = training_state(cfg, training, data, next_epoch=epoch)  # this one is not done
        state["position"] = {
            "epoch": epoch,
            "step": next_step,
            "world_size": info.world_size,
            "batch_size": cfg.batch_size,
            "train_list": train_digest(),  # its lines, wherever the list and images are
        }
        state["ranks"] = ranks
        state["elapsed"] = training.elapsed_before + time.perf_counter() - training.fit_start
        ckpt_io.atomic_save(state, path)
        dist.print0(f"step checkpoint: epoch {epoch + 1} step {next_step} -> {path}")
    return path


def run(cfg: Config, info: dist.DistInfo, control: StepControl | None = None) -> None:
    """Everything after the ranks are up: data, model, resume, then train or evaluate."""
    check_same_command(cfg, info)
    check_available(cfg)  # --tensorboard without its package: one line, before any work
    # Rank 0 alone owns the output folder (other nodes may not even see it).
    decided_by_main(info, lambda: check_output_dir(cfg))
    # Every rank reads its own lists and classes file (on another node, its own copies): a
    # rank alone failing here must not exit without a word while the others wait for it.
    data = agreed_by_all(info, lambda: resolve_data(cfg, info), input_errors=(ValueError, OSError))
    if not cfg.eval_only and cfg.warmup_epochs > cfg.epochs * MAX_WARMUP_FRACTION:
        # A warmup longer than the run never reaches the peak rate: a 3-epoch fine-tune with
        # 5 warmup epochs ended at chance on data that reaches 98% with 1.
        capped = cfg.epochs * MAX_WARMUP_FRACTION
        dist.print0(
            f"a warmup of {cfg.warmup_epochs:g} epochs (--warmup-epochs) is over a quarter of "
            f"the run's {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}: warming up for "
            f"{capped:g} epochs instead"
        )
        cfg = replace(cfg, warmup_epochs=capped)
    plan = plan_loader(cfg, info)
    lr_given = cfg.lr is not None  # before resolve_config fills in the default
    threads_given = cfg.cpu_threads is not None
    cfg = resolve_config(cfg, data, info, plan)
    amp_dtype, note = resolve_amp(cfg.amp, info.device)
    if note:
        dist.print0(note)
    if cfg.eval_only and not (cfg.resume or cfg.pretrained):
        raise TrainerError("--eval-only needs weights: --resume PATH|auto or --pretrained PATH")
    check_input_sizes(
        cfg.arch,
        [cfg.image_size],
        num_classes=len(data.class_names),
        train_sizes=[] if cfg.eval_only else {train_image_size(cfg, e) for e in range(cfg.epochs)},
    )
    # A torchvision weights name: checked against --arch now, saved resolved (DEFAULT is
    # whatever torchvision calls the best today), fetched only when the model is built.
    named = named_weights.resolve(cfg.pretrained, cfg.arch) if cfg.pretrained else None
    if named is not None:
        cfg = replace(cfg, pretrained=named.name)
    pretrained_facts = named.facts() if named is not None else None
    # The loaders parse the lists and stat every file: a bad line or a missing image fails
    # here, before any checkpoint or model work.
    train_loader, val_loader = build_loaders(cfg, data, info, plan, amp_dtype or torch.float32)
    # Computed once (1.28M paths take a moment), when first asked: by the node check of a
    # distributed run, or when a step checkpoint is saved or resumed.
    train_digest = functools.cache(lambda: list_digest(train_loader))
    check_same_data(data, info, train_loader, val_loader, train_digest=train_digest)
    # Rank 0 decides what every rank resumes from: a node that saw another last.pt (or none)
    # must not start from something else, or from scratch, in silence.
    resume_path = decided_by_main(info, lambda: ckpt_io.resolve_resume(cfg.resume, cfg.output_dir))
    checkpoint = load_agreed_checkpoint(resume_path, info) if resume_path else None
    check_same_resume(cfg, info, resume_path, checkpoint)
    if cfg.eval_only and resume_path is None and not cfg.pretrained:
        raise TrainerError(
            f"--eval-only --resume auto: no {ckpt_io.LAST} in {cfg.output_dir}, nothing to "
            "evaluate (give --resume PATH or --pretrained PATH)"
        )
    if cfg.resume == "auto" and resume_path is None:
        dist.print0(f"--resume auto: no {ckpt_io.LAST} in {cfg.output_dir}, starting fresh")
    if checkpoint is not None:
        ckpt_io.check_compatible(
            checkpoint,
            resume_path,
            arch=cfg.arch,
            num_classes=len(data.class_names),
            class_names=data.named_classes,
        )

    # The checkpoint's weights replace any others: a resume needs no --pretrained file (nor
    # a download of one).
    pretrained_file = cfg.pretrained if checkpoint is None else None
    if pretrained_file is not None and named is not None:
        pretrained_file = named_weights.fetch_for_node(named, info)
    if checkpoint is not None and cfg.pretrained and not cfg.eval_only:
        dist.print0(f"resuming: the weights are {resume_path}'s, --pretrained is not loaded")
    # Same initial weights on every rank (DDP would broadcast rank 0's anyway).
    torch.manual_seed(cfg.seed)
    try:
        model = build_model(
            cfg.arch,
            num_classes=len(data.class_names),
            device=info.device,
            pretrained=pretrained_file,
            pretrained_name=named.name if named is not None else None,
            sync_bn=cfg.sync_bn and info.distributed,
            channels_last=cfg.channels_last,
            log=dist.print0,
            require_head=cfg.eval_only and checkpoint is None,
            class_names=data.named_classes,
        )
    except TrainerError as exc:
        if named is None or named.file not in str(exc):
            raise
        # A damaged copy in the cache (one fetched elsewhere and cut short): say how to
        # replace it; a download of this trainer's is checked before it gets that name.
        raise TrainerError(f"{exc}; delete it to download {named.name} again") from None
    if cfg.eval_only:
        # Results of its own, beside (never over) the training run whose weights it reads.
        results_dir = decided_by_main(info, lambda: eval_results_dir(cfg.output_dir))
        if info.is_main:  # eval_results_dir has made the folder
            save_config(cfg, os.path.join(results_dir, CONFIG_FILE), pretrained=pretrained_facts)
        if checkpoint is not None:
            ckpt_io.restore_training_state(checkpoint, model=model)
            dist.print0(f"eval-only: weights of {resume_path} (epoch {checkpoint['epoch']})")
            weights = {"weights": os.path.abspath(resume_path), "epoch": checkpoint["epoch"]}
        elif named is not None:
            weights = {"weights": named.name, "file": pretrained_file, "epoch": None}
        else:
            weights = {"weights": os.path.abspath(cfg.pretrained), "epoch": None}
        run_eval_only(
            cfg, data, info, model, val_loader, amp_dtype, results_dir=results_dir, weights=weights
        )
        dist.print0(f"eval-only: results in {results_dir}")
        return

    torch_threads = info.torch_threads
    if checkpoint is not None:  # before config.toml is written: a refusal changes nothing
        check_same_run(checkpoint, resume_path, cfg, info.world_size, lr_given=lr_given)
        if not threads_given:
            cfg, torch_threads = keep_run_cpu_threads(cfg, info, checkpoint)

    def claim_output_dir() -> None:
        os.makedirs(cfg.output_dir, exist_ok=True)
        lock_output_dir(cfg.output_dir)  # a folder made since check_output_dir: lock it now
        save_config(cfg, os.path.join(cfg.output_dir, CONFIG_FILE), pretrained=pretrained_facts)

    decided_by_main(info, claim_output_dir)

    training = build_training(
        cfg, model, steps_per_epoch=len(train_loader), amp_dtype=amp_dtype, device=info.device
    )
    if checkpoint is not None:
        resume_training(
            training,
            checkpoint,
            resume_path,
            cfg.output_dir,
            batch_size=cfg.batch_size,
            loader=cfg.loader,
            train_digest=train_digest,
            loader_graph=train_loader.graph(),
        )
    del checkpoint  # its tensors are in the model now; free the CPU copy
    # compile and DDP after loading, so the checkpoint's bare names match the bare model.
    wrap_for_epoch(cfg, info, training, training.start_epoch)

    # Whole global batches only (as DistributedSampler with drop_last): the remainder is left
    # out of each epoch, a fresh draw each time; with few images per rank it is a large share.
    left_out = train_loader.dataset_size - len(train_loader) * cfg.batch_size * info.world_size
    steps = f"{len(train_loader)} steps/epoch"
    if left_out:
        steps += f" ({left_out} images left out of each, drawn anew)"
    dist.print0(
        f"training {cfg.arch} on {info.world_size} x {info.device.type}: "
        f"{train_loader.dataset_size} train / {val_loader.dataset_size if val_loader else 0} val "
        f"images, {len(data.class_names)} classes, {cfg.image_size}px, batch {cfg.batch_size}/GPU "
        f"(global {global_batch(cfg, info.world_size)}), {steps}, "
        f"{cfg.optimizer} lr {cfg.lr:.4g}"
        + (f" (head x{cfg.head_lr_mult:g})" if cfg.head_lr_mult != 1.0 else "")
        + f", {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, "
        f"amp {cfg.amp}, "
        f"output {cfg.output_dir}"
    )
    dist.print0(f"loader: {plan.describe()}")
    if torch_threads is not None:
        dist.print0(f"torch: {torch_threads.describe()}")
    if val_loader is None:
        dist.print0("no validation list: no evaluation; best.pt follows the last epoch")
    if training.start_epoch >= cfg.epochs:
        dist.print0(f"nothing to train: the checkpoint already holds {training.start_epoch} epochs")
    if control is not None:

        def save(*, epoch: int, next_step: int, progress) -> str:
            return save_position(
                cfg, info, data, training, train_loader,
                epoch=epoch, next_step=next_step, progress=progress, train_digest=train_digest,
            )  # fmt: skip

        control.save = save
    training.curves = Curves(
        cfg,
        is_main=info.is_main,
        first_step=training.start_epoch * len(train_loader) + training.start_step,
        steps_per_epoch=len(train_loader),
    )
    try:
        fit(cfg, info, data, training, (train_loader, val_loader), control)
    except BaseException:
        training.curves.close()  # what was written stays; a resume continues the curves
        raise
    training.curves.close(cfg, best_top1=training.best_top1 if val_loader else None)

    if info.is_main:
        export = os.path.join(cfg.output_dir, ckpt_io.EXPORT)
        records = run_metrics.read(cfg.output_dir)
        weights, which = final_weights(training, records)
        ckpt_io.export_model(
            export,
            model=weights,
            arch=cfg.arch,
            class_names=data.class_names,
            image_size=cfg.image_size,
            weights=which,
            pretrained=pretrained_facts,
        )
        best = f"best val top-1 {training.best_top1:.2f}%" if val_loader else "no validation"
        dist.print0(
            f"done: {best}; "
            f"{'EMA weights' if which == 'ema' else 'weights'} for inference in "
            f"{export} (loading it needs only torchvision, see trainer/checkpoint.py)"
        )
        if training.confusion.get(which) is not None:
            report_per_class(
                cfg.output_dir, training.confusion[which], data.class_names, plots=cfg.plots
            )
        if not cfg.plots:
            return
        if not records:  # resumed from another folder's finished run: no epoch ran here
            dist.print0(f"no {run_metrics.PNG}: no epochs were trained in {cfg.output_dir}")
            return
        try:
            dist.print0(f"loss and top-1 per epoch: {run_metrics.plot(cfg.output_dir)}")
        except run_metrics.PlotUnavailable as exc:
            dist.print0(f"no {run_metrics.PNG}: {exc}")


def main(argv: list[str] | None = None, *, freeze_startup: bool = False) -> int:
    """The command line's run; ``freeze_startup``: the process is the trainer's alone, and
    what its start-up made is frozen out of the garbage collector's walk (pipelines/heap.py)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        # `srun -n N python trainer/main.py`: Slurm started the ranks; its variables become
        # torchrun's, so this process is one rank, not a launcher of its own.
        dist.adopt_slurm_step()
    except dist.DistSetupError as exc:
        return fail(str(exc), speak=os.environ.get("SLURM_PROCID", "0") == "0")
    first_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg = parse_config(argv)
        # Only the flag: a `processes` in a --config file (a saved config.toml of a run that
        # started itself) means nothing to a worker torchrun started.
        processes_flag = any(a == "--processes" or a.startswith("--processes=") for a in argv)
        if launched_by_torchrun(cfg) and processes_flag:
            if dist.slurm_task():  # srun started this task: its task count decides
                raise TrainerError(
                    "--processes is for runs without a launcher; under srun, its --ntasks "
                    "(or --ntasks-per-node) decides"
                )
            raise TrainerError(
                "--processes is for runs without torchrun; under torchrun, --nproc_per_node decides"
            )
    except TrainerError as exc:
        return fail(str(exc), speak=first_rank)
    if not launched_by_torchrun(cfg):
        nproc, why = processes_to_start(cfg)
        if nproc > 1:
            print(f"starting {nproc} processes with torchrun ({why})", flush=True)
            return relaunch_under_torchrun(__file__, nproc, argv)
    if freeze_startup:  # a process of its own, not a caller's (the tests')
        # The size check (trainer.model.check_input_sizes) and the optimizer import
        # torch._dynamo: in now, and frozen with the rest (pipelines/heap.py).
        heap.freeze_startup_objects(with_dynamo=True)
    try:
        info = dist.setup_distributed(
            timeout_s=cfg.dist_timeout, local_rank=cfg.local_rank, cpu_threads=cfg.cpu_threads
        )
    except dist.DistSetupError as exc:
        # A rendezvous fault is each node's own: the first rank of each says it.
        local_first = os.environ.get("LOCAL_RANK", "0") == "0"
        return fail(str(exc), speak=first_rank or (exc.every_node and local_first))
    control = StepControl(every_steps=cfg.checkpoint_every, every_minutes=cfg.checkpoint_minutes)
    control.install()
    try:
        run(cfg, info, control)
    except Stopped as exc:
        # Rank 0, and the first rank of every other node: the terminal or log of the node
        # that got the Ctrl-C (or the scheduler's signal) says it too.
        if info.is_main or info.local_rank == 0:
            last = os.path.join(cfg.output_dir, ckpt_io.LAST)
            if exc.saved:
                where = f"saved {exc.saved} at this step: continue with --resume auto"
            elif os.path.isfile(last):
                where = f"continue from {last} with --resume auto"
            else:
                where = "no checkpoint was written yet"
            print(
                f"stopped by {exc.signal_name} (a preemption, Ctrl-C, or torchrun ending the job "
                f"after another rank failed); {where}",
                file=sys.stderr,
                flush=True,
            )
        return 128 + exc.signum
    except RankError as exc:
        return fail(f"rank {info.rank}: {exc}")
    except (TrainerError, ListError) as exc:
        # The user's input, not our bug: one line, no traceback. Every rank finds the same
        # fault (each checks its inputs, or rank 0 decided for all), so all exit 2; rank 0
        # alone says why.
        return fail(str(exc), speak=info.is_main)
    except FetchError as exc:
        # The bucket failed mid-epoch (an endpoint gone, an object deleted): the rank that met
        # it says so; nothing was saved over, and the run continues where its last
        # checkpoint stopped once the storage is back.
        return fail(
            f"rank {info.rank}: {exc} (the storage failed mid-run: once it is reachable, "
            "continue with --resume auto)"
        )
    except ImageError as exc:
        # A bad image met mid-epoch: only the rank reading it knows, so that rank says it; its
        # exit makes torchrun stop the others.
        return fail(
            f"rank {info.rank}: {exc} (to find every unreadable image before training: "
            "python tools/make_lists.py ROOT --out-dir DIR --verify)"
        )
    except OSError as exc:
        # A write into the output folder failed (a full disk, a quota) outside the checkpoints,
        # which say it themselves: config.toml, metrics, per-class files. Rank 0 alone writes.
        folder = os.path.abspath(cfg.output_dir) + os.sep
        if not (exc.filename and os.path.abspath(exc.filename).startswith(folder)):
            raise
        return fail(
            f"could not write {exc.filename} ({exc.strerror or exc}): free some space or use "
            "another --output-dir, then --resume auto"
        )
    except Exception as exc:
        if info.distributed and dist.peer_timed_out(exc):
            # Nobody else can say it: the silent rank is hung, stopped or cut off.
            fail(
                f"rank {info.rank}: waited --dist-timeout ({cfg.dist_timeout:g} s) for another "
                "rank that went silent (a hung or stopped process, a lost node or network); "
                "the job stops: continue with --resume auto once every node is back"
            )
            return 3
        if info.distributed and dist.peer_failed(exc):
            # Another rank died (and said why): this one stops with one line, no traceback,
            # and torchrun's root cause stays the rank that failed.
            line = (
                f"rank {info.rank}: stopping: another rank failed (its error line, or the "
                "launcher's report of how it died, says why)"
            )
            print(line, file=sys.stderr, flush=True)
            write_error_file(line, consequence=True)
            return 3
        raise
    finally:
        control.uninstall()
        control.drain(quiet=True)
        dist.cleanup_distributed()
        unlock_output_dir()
    return 0


if __name__ == "__main__":
    sys.exit(main(freeze_startup=True))
