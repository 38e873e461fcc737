"""Build a torchvision classifier by name, fit its head, load weights, wrap for DDP.

Nothing here downloads: models are built with ``weights=None`` and weights come from a local
file (torchvision's named weights are fetched into torch's cache by ``trainer.weights``). The
head is sized at construction (``num_classes=``), which every torchvision classification model
accepts, so no per-architecture code knows where the head lives.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pipelines.torchvision_import import torchvision
from trainer.config import TrainerError

# Prefixes that wrappers add to parameter names: DDP ("module.") and torch.compile
# ("_orig_mod."). Checkpoints never carry them, so they load into a bare model.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def list_architectures() -> list[str]:
    """Classification models only (not detection/segmentation/video, which live in submodules)."""
    return torchvision.models.list_models(module=torchvision.models)


def create_model(arch: str, *, num_classes: int) -> nn.Module:
    """Random-init torchvision classifier with a ``num_classes`` head."""
    known = list_architectures()
    if arch not in known:
        raise TrainerError(
            f"unknown --arch {arch!r}; torchvision classification models: {', '.join(known)}"
        )
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def check_input_sizes(
    arch: str, sizes: Sequence[int], *, num_classes: int, train_sizes: Sequence[int] = ()
) -> None:
    """Refuse crop sides ``arch`` cannot take, before any work: a ViT takes only its own size
    (224 px), MaxViT multiples of 224, AlexNet 64 px and up, Inception v3 75 and up (in
    training, with its auxiliary head, about 300); at another size the first step died with a
    torchvision traceback. ``sizes`` are evaluated (eval mode), ``train_sizes`` trained
    (train mode, where GoogLeNet and Inception v3 run their auxiliary heads too). A small
    batch per size goes through the model on the meta device: shapes only, no memory, no
    compute, no random draws. A model that cannot be built there (RegNet computes its widths
    with tensors) is not checked."""
    try:
        # The real build below gives the model's own warnings (Inception's init) once.
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = create_model(arch, num_classes=num_classes)
    except NotImplementedError:
        return
    refused = {}
    checks = [(size, False) for size in set(sizes)] + [(size, True) for size in set(train_sizes)]
    for size, training in sorted(checks):
        if size in refused:
            continue
        model.train(training)
        try:
            with torch.no_grad():
                # 2 images: batch norm in training mode refuses a batch of one 1x1 map.
                model(torch.empty(2, 3, size, size, device="meta"))
        except (RuntimeError, AssertionError, ValueError) as exc:
            refused[size] = str(exc).strip().splitlines()[0]
    if refused:
        which = ", ".join(str(size) for size in sorted(refused))
        first = refused[min(refused)]
        raise TrainerError(
            f"--arch {arch} cannot take {which} px images (torchvision: {first}); "
            "choose another --image-size (or --progressive-resize) or --arch"
        )


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter names as a bare model has them (no ``module.`` / ``_orig_mod.``)."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
        out[key] = value
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under DDP and torch.compile wrappers (shares the same parameters)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def head_tensor_names(arch: str, num_classes: int) -> list[str]:
    """The classifier's tensors (``fc.weight``, ``fc.bias`` for a ResNet; every auxiliary
    head's last layer too): those whose shape changes with the class count. Found without
    knowing where each architecture keeps its head: built for one class more, on the meta
    device (shapes only), or, for a model that cannot be built there, on a forked
    generator (the run's seeded random stream stays as it was)."""

    def shapes(classes: int) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in create_model(arch, num_classes=classes).state_dict().items()}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real builds give the model's warnings once
        try:
            with torch.device("meta"):
                own, other = shapes(num_classes), shapes(num_classes + 1)
        except NotImplementedError:  # RegNet computes its widths with tensors
            with torch.random.fork_rng(devices=[]):
                own, other = shapes(num_classes), shapes(num_classes + 1)
    return [k for k in own if k in other and other[k] != own[k]]


@dataclass
class PretrainedReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)  # a head trained for other classes
    head_reason: str = "other class count"  # or "other classes: ..." (same count, other names)

    def summary(self) -> str:
        text = f"pretrained {self.path}: loaded {len(self.loaded)} tensors"
        if self.skipped_head:
            text += (
                f", kept the new head (skipped {', '.join(self.skipped_head)}: {self.head_reason})"
            )
        return text


