"""The training step, one training epoch, and evaluation: plain functions, the step in plain sight.

Modelled on torchvision's references/classification/train.py and nanoGPT's train.py. The host
never waits for the device inside an epoch: losses accumulate on the device and are read (one
all-reduce, one sync) only every ``log_interval`` steps and at the end of the epoch. The one
exception is fp16: torch's GradScaler reads its overflow flag on the host at every step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from trainer import dist
from trainer.config import TrainerError
from trainer.model import build_model, compile_model, wrap_ddp

# Module types whose parameters get no weight decay: decaying a norm layer's scale or shift
# only fights the normalization (Goyal et al. 2017; torchvision's --norm-weight-decay 0).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,  # also torchvision's LayerNorm2d (a subclass)
    nn.LocalResponseNorm,
)
if hasattr(nn, "RMSNorm"):
    NORM_TYPES += (nn.RMSNorm,)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def resolve_amp(amp: str, device: torch.device) -> tuple[torch.dtype | None, str | None]:
    """The autocast dtype for ``--amp`` on ``device`` (None = float32), and a note if changed.

    bf16 needs no loss scaling and runs on CPUs and on Ampere or newer GPUs; older GPUs get
    fp16 (with a grad scaler) instead.
    """
    if amp not in AMP_DTYPES:
        raise TrainerError(f"--amp must be one of {', '.join(AMP_DTYPES)}, not {amp!r}")
    dtype = AMP_DTYPES[amp]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16, "--amp bf16: this GPU lacks bfloat16, using fp16 with loss scaling"
    return dtype, None


def make_scaler(amp_dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling only for fp16 (bf16 has float32's range); disabled it is a pass-through."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)


HEAD_GROUP = "head"  # the "name" of the head's parameter groups (--head-lr-mult)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    head: frozenset[str] | set[str] = frozenset(),
    head_lr: float | None = None,
) -> list[dict]:
    """Two groups: weights with decay; norm-layer parameters and every bias without (a
    parameter named ``bias`` or ``*_bias``, e.g. attention's ``in_proj_bias``).

    ``head_lr``: the parameters named in ``head`` get groups of their own (two more, as
    above) at this learning rate, whose warmup and cosine the schedule scales alike."""
    split_head = head_lr is not None
    buckets: dict[tuple[bool, bool], list] = {}
    seen = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            # "*_bias": nn.MultiheadAttention's in_proj_bias (torchvision's ViTs), a bias too.
            decays = not (
                isinstance(module, NORM_TYPES) or name == "bias" or name.endswith("_bias")
            )
            in_head = split_head and f"{module_name}.{name}".lstrip(".") in head
            buckets.setdefault((in_head, decays), []).append(param)
    groups = [{"params": buckets.get((False, True), []), "weight_decay": weight_decay}]
    if buckets.get((False, False)):
        groups.append({"params": buckets[(False, False)], "weight_decay": 0.0})
    for decays in (True, False):
        if buckets.get((True, decays)):
            groups.append(
                {
                    "params": buckets[(True, decays)],
                    "weight_decay": weight_decay if decays else 0.0,
                    "lr": head_lr,
                    "name": HEAD_GROUP,
                }
            )
    return groups


def head_lr_now(optimizer: torch.optim.Optimizer) -> float | None:
    """The head's current lr when it has groups of its own (--head-lr-mult), else None."""
    for group in optimizer.param_groups:
        if group.get("name") == HEAD_GROUP:
            return group["lr"]
    return None


def make_optimizer(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    head: frozenset[str] | set[str] = frozenset(),
    head_lr_mult: float = 1.0,
    loss_scaling: bool = False,
) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, AdamW or Adam, weight decay off for norms and biases;
    the parameters named in ``head`` at ``head_lr_mult`` x ``lr`` when that is not 1.
    ``loss_scaling``: an enabled grad scaler (fp16) will step it."""
    head_lr = lr * head_lr_mult if head_lr_mult != 1.0 else None
    if name == "sgd":
        kind, settings = torch.optim.SGD, {"momentum": momentum, "nesterov": momentum > 0}
    elif name == "adamw":
        kind, settings = torch.optim.AdamW, {}
    elif name == "adam":
        # Adam's weight_decay is L2 added to the gradient (unlike AdamW's decoupled decay).
        kind, settings = torch.optim.Adam, {}
    else:
        raise TrainerError(f"--optimizer must be sgd, adamw or adam, not {name!r}")

    def build(**implementation) -> torch.optim.Optimizer:
        # Fresh groups each time: a refused build has written its settings into the ones it got.
        groups = param_groups(model, weight_decay, head=head, head_lr=head_lr)
        return kind(groups, lr=lr, **settings, **implementation)

    # On the CPU torch's default is its per-tensor Python loop (foreach and fused are its
    # defaults on CUDA only): 83 ms a step for a ResNet-18's AdamW on one core, against 18 ms
    # for the fused kernel (SGD: 31 against 12). On a GPU torch's own default stays. Not under
    # a grad scaler: a fused optimizer takes the scaler's overflow flag into its kernel, so its
    # step() runs even when the update is skipped, and the schedule (which counts the steps
    # that ran, train_step) would move on.
    if next(model.parameters()).device.type == "cpu" and not loss_scaling:
        try:
            return build(fused=True)
        except RuntimeError:  # a torch without this optimizer's CPU kernel
            pass
    return build()


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak lr, then cosine decay to zero; stepped once per iteration.

    Per-step rather than per-epoch so a short run (few, long epochs) still warms up smoothly.
    A plain closure, not an object: LambdaLR would pickle an object's attributes into its
    state dict and a resumed run with other settings would silently get the old schedule.
    """
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_schedule_position(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put ``scheduler`` at optimizer step ``step`` and its optimizer at that step's lr, as
    if it had been stepped there (a resume whose epochs changed length, see main)."""
    scheduler.last_epoch = step
    lrs = [
        base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


# GoogLeNet and Inception v3 return their auxiliary classifiers' logits too in training mode
# (a namedtuple, the main logits first). Each auxiliary loss adds with GoogLeNet's paper's
# weight: the aux heads must get gradients (DDP waits for every parameter's), and they are
# what those models were designed to train with. Evaluation (eval mode) sees only the logits.
AUX_LOSS_WEIGHT = 0.3


def model_loss(output, labels: torch.Tensor, criterion) -> torch.Tensor:
    """``criterion`` of the model's output: plain logits, or main + auxiliary heads' logits."""
    if not isinstance(output, tuple):
        return criterion(output, labels)
    main, *auxiliary = output
    loss = criterion(main, labels)
    for logits in auxiliary:
        if logits is not None:  # a model built without aux heads leaves its field None
            loss = loss + AUX_LOSS_WEIGHT * criterion(logits, labels)
    return loss


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    amp_dtype: torch.dtype | None = None,
    ema: AveragedModel | None = None,
    clip_grad_norm: float | None = None,
    micro_step: int = 0,
    micro_steps: int = 1,
    batch_transform: Callable | None = None,
) -> torch.Tensor:
    """One optimization step, or micro-step ``micro_step`` of ``micro_steps`` accumulated into
    one. Returns the loss, detached and still on the device (no sync).

    Accumulation: each micro-batch's loss is divided by ``micro_steps``, so the gradients sum
    to the mean over all of them; DDP's all-reduce is skipped (``no_sync``) on all but the
    last. ``clip_grad_norm``: the gradients' total norm is clipped to it before the optimizer
    step (unscaled first under fp16, so the bound is on the true gradients). ``ema``: an
    exponential moving average of the weights (``make_ema``), updated on the device after
    every optimizer step that ran. ``batch_transform``: (images, labels) -> (images, targets)
    on the device before the forward pass (mixup / cutmix).

    Touches nothing but the model, optimizer, scaler and scheduler passed in, so the benchmark
    times exactly the step the trainer runs.
    """
    last = micro_step == micro_steps - 1
    if batch_transform is not None:
        images, labels = batch_transform(images, labels)
    no_sync = getattr(model, "no_sync", None)
    with contextlib.nullcontext() if last or no_sync is None else no_sync():
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = model_loss(model(images), labels, criterion)
        if micro_step == 0:
            optimizer.zero_grad(set_to_none=True)  # frees the grads instead of writing zeros
        scaler.scale(loss / micro_steps if micro_steps > 1 else loss).backward()
    if not last:
        return loss.detach()
    if clip_grad_norm:
        scaler.unscale_(optimizer)  # a no-op pass-through without fp16's scaler
        # Clips on the device (no sync); error_if_nonfinite off: the scaler skips inf steps.
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    taken = optimizer_steps_taken(optimizer)
    before = taken[0]
    scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
    scaler.update()
    # The schedule counts optimizer steps: a step the scaler skipped must not advance it.
    # Known on the host without a further sync: under fp16, scaler.step has read its overflow
    # flag (found_inf.item(), torch's GradScaler: the one host sync a step that fp16 costs);
    # bf16 and float32 have no scaler, and the step always runs.
    if taken[0] > before:
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)  # DDP and compile wrappers yield the same parameters
    return loss.detach()


class WeightEMA(AveragedModel):
    """torch's AveragedModel (the same state dict: ``module.*`` and ``n_averaged``) whose
    update never waits for the device.

    AveragedModel.update_parameters copies its update count ``n_averaged`` (a CPU tensor) to
    the device once per dtype group on every call: a blocking host-to-device copy, which on a
    GPU synchronizes the stream, so with --ema-decay the host waited for every step to finish.
    Here the count is read on the host, where it lives (built without ``device``, and loading
    a checkpoint copies into it), and the averaging is the same foreach lerp; integer
    buffers (BatchNorm's batch counters) are copied, not averaged.
    """

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if int(self.n_averaged) == 0:  # the first update copies the weights
            for ema_tensor, tensor in zip(averaged, current, strict=True):
                ema_tensor.copy_(tensor)
        else:
            groups: dict[tuple, tuple[list, list]] = {}  # foreach ops take one dtype a list
            for ema_tensor, tensor in zip(averaged, current, strict=True):
                ema_tensors, tensors = groups.setdefault((tensor.device, tensor.dtype), ([], []))
                ema_tensors.append(ema_tensor)
                tensors.append(tensor)
            for ema_tensors, tensors in groups.values():
                if ema_tensors[0].is_floating_point():
                    self.multi_avg_fn(ema_tensors, tensors, None)  # the count is not used
                else:
                    # Integer buffers (BatchNorm's num_batches_tracked) count, they are not
                    # averaged: copied, as timm's EMA does, in one foreach launch. torch's
                    # EMA function "averages" them one tensor at a time (4 ops each: 212 a
                    # step for a ResNet-50's 53 counters) and truncates back to int64.
                    torch._foreach_copy_(ema_tensors, tensors)
        self.n_averaged += 1


def make_ema(model: nn.Module, decay: float) -> WeightEMA | None:
    """An EMA copy of ``model`` (weights and BatchNorm buffers), or None when decay is 0.

    ``ema = decay * ema + (1 - decay) * weights`` after each optimizer step, as foreach ops on
    the device (no host sync); the first update copies the weights.
    """
    if decay <= 0.0:
        return None
    return WeightEMA(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def optimizer_steps_taken(optimizer: torch.optim.Optimizer) -> list[int]:
    """A one-item counter of the ``optimizer.step()`` calls that ran, kept by a step hook."""
    counter = getattr(optimizer, "_trainer_steps_taken", None)
    if counter is None:
        counter = [0]

        def count(*_args) -> None:
            counter[0] += 1

        optimizer.register_step_post_hook(count)
        optimizer._trainer_steps_taken = counter
    return counter


def average_batchnorm_buffers(model: nn.Module) -> None:
    """All-reduce BatchNorm running means and variances to their mean over ranks, in place.

    Without SyncBN each rank's running statistics follow its own batches, so evaluation and
    the saved weights would depend on which rank's copy they used (as timm's
    ``distribute_bn``). After this, eval on N ranks equals eval of the saved weights on one.
    A no-op for one process; SyncBN buffers already agree.
    """
    if not dist.is_distributed():
        return
    for module in model.modules():
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and not isinstance(module, nn.SyncBatchNorm)  # its buffers agree already
            and module.track_running_stats
            # In eval mode while training (a frozen backbone's): its statistics did not move
            # and agree on every rank; a mean of 3 equal floats may not give them back.
            and module.training
        ):
            for buffer in (module.running_mean, module.running_var):
                if buffer is not None:
                    dist.all_reduce_mean(buffer.data)


def format_duration(seconds: float) -> str:
    """4s, 3m05s, 2h07m: short enough for a log line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    epoch: int,
    epochs: int,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    amp_dtype: torch.dtype | None,
    device: torch.device,
    log_interval: int = 20,
    ema: AveragedModel | None = None,
    start_step: int = 0,
    loader_state=None,
    progress: dict | None = None,
    control=None,
    grad_accum_steps: int = 1,
    clip_grad_norm: float | None = None,
    batch_transform: Callable | None = None,
    frozen_modules: Iterable[nn.Module] = (),
    on_log: Callable[..., None] | None = None,
    on_first_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """Train over one epoch of ``loader``; returns the epoch's figures, identical on all ranks.

    ``on_log(epoch=, step=, figures=)``: called at each log line with what it prints (loss,
    lr, images_per_sec_per_gpu, data_wait), host floats already synced for the line.
    ``on_first_batch(images, labels)``: called once with the pass's first batch as the loader
    gave it (the run's ``train_batch.png``).

    ``frozen_modules``: modules kept in eval mode while the rest trains (a frozen backbone's
    BatchNorm layers, whose statistics must stay the pretrained ones).

    Returned: train_loss (mean over every step of every rank), images_per_sec_per_gpu,
    data_wait_fraction (host time blocked on the next batch / epoch time), lr (the one the
    epoch's last optimizer step applied), lr_head (the head's, with --head-lr-mult; else
    None), steps.
    """
    model.train()
    for module in frozen_modules:
        module.eval()
    if hasattr(loader, "set_epoch"):
        # A fresh permutation each epoch, the same one on every rank; a resumed epoch starts
        # at its next step, with what the loader needs to draw as it would have.
        if start_step:
            loader.set_epoch(epoch, start_step=start_step, state=loader_state)
        else:
            loader.set_epoch(epoch)
    steps = len(loader)  # type: ignore[arg-type]
    progress = progress or {}  # the epoch's sums so far, when resumed mid-epoch
    window_loss = torch.zeros((), device=device)
    epoch_loss = torch.tensor(progress.get("loss_sum", 0.0), device=device)
    window_steps = window_images = 0
    images_seen = progress.get("images_seen", 0)
    data_wait = progress.get("data_wait", 0.0)
    window_wait = 0.0
    window_start = time.perf_counter()
    start = window_start - progress.get("elapsed", 0.0)
    step = start_step
    bad_windows = 0  # consecutive log windows whose mean loss was not finite
    # The lr the latest optimizer step applied: the group's lr after it is already the next
    # step's (the scheduler moves it right after each step), one step off in logs and records.
    lr = optimizer.param_groups[0]["lr"]
    head_lr = head_lr_now(optimizer)
    batches = iter(loader)

    def progress_now() -> dict:  # read only when a step checkpoint is written (one sync)
        return {
            "loss_sum": epoch_loss.item(),
            "images_seen": images_seen,
            "data_wait": data_wait,
            "elapsed": time.perf_counter() - start,
        }

    while True:
        fetch_start = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:
            break
        waited = time.perf_counter() - fetch_start
        data_wait += waited
        window_wait += waited
        if on_first_batch is not None and step == start_step:
            on_first_batch(images, labels)
        # Optimizer steps of grad_accum_steps batches; an epoch's last may have fewer.
        group_start = step - step % grad_accum_steps
        micro_steps = min(grad_accum_steps, steps - group_start)
        micro_step = step - group_start
        lr = optimizer.param_groups[0]["lr"]  # a host float: what this step applies
        head_lr = head_lr_now(optimizer)
        loss = train_step(
            model,
            images,
            labels,
            criterion=criterion,
            optimizer=optimizer,
            scaler=scaler,
            scheduler=scheduler,
            amp_dtype=amp_dtype,
            ema=ema,
            clip_grad_norm=clip_grad_norm,
            micro_step=micro_step,
            micro_steps=micro_steps,
            batch_transform=batch_transform,
        )
        # Accumulated on the device: reading loss.item() here would stall the GPU pipeline.
        window_loss += loss
        epoch_loss += loss
        step += 1
        window_steps += 1
        batch = labels.shape[0]  # a host-side shape, no sync
        window_images += batch
        images_seen += batch
        if step % log_interval == 0 or step == steps:
            # One all-reduce (and so one sync) per window: rank 0 prints the global mean loss.
            mean_loss = dist.all_reduce_mean(window_loss / window_steps).item()
            # The same figure on every rank, so all stop together. One window of inf/NaN may
            # be fp16's overflow (the scaler skips those steps); two in a row is divergence.
            bad_windows = 0 if math.isfinite(mean_loss) else bad_windows + 1
            if bad_windows >= 2:
                raise diverged(epoch, step, steps, mean_loss, optimizer)
            now = time.perf_counter()
            elapsed = now - window_start
            # ETA from this epoch's pace so far (evaluation time is not in it).
            seconds_per_step = (now - start) / step
            epoch_left = seconds_per_step * (steps - step)
            run_left = epoch_left + seconds_per_step * steps * (epochs - epoch - 1)
            dist.print0(
                f"epoch {epoch + 1}/{epochs} step {step}/{steps} ({step / steps:.0%}) "
                f"loss {mean_loss:.4f} lr {lr:.4g} "
                + (f"head lr {head_lr:.4g} " if head_lr is not None else "")
                + f"img/s/gpu {window_images / elapsed:.1f} data-wait {window_wait / elapsed:.0%} "
                f"eta epoch {format_duration(epoch_left)} run {format_duration(run_left)}"
            )
            if on_log is not None:
                on_log(
                    epoch=epoch,
                    step=step,
                    figures={
                        "loss": mean_loss, "lr": lr,
                        "images_per_sec_per_gpu": window_images / elapsed,
                        "data_wait": window_wait / elapsed,
                    },
                )  # fmt: skip
            window_loss.zero_()
            window_steps = window_images = 0
            window_wait = 0.0
            window_start = now
        if control is not None and micro_step == micro_steps - 1:
            # At optimizer-step boundaries only (no gradients half accumulated): may write a
            # step checkpoint, may stop the run.
            control.after_step(
                epoch=epoch,
                next_step=step,
                steps=steps,
                progress=progress_now,
                group_start=group_start,
            )
    elapsed = time.perf_counter() - start
    if step == 0:
        raise TrainerError("the training loader yielded no batches (fewer images than ranks?)")
    # Once per epoch (one sync): weights gone inf/NaN must not be evaluated, saved as best
    # and exported as a finished run.
    if not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
        raise diverged(epoch, step, steps, float("nan"), optimizer)
    totals = torch.tensor(
        [epoch_loss.item() / step, images_seen / elapsed, data_wait / elapsed],
        dtype=torch.float64,
        device=device,
    )
    loss_mean, rate, wait = dist.all_reduce_mean(totals).tolist()
    return {
        "train_loss": loss_mean,
        "images_per_sec_per_gpu": rate,
        "data_wait_fraction": wait,
        "lr": lr,
        "lr_head": head_lr,
        "steps": step,
    }


def diverged(epoch: int, step: int, steps: int, loss: float, optimizer) -> TrainerError:
    """The error that stops a run whose loss or weights went inf/NaN."""
    return TrainerError(
        f"training diverged at epoch {epoch + 1} step {step}/{steps}: loss {loss}, lr "
        f"{optimizer.param_groups[0]['lr']:.4g}; lower --lr (or add --clip-grad-norm, "
        "--warmup-epochs), and resume from an earlier checkpoint or start again"
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    amp_dtype: torch.dtype | None,
    device: torch.device,
    confusion: bool = False,
) -> dict[str, float]:
    """Top-1, top-k (k = min(5, classes)) and cross-entropy over every val image exactly once.

    ``confusion``: also the confusion matrix (``confusion[true, predicted]`` image counts, an
    int64 CPU tensor), counted on the device and all-reduced like the sums.

    Sums and counts are all-reduced, so the figures equal a single-process evaluation of the
    same weights whatever the world size (a mean of per-rank percentages would not, with
    uneven shards). The bare model runs, not DDP: ranks may get different numbers of batches
    and DDP's forward could wait on a rank that has finished. val_loss has no label smoothing.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    # loss sum, top-1 correct, top-k correct, count; float64 so sums stay exact for big sets.
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    counts = torch.zeros(
        num_classes * num_classes if confusion else 0, dtype=torch.int64, device=device
    )
    for images, labels in loader:
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        predicted = logits.topk(k, dim=1).indices
        top = predicted == labels[:, None]
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        sums[1] += top[:, 0].sum()
        sums[2] += top.any(dim=1).sum()
        sums[3] += labels.shape[0]
        if confusion:  # counted on the device
            cells = labels * num_classes + predicted[:, 0]  # the top-1 prediction, as counted
            # index_add_, not bincount: CUDA's bincount reads the input's min and max on the
            # host (two syncs a batch) to size its output, whose size is known here.
            counts.index_add_(0, cells, torch.ones_like(cells))
    loss_sum, correct1, correctk, count = dist.all_reduce_sum(sums).tolist()
    model.train(was_training)
    if count == 0:
        raise TrainerError("the validation loader yielded no images")
    metrics = {
        "val_top1": 100.0 * correct1 / count,
        "val_top5": 100.0 * correctk / count,
        "val_loss": loss_sum / count,
        "val_images": int(count),
    }
    if confusion:
        matrix = dist.all_reduce_sum(counts).view(num_classes, num_classes).cpu()
        metrics["confusion"] = matrix
    return metrics


def build_step(
    *,
    arch: str,
    num_classes: int,
    amp: str,
    channels_last: bool,
    device: torch.device,
    seed: int,
    info: dist.DistInfo,
    optimizer: str = "sgd",
    lr: float = 0.1,
    compile: bool = False,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ready ``step(images, labels) -> loss`` with the trainer's model, optimizer and AMP.

    For the benchmark: the same build (DDP across ranks, channels_last, AMP, optimizer groups)
    and the same ``train_step`` as a training run, constant learning rate, no scheduler.
    """
    torch.manual_seed(seed)
    amp_dtype, note = resolve_amp(amp, device)
    if note:
        dist.print0(note)
    model = build_model(
        arch, num_classes=num_classes, device=device, channels_last=channels_last, log=dist.print0
    )
    model = wrap_ddp(compile_model(model, compile), device, info.world_size)
    scaler = make_scaler(amp_dtype, device)
    opt = make_optimizer(model, name=optimizer, lr=lr, loss_scaling=scaler.is_enabled())
    criterion = nn.CrossEntropyLoss()
    model.train()

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return train_step(
            model,
            images,
            labels,
            criterion=criterion,
            optimizer=opt,
            scaler=scaler,
            amp_dtype=amp_dtype,
        )

    return step
