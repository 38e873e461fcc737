"""One dataclass holds every setting; the command line and TOML config files are built from it.

Each field of ``Config`` is one flag (``batch_size`` -> ``--batch-size``), its help text in the
field's metadata, so the flag list, the defaults and the docs cannot drift apart. Precedence,
lowest first: field defaults, the demo recipe (only when no ``--train-list`` is given, from
the command line or the file), ``--config FILE``, the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any

from pipelines import paths
from pipelines.fileio import atomic_write_text
from pipelines.lists import CLASSES_FILE, VAL_LIST


class TrainerError(Exception):
    """Bad input the user can fix; main() prints ``error: <message>`` and exits 2."""


class RankError(TrainerError):
    """A fault only this rank sees (e.g. a file missing on its node): this rank says it."""


AMP_CHOICES = ("bf16", "fp16", "off")
OPTIMIZERS = ("sgd", "adamw", "adam")
LOADERS = ("dali", "pil", "pil-gpu")
DALI_DECODE = ("auto", "mixed", "cpu")
AUTO_AUGMENT = ("none", "auto", "rand", "trivial")

# The embedded default: with no data given, a recipe sized for a small CPU that still learns
# the generated demo classes far above chance. Measured with `python trainer/main.py` (one
# process) on 2 CPU cores: 45 s in all, about 280 img/s, val top-1 96-97% (chance 10%); with
# --processes 2: 49 s, 138 img/s per rank. lr 0.1 reached 94.5%; SGD is kept so the demo
# shows the ImageNet recipe's optimizer. With --train-list these do not apply and the
# ImageNet-like field defaults below hold.
DEMO_RECIPE: dict[str, Any] = {
    "arch": "resnet18",
    "epochs": 6,
    "batch_size": 32,
    "lr": 0.2,
    "warmup_epochs": 1.0,
    "image_size": 64,
    "loader": "dali",
    "output_dir": "runs/demo",
}


def _opt(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    flags: tuple[str, ...] = (),
    metavar: str | None = None,
    const: Any = None,
) -> Any:
    """``const``: the value of the flag given alone (its value is then optional)."""
    metadata = {
        "help": help, "choices": choices, "flags": flags, "metavar": metavar, "const": const,
    }  # fmt: skip
    return field(default=default, metadata=metadata)


@dataclass
class Config:
    # Data
    train_list: str | None = _opt(
        None,
        "training list file, one 'path label' per line; without it the demo data is generated "
        "once and the demo recipe (resnet18, small images, a few epochs) trains on it",
        metavar="FILE",
    )
    val_list: str | None = _opt(
        None,
        "validation list file (default: Test.txt beside --train-list, if present)",
        metavar="FILE",
    )
    classes: str | None = _opt(
        None,
        "classes.txt naming one class per line (default: classes.txt beside --train-list)",
        metavar="FILE",
    )
    num_classes: int | None = _opt(
        None, "number of classes (default: the line count of classes.txt; must agree with it)"
    )
    loader: str = _opt(
        "dali",
        "input pipeline: dali, pil (torchvision's DataLoader recipe) or pil-gpu (the same, "
        "normalized on the device)",
        choices=LOADERS,
    )
    workers: int | None = _opt(
        None,
        "DALI threads / PIL workers per GPU (default: usable CPU cores / ranks on this node, "
        "at most 8 with DALI GPU decode; OMP_NUM_THREADS does not limit it)",
    )
    cpu_threads: int | None = _opt(
        None,
        "torch threads per process on a machine without a GPU (default: usable cores / ranks on "
        "this node, capped by OMP_NUM_THREADS, one fewer for each core other processes keep "
        "busy at start; a resumed run keeps its own). The count changes the CPU arithmetic: "
        "set it for runs that repeat bit for bit whatever else runs on the machine",
    )
    dali_decode: str = _opt(
        "auto",
        "DALI JPEG decode: mixed = on the GPU, cpu = on the host; auto = cpu where a GPU has "
        "16+ threads to itself, else mixed (cpu without a GPU); the choice is printed at start",
        choices=DALI_DECODE,
    )
    dali_hw_decoder_load: float | None = _opt(
        None,
        "share of JPEGs, 0-1, for the GPU's hardware JPEG decoder in mixed decode, on A100/H100 "
        "and newer (default: 0.99, measured fastest for training; DALI's own default is 0.65)",
    )
    prefetch: int = _opt(
        2,
        "batches each loader prepares ahead: DALI's prefetch queue depth, PIL batches per worker",
    )
    image_size: int = _opt(224, "training and validation crop side, pixels")
    auto_augment: str = _opt(
        "none",
        "automatic augmentation after crop and flip, in DALI (on the GPU with mixed decode) and "
        "PIL alike: auto = AutoAugment's ImageNet policy, rand = RandAugment (2 ops, magnitude "
        "9), trivial = TrivialAugmentWide",
        choices=AUTO_AUGMENT,
    )
    progressive_resize: str | None = _opt(
        None,
        "START:END:RAMP_EPOCHS: train epoch 1 at START px, growing linearly (in steps of 8 px) "
        "over RAMP_EPOCHS epochs to END px, reached in epoch RAMP_EPOCHS + 1 and kept; "
        "validation stays at --image-size (default: off)",
        metavar="START:END:RAMP",
    )
    # Model
    arch: str = _opt(
        "resnet50",
        "torchvision classification model name (e.g. resnet18, resnet50)",
        metavar="NAME",
    )
    pretrained: str | None = _opt(
        None,
        "weights to start from: a torchvision weights name for --arch (DEFAULT, IMAGENET1K_V2, "
        "ResNet50_Weights.IMAGENET1K_V2; the flag alone = DEFAULT), downloaded once into "
        "torch's hub cache ($TORCH_HOME) and used from there; or a local file (torchvision "
        "format, this trainer's model.pt or a checkpoint); a head of another class count is "
        "replaced by a new one for your classes",
        metavar="NAME|FILE",
        const="DEFAULT",
    )
    freeze_backbone_epochs: int = _opt(
        0,
        "epochs at the start that train only the head (the rest frozen, its BatchNorm layers "
        "in eval mode), then everything; the lr schedule counts every step; needs "
        "--pretrained (0 = off)",
    )
    head_lr_mult: float = _opt(
        1.0,
        "the head's learning rate as a multiple of --lr, through warmup and cosine alike "
        "(1 = the same as the rest)",
    )
    sync_bn: bool = _opt(False, "convert BatchNorm to SyncBatchNorm across ranks")
    channels_last: bool = _opt(True, "model and batches in channels_last memory format")
    compile: bool = _opt(False, "torch.compile the model")
    # Optimization
    epochs: int = _opt(90, "training epochs")
    batch_size: int = _opt(64, "images per GPU (per rank) per step")
    optimizer: str = _opt("sgd", "sgd (Nesterov momentum), adamw or adam", choices=OPTIMIZERS)
    lr: float | None = _opt(
        None,
        "peak learning rate (default: sgd 0.1 x global batch / 256, the linear scaling rule; "
        "adam/adamw 1e-3 x global batch / 512)",
    )
    momentum: float = _opt(0.9, "SGD momentum (Nesterov)")
    weight_decay: float | None = _opt(
        None,
        "weight decay, not applied to norm layers and biases (default: 1e-4 sgd/adam, 0.05 adamw)",
    )
    warmup_epochs: float = _opt(
        5.0,
        "linear learning-rate warmup, epochs, then cosine decay; at most a quarter of --epochs "
        "(a longer one is cut, and the start says so)",
    )
    label_smoothing: float = _opt(0.1, "label smoothing of the cross-entropy loss, 0 to <1")
    mixup_alpha: float = _opt(
        0.0,
        "mixup: Beta(alpha, alpha) mixing of image pairs and their labels, on the device (0 = "
        "off; 0.2 is timm's ResNet recipe); with --cutmix-alpha, one of the two per batch",
    )
    cutmix_alpha: float = _opt(
        0.0,
        "cutmix: a Beta(alpha, alpha)-sized box pasted from another image, labels mixed by "
        "area, on the device (0 = off; 1.0 is common)",
    )
    grad_accum_steps: int = _opt(
        1,
        "batches accumulated into one optimizer step (DDP syncs gradients once per step); "
        "the default lr and the schedule count optimizer steps",
    )
    clip_grad_norm: float = _opt(
        0.0, "clip the gradients' total L2 norm to this before each optimizer step (0 = off)"
    )
    ema_decay: float = _opt(
        0.0,
        "exponential moving average of the weights: decay per optimizer step, 0 to <1 (e.g. "
        "0.9998 for ImageNet; 0 = off); evaluated every epoch beside the raw weights",
    )
    amp: str = _opt(
        "bf16",
        "mixed precision: bf16 (falls back to fp16 on GPUs without bf16), fp16 (with a grad "
        "scaler) or off (float32)",
        choices=AMP_CHOICES,
    )
    seed: int = _opt(0, "random seed of model init, shuffling and augmentation, 0 to 2**32 - 1")
    # Run
    output_dir: str = _opt(
        "runs/train", "folder for checkpoints, metrics.jsonl, config.toml", metavar="DIR"
    )
    resume: str | None = _opt(
        None,
        "checkpoint to continue from, or 'auto' = last.pt in --output-dir if there (default: "
        "start fresh)",
        metavar="PATH|auto",
    )
    overwrite: bool = _opt(
        False,
        "replace an earlier run's results in --output-dir (without it such a folder is refused "
        "unless --resume continues that run)",
    )
    checkpoint_every: int = _opt(
        0,
        "steps between step checkpoints (last.pt with the position inside the epoch; 0 = none "
        "by step count)",
    )
    checkpoint_minutes: float = _opt(
        30.0,
        "minutes between step checkpoints by rank 0's clock (0 = none by time); a run killed "
        "without warning loses at most this much (or --checkpoint-every steps)",
    )
    eval_only: bool = _opt(False, "evaluate the --resume / --pretrained weights once and exit")
    log_interval: int = _opt(20, "steps between training log lines")
    plots: bool = _opt(
        True,
        "draw train_batch.png (the first batch), metrics.png and confusion_matrix.png with "
        "matplotlib (the plot extra); --no-plots skips them and matplotlib's import, about a "
        "second of each run's start and end",
    )
    tensorboard: bool = _opt(
        False,
        "also write TensorBoard event files into OUTPUT_DIR/tensorboard (rank 0; needs the "
        "tensorboard extra): loss, lr, img/s/gpu and data wait per log interval, val figures "
        "per epoch, the config",
    )
    processes: int | None = _opt(
        None,
        "processes to start when run without torchrun (default: one per visible GPU, 1 without "
        "a GPU); under torchrun its --nproc_per_node decides and this must be unset",
    )
    dist_timeout: float = _opt(
        300.0, "seconds a collective may wait for a silent rank before the job fails"
    )
    config: str | None = _opt(
        None, "TOML file of settings (keys = field names); flags override it", metavar="FILE"
    )
    local_rank: int | None = _opt(
        None,
        "set by the legacy torch.distributed.launch; torchrun's LOCAL_RANK env wins",
        flags=("--local_rank",),
    )


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# Tables of config.toml that record facts, not settings: --config skips them.
PRETRAINED_TABLE = "pretrained_weights"
FACT_TABLES = (PRETRAINED_TABLE,)
# Not written to the saved config.toml: how this run was launched, not what it trains.
NOT_SAVED = ("config", "local_rank", "processes", "overwrite")


def _field_types() -> dict[str, tuple[type, bool]]:
    """Field name -> (base type, optional)."""
    out = {}
    for name, hint in typing.get_type_hints(Config).items():
        args = typing.get_args(hint)
        if args:  # X | None
            base = next(a for a in args if a is not type(None))
            out[name] = (base, True)
        else:
            out[name] = (hint, False)
    return out


FIELD_TYPES = _field_types()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


DESCRIPTION = """\
Train an image classifier with DDP:  python trainer/main.py [flags] starts one process per
GPU of this machine (one process on a CPU); torchrun --nproc_per_node=N trainer/main.py works
too, on one machine or several. With no --train-list the demo data is generated
once (reused after) and the demo recipe trains on it in a few minutes on a CPU; its values
replace the defaults marked 'demo recipe' below and apply only when no data is given. With
--train-list the defaults are ImageNet-like. Precedence: defaults < --config FILE (TOML,
keys = the flag names) < command line."""


def _metavar(f: dataclasses.Field, base: type) -> str:
    if f.metadata["metavar"]:
        return f.metadata["metavar"]
    return {int: "N", float: "X"}.get(base, "TEXT")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Argparse parser with one flag per Config field; unset flags are absent from the result.

    SUPPRESS as the default lets parse_config tell "given on the command line" from "default",
    which the precedence (demo recipe < file < command line) needs.
    """
    parser = argparse.ArgumentParser(
        prog="trainer/main.py",
        description=description or DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    for name, f in FIELDS.items():
        base, _ = FIELD_TYPES[name]
        help_text = f.metadata["help"]
        default = f.default
        notes = []
        if default is not None or "(default:" not in help_text:
            notes.append(f"default: {'none' if default is None else default}")
        if name in DEMO_RECIPE and DEMO_RECIPE[name] != default:
            notes.append(f"demo recipe: {DEMO_RECIPE[name]}")
        if notes:
            help_text = f"{help_text} [{'; '.join(notes)}]"
        flags = [flag_name(name), *f.metadata["flags"]]
        if base is bool:
            parser.add_argument(
                *flags, dest=name, action=argparse.BooleanOptionalAction, help=help_text
            )
        else:
            optional_value = {}
            if f.metadata["const"] is not None:
                optional_value = {"nargs": "?", "const": f.metadata["const"]}
            parser.add_argument(
                *flags,
                dest=name,
                type=base,
                choices=f.metadata["choices"],
                metavar=None if f.metadata["choices"] else _metavar(f, base),
                help=help_text,
                **optional_value,
            )
    return parser


def _coerce(name: str, value: Any, source: str) -> Any:
    base, _optional = FIELD_TYPES[name]
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise TrainerError(
            f"{source}: {name} = {value!r} should be {base.__name__}, not {type(value).__name__}"
        )
    return value


def load_config_file(path: str) -> dict[str, Any]:
    """Read a flat TOML file whose keys are Config field names (dashes allowed)."""
    if not os.path.isfile(path):
        raise TrainerError(f"{path}: config file not found")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise TrainerError(f"{path}: not valid TOML: {exc}") from None
    # Facts a run recorded beside its settings (the pretrained weights' URL, sizes): derived
    # again by a run started from this file, never read as settings.
    raw = {key: value for key, value in raw.items() if key not in FACT_TABLES}
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    if len(values) < len(raw):  # batch-size and batch_size: one would win in silence
        twice = sorted(k for k in values if sum(r.replace("-", "_") == k for r in raw) > 1)
        raise TrainerError(f"{path}: set twice (with - and with _): {', '.join(twice)}")
    unknown = sorted(k for k in values if k not in FIELDS or k == "config")
    if unknown:
        raise TrainerError(
            f"{path}: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(k for k in FIELDS if k != 'config')}"
        )
    return {name: _coerce(name, value, path) for name, value in values.items()}


# The smallest crop: ResNets downsample by 32, so 16 px ends at a 1x1 map after layer3.
MIN_IMAGE_SIZE = 16


class BadValue(TrainerError):
    """A setting's value out of range; ``name`` is its field, so a file's value can be
    reported with the file's name."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


# torch.manual_seed takes at most 2**64 - 1, and each epoch reseeds with seed * 1_000_003 + ...
MAX_SEED = 2**32 - 1


def check_config(cfg: Config) -> None:
    """Values the parser's types cannot rule out (also reached from config files). Raises
    BadValue naming the one field at fault."""
    for name, f in FIELDS.items():
        choices = f.metadata["choices"]
        value = getattr(cfg, name)
        if choices and value not in choices:
            raise BadValue(
                name, f"{flag_name(name)} must be one of {', '.join(choices)}, not {value!r}"
            )
    for name in FIELDS:  # NaN passes every `< 0` check below, and inf is no setting either
        value = getattr(cfg, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise BadValue(name, f"{flag_name(name)} must be a finite number, got {value}")
        # An empty path is no file: --output-dir '' failed in os.makedirs with a traceback,
        # and --val-list "$VAL" with VAL unset meant no validation.
        if value == "":
            raise BadValue(name, f"{flag_name(name)} must not be empty")
    positive = ("epochs", "batch_size", "image_size", "log_interval", "dist_timeout", "prefetch")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise BadValue(name, f"{flag_name(name)} must be > 0, got {getattr(cfg, name)}")
    for name in ("num_classes", "workers", "cpu_threads", "lr", "processes"):
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise BadValue(name, f"{flag_name(name)} must be > 0, got {value}")
    at_least_zero = (
        "checkpoint_every", "checkpoint_minutes", "warmup_epochs", "weight_decay",
        "mixup_alpha", "cutmix_alpha", "clip_grad_norm", "freeze_backbone_epochs",
    )  # fmt: skip
    for name in at_least_zero:
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise BadValue(name, f"{flag_name(name)} must be >= 0, got {value}")
    if not cfg.head_lr_mult > 0:
        raise BadValue("head_lr_mult", f"--head-lr-mult must be > 0, got {cfg.head_lr_mult}")
    if cfg.freeze_backbone_epochs and not cfg.pretrained:
        # A frozen random backbone: the head would learn from noise features.
        raise BadValue(
            "freeze_backbone_epochs",
            "--freeze-backbone-epochs trains the head alone over pretrained layers: give "
            "--pretrained NAME|FILE too",
        )
    if not 0 <= cfg.seed <= MAX_SEED:
        raise BadValue("seed", f"--seed must be in [0, {MAX_SEED}], got {cfg.seed}")
    if cfg.dali_hw_decoder_load is not None and not 0.0 <= cfg.dali_hw_decoder_load <= 1.0:
        raise BadValue(
            "dali_hw_decoder_load",
            f"--dali-hw-decoder-load must be in [0, 1], got {cfg.dali_hw_decoder_load}",
        )
    if cfg.progressive_resize is not None:
        try:
            progressive_sizes(cfg.progressive_resize)
        except TrainerError as exc:
            raise BadValue("progressive_resize", str(exc)) from None
    if cfg.grad_accum_steps < 1:
        raise BadValue(
            "grad_accum_steps", f"--grad-accum-steps must be >= 1, got {cfg.grad_accum_steps}"
        )
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise BadValue("ema_decay", f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if not 0.0 <= cfg.momentum < 1.0:
        raise BadValue("momentum", f"--momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.image_size < MIN_IMAGE_SIZE:
        raise BadValue(
            "image_size",
            f"--image-size must be at least {MIN_IMAGE_SIZE} px (a ResNet halves it 5 times), "
            f"got {cfg.image_size}",
        )
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise BadValue(
            "label_smoothing",
            f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}",
        )


def parse_config(argv: list[str] | None = None) -> Config:
    """Command line (and optional --config file) -> Config. Raises TrainerError on bad input."""
    given = vars(build_parser().parse_args(argv))
    from_file: dict[str, Any] = {}
    if given.get("config"):
        from_file = load_config_file(given["config"])
    values = {**from_file, **given}
    values = _rederive_data_files(values, from_file, given)
    if values.get("train_list") is None:
        for name, value in DEMO_RECIPE.items():
            values.setdefault(name, value)
    cfg = Config(**values)
    try:
        check_config(cfg)
    except BadValue as exc:
        if exc.name in from_file and exc.name not in given:  # the file's value: name the file
            raise TrainerError(f"{given['config']}: {exc}") from None
        raise
    return cfg


def _rederive_data_files(
    values: dict[str, Any], from_file: dict[str, Any], given: dict[str, Any]
) -> dict[str, Any]:
    """A saved config.toml names the val list and classes file found beside its train list
    (and their class count): with another --train-list on the command line they are that
    list's defaults again, as without the file. Kept, the new data trained against the old
    run's val list and class names without a word."""
    old_list, new_list = from_file.get("train_list"), given.get("train_list")
    if old_list is None or new_list is None or old_list == new_list:
        return values
    old_dir = paths.dirname(old_list)
    values = dict(values)
    for name, beside in (("val_list", VAL_LIST), ("classes", CLASSES_FILE)):
        path = from_file.get(name)
        if name not in given and path and paths.abspath(path) == paths.join(old_dir, beside):
            del values[name]
            if name == "classes" and "num_classes" not in given:
                values.pop("num_classes", None)  # counted from that classes.txt
    return values


def progressive_sizes(spec: str) -> tuple[int, int, int]:
    """``START:END:RAMP_EPOCHS`` -> (start, end, ramp), checked."""
    parts = spec.split(":")
    try:
        start, end, ramp = (int(p) for p in parts)
    except ValueError:
        raise TrainerError(
            f"--progressive-resize takes START:END:RAMP_EPOCHS (e.g. 160:224:10), not {spec!r}"
        ) from None
    if not MIN_IMAGE_SIZE <= start <= end or ramp < 1:
        raise TrainerError(
            f"--progressive-resize {spec}: needs {MIN_IMAGE_SIZE} <= START <= END and "
            "RAMP_EPOCHS >= 1"
        )
    return start, end, ramp


def train_image_size(cfg: Config, epoch: int) -> int:
    """The training crop side for ``epoch`` (0-based): --image-size, or the progressive ramp
    (FFCV's: linear from START at epoch 0 to END at RAMP_EPOCHS, rounded to 8 px)."""
    if cfg.progressive_resize is None:
        return cfg.image_size
    start, end, ramp = progressive_sizes(cfg.progressive_resize)
    size = start + (end - start) * min(epoch, ramp) / ramp
    return max(start, min(end, int(round(size / 8)) * 8))


def uses_demo_data(cfg: Config) -> bool:
    return cfg.train_list is None


def global_batch(cfg: Config, world_size: int) -> int:
    """Images per optimizer step: per GPU x ranks x accumulated batches."""
    return cfg.batch_size * world_size * cfg.grad_accum_steps


def default_lr(cfg: Config, world_size: int) -> float:
    if cfg.optimizer == "sgd":
        return 0.1 * global_batch(cfg, world_size) / 256
    return 1e-3 * global_batch(cfg, world_size) / 512


def default_weight_decay(cfg: Config) -> float:
    return 0.05 if cfg.optimizer == "adamw" else 1e-4


def config_dict(cfg: Config) -> dict[str, Any]:
    """The settings that define the run (what config.toml and checkpoints hold)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_SAVED}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    # TOML strings may not hold control characters (a newline in a folder name): escaped, so
    # the saved config.toml still reads back.
    text = "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text)
    return f'"{text}"'


def to_toml(values: dict[str, Any]) -> str:
    """Flat TOML that --config reads back; None (unset) values are left out."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def save_config(cfg: Config, path: str, *, pretrained: dict[str, Any] | None = None) -> None:
    """``pretrained``: the facts of torchvision weights named by --pretrained (their URL,
    file, evaluation sizes, published figures), written as a table after the settings."""
    header = "# resolved settings of this run; reuse with --config\n"
    # What this invocation did rather than what the run is: reused with --config, the file
    # must start (or, with --resume auto given again, continue) the run, not silently
    # resume, evaluate or replace.
    cfg = dataclasses.replace(cfg, resume=None, eval_only=False, overwrite=False)
    text = header + to_toml(config_dict(cfg))
    if pretrained:
        text += (
            f"\n# what the --pretrained weights are (facts, not settings: --config skips this)\n"
            f"[{PRETRAINED_TABLE}]\n{to_toml(pretrained)}"
        )
    atomic_write_text(path, text)


FLAGS_START = "<!-- flags: generated by trainer.config.flags_markdown; do not edit -->"
FLAGS_END = "<!-- flags: end -->"


def flags_markdown() -> str:
    """Every flag of ``build_parser`` (so of ``--help``) as a markdown table: flag and its
    value, then the help text with its default, as ``--help`` prints them. docs/training.md
    holds this between FLAGS_START and FLAGS_END, and a test keeps the two equal."""
    rows = ["| flag | what it does [default] |", "|---|---|"]
    for action in build_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = ", ".join(action.option_strings)
        if action.choices:
            flag += " {" + ",".join(map(str, action.choices)) + "}"
        elif action.metavar:
            flag += f" {action.metavar}"
        text = (action.help or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{flag}` | {text} |")
    return "\n".join([FLAGS_START, "", *rows, "", FLAGS_END])