def recorded_class_names(names) -> list[str] | None:
    """The class names a weights file records, None for none or for the numbers "0", "1", ...
    that a run given only --num-classes records (they name no class, so compare with none)."""
    if not isinstance(names, list | tuple) or not names:
        return None
    names = [str(name) for name in names]
    return None if names == [str(k) for k in range(len(names))] else names


def first_difference(theirs: Sequence[str], ours: Sequence[str]) -> str:
    """Where two class lists part, as 'label K is A there, B here'."""
    k = next(
        (k for k, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b),
        min(len(theirs), len(ours)),
    )
    there = repr(theirs[k]) if k < len(theirs) else "(none)"
    here = repr(ours[k]) if k < len(ours) else "(none)"
    return f"label {k} is {there} there, {here} here"


NOT_TORCH = "not a PyTorch weights file, or a damaged one"


class UnreadableWeights(Exception):
    """torch.load refused a file; the message says why in words a user can act on.
    ``pickled``: the file holds Python objects besides tensors (torch.save(model))."""

    def __init__(self, message: str, *, pickled: bool = False):
        super().__init__(message)
        self.pickled = pickled


def load_tensors(path: str):
    """``torch.load`` with ``weights_only=True`` (a weights file must never be able to run
    code on load), its refusals turned into UnreadableWeights with a one-line reason.

    torch's own messages are paragraphs with terminal escapes that advise loading with
    ``weights_only=False``: wrong for a damaged file and unsafe for any other.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a torch save
        text = str(exc).strip()
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:  # torch.save(model), or a checkpoint holding argparse.Namespace
            raise UnreadableWeights(
                f"holds pickled Python objects ({found.group(1)}), not only tensors, and they "
                "are not loaded since unpickling can run code",
                pickled=True,
            ) from None
        if isinstance(exc, OSError) and exc.filename:  # permission denied, a folder
            raise UnreadableWeights(exc.strerror or text) from None
        # Random bytes, a text file, a file cut short: torch's text names an opcode, a byte
        # or "[Errno 22] Invalid argument", nothing a user can act on.
        raise UnreadableWeights(NOT_TORCH) from None


def read_state_dict(
    path: str, *, arch: str | None = None
) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """A state dict from a torchvision-format file, this trainer's model.pt or a checkpoint,
    and the class names the file records (this trainer's files), else None.

    ``arch``, when the file records its own (model.pt, checkpoints), must match it.
    """
    if not os.path.isfile(path):
        raise TrainerError(f"{path}: pretrained weights file not found")
    try:
        obj = load_tensors(path)
    except UnreadableWeights as exc:
        advice = "; save the weights alone: torch.save(model.state_dict(), PATH)"
        raise TrainerError(f"{path}: {exc}{advice if exc.pickled else ''}") from None
    class_names = None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        class_names = recorded_class_names(obj.get("class_names"))
        saved_arch = obj.get("arch") or (obj.get("config") or {}).get("arch")
        if arch is not None and saved_arch and saved_arch != arch:
            raise TrainerError(f"{path}: weights of {saved_arch}, but --arch is {arch}")
        obj = obj["model"]
    elif (
        isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping)
    ):
        obj = obj["state_dict"]
    if not (
        isinstance(obj, Mapping)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise TrainerError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return strip_wrapper_prefixes(obj), class_names


def load_pretrained(
    model: nn.Module,
    path: str,
    *,
    arch: str,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> PretrainedReport:
    """Load every tensor of ``path`` into ``model`` except a head sized for other classes.

    A tensor may be skipped only when it is the head's: its shape differs and the model's
    first dimension is ``num_classes``. Anything else missing, extra or misshapen means the
    file belongs to another architecture, which is an error, never a silent partial load.

    ``class_names``: the data's (None when it has none, only --num-classes). A file that
    records other names for the same class count (a model.pt of another data set, or of
    these classes in another order) has a head whose row k means another class than label
    k: it is skipped like a head of another count, so fine-tuning starts from a new head and
    an evaluation refuses, instead of scoring every image against the wrong class.
    """
    state, saved_names = read_state_dict(path, arch=arch)
    own = model.state_dict()
    report = PretrainedReport(path)
    # Another count of names is the shape check's below; the same count, other names, is here.
    if (
        class_names is not None
        and saved_names is not None
        and len(saved_names) == len(class_names)
        and saved_names != list(class_names)
    ):
        head = head_tensor_names(arch, num_classes)
        report.skipped_head = [k for k in head if k in state]
        report.head_reason = f"other classes: {first_difference(saved_names, class_names)}"
        state = {k: v for k, v in state.items() if k not in head}
        own = {k: v for k, v in own.items() if k not in head}
    loadable: dict[str, torch.Tensor] = {}
    misshapen: list[str] = []
    for key, value in state.items():
        if key not in own:
            continue
        if own[key].shape == value.shape:
            loadable[key] = value
            report.loaded.append(key)
        elif own[key].dim() >= 1 and own[key].shape[0] == num_classes:
            report.skipped_head.append(key)
        else:
            misshapen.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or misshapen:

        def some(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({some(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({some(unexpected)})")
        if misshapen:
            parts.append(f"{len(misshapen)} of another shape ({some(misshapen)})")
        raise TrainerError(f"{path}: does not fit --arch {arch}: tensors {'; '.join(parts)}")
    model.load_state_dict(loadable, strict=False)
    return report


def build_model(
    arch: str,
    *,
    num_classes: int,
    device: torch.device,
    pretrained: str | None = None,
    pretrained_name: str | None = None,
    sync_bn: bool = False,
    channels_last: bool = True,
    log: Callable[[str], None] = print,
    require_head: bool = False,
    class_names: Sequence[str] | None = None,
) -> nn.Module:
    """Bare model on ``device``: head for ``num_classes``, optional weights, SyncBN, layout.

    ``pretrained_name``: what the file is (torchvision weights' name), said in the report.
    ``require_head``: the ``pretrained`` weights must include the head (evaluation: a new
    head of another class count would score untrained weights). ``class_names``: the data's,
    when a classes file names them (see ``load_pretrained``).

    Not yet compiled or DDP-wrapped (see ``compile_model`` and ``wrap_ddp``), so checkpoints
    and evaluation can use it directly.
    """
    model = create_model(arch, num_classes=num_classes)
    if pretrained:
        report = load_pretrained(
            model, pretrained, arch=arch, num_classes=num_classes, class_names=class_names
        )
        if pretrained_name:
            report.path = f"{pretrained_name} ({pretrained})"
        if require_head and report.skipped_head:
            raise TrainerError(
                f"{report.path}: no trained head for the data's {num_classes} classes "
                f"({report.head_reason}), so nothing to evaluate"
            )
        log(report.summary())
    if sync_bn and device.type != "cuda":
        log("--sync-bn ignored: SyncBatchNorm runs on CUDA only, this run is on the CPU")
    elif sync_bn:
        # Batch statistics over the global batch: matters when the per-GPU batch is small.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if channels_last:
        # NHWC lets cuDNN/oneDNN run convolutions without layout transposes; the loaders
        # deliver channels_last batches to match.
        model.to(memory_format=torch.channels_last)
    return model


def compile_model(model: nn.Module, enabled: bool) -> nn.Module:
    return torch.compile(model) if enabled else model


def wrap_ddp(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """DDP for more than one rank; the model itself otherwise (no wrapper overhead)."""
    if world_size <= 1:
        return model
    if device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    # CPU: device_ids must be None, the module's own device is used.
    return nn.parallel.DistributedDataParallel(model)


def model_gflops(arch: str) -> float | None:
    """The model's forward GFLOPs per 224-px image, from torchvision's weights metadata
    (``_ops``; resnet50: 4.09, resnet18: 1.81); None for a model without published weights.
    What ``--dali-decode auto`` weighs the host's decode rate against."""
    try:
        weights = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        return None
    ops = [w.meta.get("_ops") for w in weights if w.meta.get("_ops")]
    return float(ops[0]) if ops else None
