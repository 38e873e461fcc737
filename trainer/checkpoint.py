"""Atomic checkpoints, resume, and the model.pt export that needs only torchvision to load.

Checkpoints (last.pt every epoch, best.pt on a new best top-1) hold everything a resumed run
needs: model (bare names: no ``module.``, no ``_orig_mod.``), optimizer, grad scaler (an fp16
run cannot resume without it), scheduler, the next epoch to run, best top-1, the resolved
config, the class names and the seed. A run killed mid-epoch resumes at the start of that
epoch, so it ends with the same number of epochs.

model.pt, written at the end, is for inference without this project::

    import PIL.Image, PIL.ImageOps, torch, torchvision, torchvision.transforms.v2 as T
    m = torch.load("model.pt", map_location="cpu", weights_only=True); p = m["preprocessing"]
    net = torchvision.models.get_model(m["arch"], num_classes=len(m["class_names"])).eval()
    net.load_state_dict(m["model"])
    tf = T.Compose([T.ToImage(), T.Resize(p["resize_size"]), T.CenterCrop(p["image_size"]),
                    T.ToDtype(torch.float32, scale=True), T.Normalize(p["mean"], p["std"])])
    image = PIL.ImageOps.exif_transpose(PIL.Image.open("x.jpg")).convert("RGB")  # upright
    print(m["class_names"][net(tf(image)[None]).argmax()])

EXIF orientation is applied as the trainer's loaders apply it (DALI's decoder by default, the
PIL loaders through ``pipelines.imagecheck.open_rgb``): without it a portrait phone photo
reaches the network on its side.

Resize is bilinear with antialiasing (torchvision's default),
the interpolation recorded in ``preprocessing["interpolation"]``.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pipelines import common as preprocessing_constants
from pipelines.fileio import atomic_write
from trainer import metrics
from trainer.config import TrainerError
from trainer.model import (
    UnreadableWeights,
    first_difference,
    load_tensors,
    recorded_class_names,
    strip_wrapper_prefixes,
    unwrap_model,
)

LAST = "last.pt"
BEST = "best.pt"
EXPORT = "model.pt"
FORMAT_VERSION = 1


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path``.

    Same folder so the rename is atomic (one filesystem): a reader, or a run killed at any
    moment, sees either the old complete file or the new complete file, never half of one.
    A failed write (a full disk, a folder gone read-only) raises TrainerError saying what
    failed, that the previous file is intact, and, for a full disk, the space needed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as exc:  # torch.save reports a short write as RuntimeError
        raise TrainerError(_save_failure(path, folder, obj, exc)) from exc


def _save_failure(path: str, folder: str, obj: Any, exc: BaseException) -> str:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    previous = "the previous one is intact" if os.path.isfile(path) else "no earlier one exists"
    message = f"could not write {path} ({reason}); {previous}"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return message
    needed = _tensor_bytes(obj)
    if needed >= free or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        # Without a last.pt in the folder (the first epoch's saves) there is nothing to resume.
        then = "--resume auto" if os.path.isfile(os.path.join(folder, LAST)) else "start over"
        message += (
            f"; it needs about {needed / 2**20:.0f} MiB and {free / 2**20:.0f} MiB are free "
            f"there: free some space or use another --output-dir, then {then}"
        )
    return message


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint: close to its size on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


RESULT_FILES = (LAST, BEST, EXPORT, metrics.JSONL)


def check_writable(output_dir: str) -> None:
    """Write and remove a probe file where ``output_dir`` is (or will be created): a
    read-only or blocked path is found at start, not at the first checkpoint. Nothing is
    left behind, not even the folder."""
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), existing)
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise TrainerError(
            f"{output_dir}: output folder is not writable ({exc.strerror or exc}"
            f"{'' if existing == os.path.abspath(output_dir) else ': ' + existing}); "
            "choose another with --output-dir"
        ) from None


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The bare model's weights on the CPU, names free of DDP/compile prefixes."""
    state = unwrap_model(model).state_dict()
    return {k: v.detach().cpu() for k, v in strip_wrapper_prefixes(state).items()}


def checkpoint_state(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    next_epoch: int,
    best_top1: float,
    config: Mapping[str, Any],
    class_names: Sequence[str],
    ema: nn.Module | None = None,
) -> dict[str, Any]:
    state = {
        "format_version": FORMAT_VERSION,
        "arch": config["arch"],
        "model": model_state(model),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": next_epoch,  # the next epoch to run
        "best_top1": best_top1,
        "config": dict(config),
        "class_names": list(class_names),
        # No generator states: every draw of a run is a function of (seed, epoch, rank). The
        # epoch's order comes from epoch_permutation(seed, epoch), the loaders' augmentation
        # from seeds derived from (seed, rank, epoch[, index]), and fit() reseeds torch at
        # each epoch start; so a run resumed at an epoch boundary draws what it would have.
        "rng": {"seed": config["seed"], "reseeded_each_epoch_from": "seed, epoch, rank"},
    }
    if ema is not None:  # the AveragedModel: its weights, buffers and update count
        state["ema"] = {k: v.detach().cpu() for k, v in ema.state_dict().items()}
    return state


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """Path to resume from: None (fresh), ``auto`` = output_dir/last.pt if present, or a file."""
    if not resume:
        return None
    if resume == "auto":
        path = os.path.join(output_dir, LAST)
        return path if os.path.isfile(path) else None
    if os.path.isdir(resume):
        raise TrainerError(
            f"{resume}: a folder; pass its checkpoint ({os.path.join(resume, LAST)}), or "
            f"--resume auto with --output-dir {resume}"
        )
    if not os.path.isfile(resume):
        raise TrainerError(f"{resume}: checkpoint to resume from not found")
    return resume


def load_checkpoint(path: str) -> dict[str, Any]:
    try:
        ckpt = load_tensors(path)
    except UnreadableWeights as exc:
        raise TrainerError(f"{path}: not a readable checkpoint: {exc}") from None
    needed = ("model", "optimizer", "scheduler", "epoch", "config")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        weights_only = isinstance(ckpt, dict) and (
            "model" in ckpt  # model.pt
            or all(isinstance(v, torch.Tensor) for v in ckpt.values())  # a state dict
        )
        if ckpt and weights_only:
            # Weights without what a resume continues: it would restart the schedule at 0.
            raise TrainerError(
                f"{path}: weights without a training state (optimizer, schedule, epoch), so "
                "there is no run to resume; to start a new run from them: --pretrained PATH"
            )
        raise TrainerError(f"{path}: not a checkpoint of this trainer (needs {', '.join(needed)})")
    return ckpt


def check_compatible(
    ckpt: Mapping[str, Any],
    path: str,
    *,
    arch: str,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> None:
    """``class_names``: the data's, when a classes file names them. Label k must mean the class
    the checkpoint's head learned as k, or a resumed run trains (and an evaluation scores)
    every image against another class than its own, without a word."""
    saved_arch = ckpt["config"].get("arch")
    saved_classes = len(ckpt.get("class_names") or []) or ckpt["config"].get("num_classes")
    saved_names = recorded_class_names(ckpt.get("class_names"))
    if saved_arch != arch:
        # Its weights fit no other architecture, not even as --pretrained: say what does.
        raise TrainerError(
            f"{path}: checkpoint of {saved_arch}, but --arch is {arch}; resume with --arch "
            f"{saved_arch}, or train {arch} from scratch in a new --output-dir"
        )
    if saved_classes and saved_classes != num_classes:
        raise TrainerError(
            f"{path}: checkpoint has {saved_classes} classes, the data {num_classes}"
        )
    if class_names is not None and saved_names and saved_names != list(class_names):
        raise TrainerError(
            f"{path}: checkpoint's classes differ from the data's "
            f"({first_difference(saved_names, class_names)}); use the classes.txt it was "
            "trained with, or start a new run from its weights with --pretrained"
        )


def restore_training_state(
    ckpt: Mapping[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: nn.Module | None = None,
) -> tuple[int, float, list[str]]:
    """Load what was saved into the live objects; returns (next epoch, best top-1, notes)."""
    notes: list[str] = []
    if ema is not None:
        if ckpt.get("ema"):
            ema.load_state_dict(ckpt["ema"])
        else:
            notes.append("checkpoint has no EMA weights; the EMA starts from the current ones")
    unwrap_model(model).load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and scaler.is_enabled():
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        else:
            notes.append("checkpoint has no fp16 grad-scaler state; the loss scale starts afresh")
    return int(ckpt["epoch"]), float(ckpt.get("best_top1", 0.0)), notes


def preprocessing(image_size: int) -> dict[str, Any]:
    """How the loaders prepare val images (shorter side resized to crop / 0.875, center crop,
    ImageNet mean/std on 0-1 values), so model.pt can be used without this project."""
    c = preprocessing_constants
    return {
        "image_size": image_size,
        "resize_size": c.val_resize_size(image_size),
        "mean": list(c.IMAGENET_MEAN),
        "std": list(c.IMAGENET_STD),
        "interpolation": "bilinear",
        "antialias": True,
        "input": "RGB, float 0-1 before Normalize, NCHW",
    }


def export_model(
    path: str,
    *,
    model: nn.Module,
    arch: str,
    class_names: Sequence[str],
    image_size: int,
    weights: str = "raw",
    pretrained: Mapping[str, Any] | None = None,
) -> None:
    """Weights + arch + class names + preprocessing; see the module docstring to load it.
    ``weights`` records which they are: "raw" (the trained ones) or "ema" (their average).
    ``pretrained``: the facts of the torchvision weights the run started from (name, URL,
    their own evaluation sizes), kept as ``"pretrained"``."""
    exported = {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "weights": weights,
        "model": model_state(model),
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "preprocessing": preprocessing(image_size),
    }
    if pretrained:
        exported["pretrained"] = dict(pretrained)
    atomic_save(exported, path)
