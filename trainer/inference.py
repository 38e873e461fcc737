"""Inference with a run's ``model.pt``: top-k predictions for image files, and ONNX export.

``tools/predict.py`` and ``tools/export_onnx.py`` are thin command lines over this module.

Prediction reads images through ``pipelines.build_loader`` with ``train=False``: the very
loader and validation preprocessing (shorter side to size / 0.875, center crop, ImageNet
normalization) that ``trainer/main.py --eval-only`` evaluates with, at model.pt's
``preprocessing["image_size"]``. So with the same backend, batch size and ``--amp``, the top-1
of a labelled list equals ``--eval-only``'s for the same weights (a test checks it). The model
is rebuilt from model.pt with torchvision alone (``get_model(arch, num_classes=...)`` and
``load_state_dict``), as the README's snippet does: nothing of the trainer's model code is
needed to use its output.

Bad images: one unreadable file must not cost the predictions of all the others. Two stages:

1. Before any loader runs, every file is checked cheaply, in a thread pool (I/O-bound): it
   exists, is a non-empty regular file, and starts with the magic number of a format DALI
   decodes (16 bytes read). That catches missing, empty, unreadable and non-image files. The
   PIL backend gets the same check, so both backends predict the same set of files (a GIF,
   which PIL reads and DALI does not, is skipped by both).
2. Corrupt or truncated content is only found by decoding, and decoding every file twice (a
   PIL check, then the loader) would halve the throughput for the rare bad file. So the
   loader runs, and when it raises an ``ImageError`` naming a file (both backends name it),
   that file is reported and the loader restarts just after the batches already predicted,
   without it: one loader rebuild per corrupt file (a DALI pipeline builds in ~30 ms). Should
   DALI fail without naming a file (it names none when PIL decodes every file of the batches
   in flight), those files are predicted one loader each, which isolates the culprit.

Skipped files are reported through a callback as ``(path, reason)``; the rest are predicted,
in input order.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from pipelines import build_loader, s3, tuning
from pipelines import paths as paths_
from pipelines.common import object_sizes
from pipelines.imagecheck import header_problem
from pipelines.lists import (
    EmptyListError,
    ImageError,
    ListError,
    SampleTable,
    classes_beside,
    format_line,
    read_classes,
    read_table,
    sample_line,
    write_list,
)
from pipelines.scan import IMAGE_EXTENSIONS, is_image_file
from pipelines.shards import ShardTable, manifest_path, read_shard_table
from pipelines.torchvision_import import torchvision
from trainer import config
from trainer import weights as named_weights
from trainer.dist import usable_cpus
from trainer.engine import resolve_amp
from trainer.model import UnreadableWeights, list_architectures, load_tensors, read_state_dict

DEFAULT_TOP_K = 5
DEFAULT_BATCH_SIZE = 64
BACKENDS = ("auto", "dali", "pil")
AMP_CHOICES = config.AMP_CHOICES
# The trainer's measured defaults (pipelines/tuning.py): with GPU decode more than 8 host
# threads per GPU bought nothing.
GPU_DECODE_MAX_THREADS = tuning.MIXED_MAX_THREADS
# Batches the loader prepares ahead; the batches in flight when a decode fails are this many
# plus the one being handed out and the one being assembled.
PREFETCH = tuning.DEFAULT_PREFETCH
LIST_SUFFIX = ".txt"
# A files-and-folders check pool: reading 16 bytes is I/O-bound, so more threads than cores
# help on a network filesystem and cost nothing on a local disk.
CHECK_THREADS = 16
ONNX_INPUT = "images"
ONNX_OUTPUT = "logits"
ONNX_TOLERANCE = 1e-3
ONNX_CHECK_IMAGES = 8
EXPORT_INSTALL_HINT = "pip install -e '.[export]'"


class InferenceError(ValueError):
    """Input that cannot be used (model file, paths, options); the message is one line."""


class ExportCheckError(RuntimeError):
    """The exported ONNX model disagrees with PyTorch beyond the tolerance."""


@dataclass
class LoadedModel:
    net: nn.Module
    arch: str
    class_names: list[str]
    preprocessing: dict
    weights: str  # "raw" or "ema": which weights the run exported; or torchvision's name
    # The facts of torchvision's weights (trainer.weights.NamedWeights.facts): the ones
    # loaded by name, or those a run started from (its model.pt's "pretrained").
    pretrained: dict | None = None
    from_run: bool = True  # a run's model.pt; False: torchvision's weights by name

    @property
    def image_size(self) -> int:
        return int(self.preprocessing["image_size"])


MODEL_FILE = "model.pt"  # what a run folder holds for inference


def load_model(
    path: str, *, device: torch.device | str = "cpu", arch: str | None = None
) -> LoadedModel:
    """Rebuild the network of a model.pt (or a run folder's) with torchvision only, in eval
    mode on ``device``; InferenceError, one line, for anything that is not one.

    ``path`` may also name torchvision's weights (``ResNet50_Weights.IMAGENET1K_V2``, or
    ``IMAGENET1K_V2`` with ``arch``): fetched into torch's hub cache once, with their own
    class names and crop size."""
    if arch is not None and arch not in list_architectures():
        raise InferenceError(
            f"unknown --arch {arch!r}; torchvision classification models: "
            f"{', '.join(list_architectures())}"
        )
    try:
        named = named_weights.resolve(path, arch, flag="--model")
    except config.TrainerError as exc:
        raise InferenceError(str(exc)) from None
    if named is not None:
        return load_named(named, device=device)
    path = resolve_model_path(path)
    try:
        saved = load_tensors(path)  # never runs code from the file
    except UnreadableWeights as exc:
        raise InferenceError(
            f"{path}: not a model.pt of this trainer ({exc}); pass a run's {MODEL_FILE}"
        ) from None
    needed = ("arch", "model", "class_names", "preprocessing")
    if not isinstance(saved, dict) or any(key not in saved for key in needed):
        raise InferenceError(
            f"{path}: not a model.pt of this trainer (needs {', '.join(needed)}; a training "
            "checkpoint such as last.pt is not one: use the run's model.pt)"
        )
    preprocessing = saved["preprocessing"]
    size = preprocessing.get("image_size") if isinstance(preprocessing, dict) else None
    if not isinstance(size, int) or size < 1:
        raise InferenceError(
            f"{path}: its preprocessing has no image_size (the crop side in px), so its "
            "images cannot be prepared as in training; re-export it with the trainer"
        )
    class_names = list(saved["class_names"])
    net = _rebuild(path, saved["arch"], len(class_names), saved["model"])
    return LoadedModel(
        net=net.eval().to(device),
        arch=saved["arch"],
        class_names=class_names,
        preprocessing=dict(preprocessing),
        weights=str(saved.get("weights", "raw")),
        pretrained=saved.get("pretrained") if isinstance(saved.get("pretrained"), dict) else None,
    )


def load_named(named: named_weights.NamedWeights, *, device: torch.device | str) -> LoadedModel:
    """torchvision's weights as a LoadedModel: ImageNet's class names, the weights' own crop
    size (the loaders resize to it / 0.875, as for a run's model.pt)."""
    from trainer.checkpoint import preprocessing

    try:
        file = named_weights.fetch_one(named)
        state, _ = read_state_dict(file)
    except config.TrainerError as exc:
        raise InferenceError(str(exc)) from None
    facts = named.facts()
    class_names = list(named.enum.meta["categories"])
    return LoadedModel(
        net=_rebuild(file, named.arch, len(class_names), state).eval().to(device),
        arch=named.arch,
        class_names=class_names,
        preprocessing=preprocessing(facts["eval_crop_size"]),
        weights=named.name,
        pretrained=facts,
        from_run=False,
    )


def resolve_model_path(path: str) -> str:
    """``path`` itself, or ``path/model.pt`` for a run folder; InferenceError when neither."""
    if os.path.isdir(path):
        inside = os.path.join(path, MODEL_FILE)
        if os.path.isfile(inside):
            return inside
        raise InferenceError(
            f"{path}: a folder without {MODEL_FILE}: pass a run's {MODEL_FILE} or the run "
            f"folder that holds it (a finished run's --output-dir holds {MODEL_FILE}, "
            "config.toml, metrics.jsonl, last.pt, best.pt)"
        )
    if not os.path.isfile(path):
        raise InferenceError(f"{path}: model file not found")
    return path


def _rebuild(path: str, arch: str, num_classes: int, state_dict) -> nn.Module:
    try:
        net = torchvision.models.get_model(arch, num_classes=num_classes)
    except ValueError as exc:
        raise InferenceError(f"{path}: cannot rebuild {arch}: {exc}") from None
    try:
        net.load_state_dict(state_dict)
    except RuntimeError:
        raise InferenceError(
            f"{path}: its weights do not fit {arch}: {_mismatch(net, state_dict, num_classes, arch)}"
        ) from None
    return net


def _mismatch(net: nn.Module, state_dict, num_classes: int, arch: str) -> str:
    """In one line: which model the weights look like, else the first keys that differ."""
    names = torchvision.models.list_models(module=torchvision.models)
    family = arch.rstrip("0123456789_").rstrip("_")  # resnet34 -> resnet: its kin first
    kin = [n for n in names if n.startswith(family)]
    looks_like = _matching_archs(state_dict, num_classes, kin) or _matching_archs(
        state_dict, num_classes, [n for n in names if n not in kin]
    )
    if looks_like:
        return f"they look like {' or '.join(looks_like)}'s"
    expected = net.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
        if unexpected:
            more = ", ..." if len(unexpected) > 3 else ""
            parts.append(f"unexpected {', '.join(unexpected[:3])}{more}")
        return "; ".join(parts)
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            return (
                f"{key} is {tuple(state_dict[key].shape)} in the file, "
                f"{tuple(tensor.shape)} in {type(net).__name__}"
            )
    return "the weights do not load"


def _matching_archs(state_dict, num_classes: int, names: list[str]) -> list[str]:
    """torchvision classification models whose weights have exactly these names and shapes
    (built on the meta device: no memory, milliseconds each)."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if hasattr(v, "shape")}
    found = []
    for name in names:
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. googlenet's notice about its init
                candidate = torchvision.models.get_model(name, num_classes=num_classes)
        except Exception:  # a model that needs other arguments: not a candidate
            continue
        theirs = candidate.state_dict()
        if theirs.keys() == shapes.keys() and all(
            tuple(t.shape) == shapes[k] for k, t in theirs.items()
        ):
            found.append(name)
    return found


@dataclass(frozen=True)
class Item:
    """One image to predict: the path as the user gave or listed it (a file, an s3:// URL,
    or a shard set's sample name), and its label if known. A shard set's sample also holds
    the set's table and its index there: its bytes are read from the set."""

    path: str
    label: int | None = None
    table: ShardTable | None = None
    index: int = 0

    def source(self):
        """What ``open_rgb`` takes: the path, or the image's bytes (a shard's sample, an
        object in a bucket)."""
        if self.table is not None:
            return self.table.source(self.index)
        return s3.read_bytes(self.path) if s3.is_url(self.path) else self.path


def _walk_images(folder: str, others: Counter | None = None) -> list[str]:
    """Image files under ``folder``, recursively, sorted; hidden files and folders skipped
    (``.ipynb_checkpoints``, ``._x.jpg`` resource forks), as ``tools/make_lists.py`` does.
    ``others`` counts the other files left out, by extension."""
    found: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop: each real folder once
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if is_image_file(name):
                found.append(os.path.join(dirpath, name))
            elif others is not None:
                others[os.path.splitext(name)[1].lower() or "no extension"] += 1
    return found


def _others_note(folder: str, others: Counter) -> str:
    ranked = sorted(others.items(), key=lambda kc: (-kc[1], kc[0]))
    kinds = ", ".join(f"{kind} {n}" for kind, n in ranked[:6])
    n = sum(others.values())
    return (
        f"{folder}: {n} other file{'s' if n != 1 else ''} not predicted ({kinds}"
        f"{', ...' if len(ranked) > 6 else ''}): folders are searched for "
        + "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        + " files"
    )


def collect_inputs(
    paths: Iterable[str],
    *,
    class_names: Sequence[str],
    on_skip: Callable[[str, str], None],
    score_labels: bool = True,
    notes: list[str] | None = None,
) -> list[Item]:
    """Items for the PATHs of the command line, in order.

    A folder gives its image files (recursively); a ``.txt`` file is a list in the project's
    format (``pipelines/lists.py``), its labels kept; any other file is an image. A PATH that
    does not exist is reported through ``on_skip`` and left out. A malformed list, or a label
    outside the model's classes, raises ListError naming ``file:line``; a ``classes.txt``
    beside a list that names other classes than the model's raises InferenceError, since its
    labels would be scored against the wrong names. ``score_labels=False`` (the export's
    check images, whose labels are unused) skips both label checks. ``notes`` gets a line
    for each folder holding other files than images (a phone's .heic, a .gif), which are
    left out: a count that would otherwise be missing from every total.
    """
    items: list[Item] = []
    for path in paths:
        if manifest_path(path) is not None:  # a shard set: its folder, manifest or prefix
            table = read_shard_table(path)
            if score_labels:
                _check_list_labels(path, table, class_names)
            items.extend(
                Item(table.path(i), int(table.labels[i]), table, i) for i in range(len(table))
            )
        elif s3.is_url(path) and not path.lower().endswith(LIST_SUFFIX) and not s3.is_file(path):
            found = [u for u, _, _ in s3.list_objects(path.rstrip("/") + "/")]
            images = [u for u in found if is_image_file(u) and "/." not in u[len(path) :]]
            if not found:
                on_skip(path, "not found")
            items.extend(Item(u) for u in images)
        elif os.path.isdir(path):
            others: Counter = Counter()
            items.extend(Item(p) for p in _walk_images(path, others))
            if others and notes is not None:
                notes.append(_others_note(path, others))
        elif path.lower().endswith(LIST_SUFFIX) and paths_.is_file(path):
            table = read_table(path)
            if score_labels:
                _check_list_labels(path, table, class_names)
            items.extend(Item(table.path(i), int(table.labels[i])) for i in range(len(table)))
        elif s3.is_url(path) or os.path.lexists(path):
            items.append(Item(path))
        else:
            on_skip(path, "not found")
    return items


def _check_list_labels(path: str, table, class_names: Sequence[str]) -> None:
    classes_file = classes_beside(path)
    if classes_file is not None and read_classes(classes_file) != list(class_names):
        raise InferenceError(
            f"{classes_file}: the classes of {path} are not the model's "
            f"({len(class_names)} classes: {', '.join(class_names[:3])}, ...), so its "
            "labels cannot be scored"
        )
    outside = (table.labels >= len(class_names)).nonzero()[0]
    if len(outside):
        index = int(outside[0])
        line = sample_line(path, index) if isinstance(table, SampleTable) else None
        where = f"{path}:{line}" if line is not None else table.path(index)
        raise ListError(
            f"{where}: label {int(table.labels[index])} is outside [0, "
            f"{len(class_names)}): the model has {len(class_names)} classes"
        )


def lists_without_classes(paths: Iterable[str]) -> list[str]:
    """The list files among ``paths`` with no classes.txt beside them: their labels are
    taken as the model's class indices."""
    return [
        p
        for p in paths
        if (p.lower().endswith(LIST_SUFFIX) and paths_.is_file(p) or manifest_path(p) is not None)
        and classes_beside(p) is None
    ]


def _file_problem(path: str) -> str | None:
    """Why the loaders cannot read ``path``, from a stat and its first 16 bytes (or None)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_size == 0:
        return "is empty"
    try:
        # A path a list file cannot hold (a line break, a trailing blank) cannot reach a loader.
        format_line(path, 0)
    except ListError:
        return "has a name a list file cannot hold (a line break or a trailing blank)"
    return header_problem(path)


def check_files(
    items: Sequence[Item], *, on_skip: Callable[[str, str], None], threads: int = CHECK_THREADS
) -> list[Item]:
    """The items whose files pass ``_file_problem``; the others reported through ``on_skip``.
    A shard set's samples were checked with their set (``check_shards``); objects in a
    bucket by the listings of their folders (not a request each)."""
    urls = [item.path for item in items if item.table is None and s3.is_url(item.path)]
    sizes = object_sizes(urls) if urls else {}

    def problem(item: Item) -> str | None:
        if item.table is not None:
            return None
        if s3.is_url(item.path):
            size = sizes.get(item.path)
            return "no such object" if size is None else ("is empty" if size == 0 else None)
        return _file_problem(item.path)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        problems = list(pool.map(problem, items))
    kept = []
    for item, problem in zip(items, problems, strict=True):
        if problem is None:
            kept.append(item)
        else:
            on_skip(item.path, problem)
    return kept


@dataclass(frozen=True)
class Prediction:
    path: str
    label: int | None  # the list's label, None for an unlabelled file
    classes: tuple[int, ...]  # top-k class indices, most probable first
    probabilities: tuple[float, ...]  # their softmax probabilities


@dataclass
class PredictSummary:
    predicted: int = 0
    skipped: int = 0
    labelled: int = 0
    correct: int = 0
    seconds: float = 0.0
    backend: str = ""
    device: str = ""
    loader_restarts: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def top1(self) -> float | None:
        """Percentage of labelled images whose most probable class is their label, the way
        ``trainer.engine.evaluate`` computes ``val_top1``."""
        return 100.0 * self.correct / self.labelled if self.labelled else None

    @property
    def images_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds > 0 else 0.0


def resolve_backend(backend: str) -> tuple[str, torch.device]:
    """``auto``: DALI on the GPU when CUDA is available, PIL on the CPU otherwise."""
    if backend not in BACKENDS:
        raise InferenceError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if backend == "auto":
        backend = "dali" if cuda else "pil"
    return backend, device


def default_threads(backend: str, device: torch.device) -> int:
    cores = usable_cpus()
    if backend == "dali" and device.type == "cuda":
        return min(cores, GPU_DECODE_MAX_THREADS)
    return cores


class Predictor:
    """Runs batches of items through the loader and the model; see the module docstring."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        backend: str,
        device: torch.device,
        batch_size: int,
        top_k: int,
        threads: int,
        amp: str = "off",
    ):
        if batch_size < 1:
            raise InferenceError(f"--batch-size must be at least 1, got {batch_size}")
        if top_k < 1:
            raise InferenceError(f"--top-k must be at least 1, got {top_k}")
        if threads < (1 if backend == "dali" else 0):
            raise InferenceError(f"--workers must be at least 1 with DALI, got {threads}")
        self.model = model
        self.backend = backend
        self.device = device
        self.batch_size = batch_size
        self.top_k = min(top_k, len(model.class_names))
        self.threads = threads
        # The trainer's mapping of --amp (bf16 becomes fp16 on a GPU without bfloat16), and
        # its loaders' output dtype: what --eval-only evaluates with for the same --amp.
        self.amp_dtype, self.amp_note = resolve_amp(amp, device)
        # channels_last as the trainer's model is: the same kernels give the same logits.
        self.net = model.net.to(device=device, memory_format=torch.channels_last).eval()

    def run(
        self,
        items: Sequence[Item],
        *,
        on_prediction: Callable[[Prediction], None],
        on_skip: Callable[[str, str], None],
    ) -> PredictSummary:
        summary = PredictSummary(backend=self.backend, device=str(self.device))
        if self.amp_note:
            summary.notes.append(self.amp_note)
        start = time.perf_counter()

        def skip(path: str, reason: str) -> None:
            summary.skipped += 1
            on_skip(path, reason)

        def predicted(prediction: Prediction) -> None:
            summary.predicted += 1
            if prediction.label is not None:
                summary.labelled += 1
                summary.correct += int(prediction.classes[0] == prediction.label)
            on_prediction(prediction)

        pending = check_files(items, on_skip=skip)
        with tempfile.TemporaryDirectory(prefix="predict-") as scratch:
            while pending:
                done, error = self._predict_batches(pending, scratch, predicted)
                if error is None:  # all of them, or the run of them read from one source
                    pending = pending[done:]
                    continue
                summary.loader_restarts += 1
                rest = pending[done:]
                culprit = _named_item(str(error), rest)
                if culprit is not None:
                    skip(rest[culprit].path, _reason(str(error), rest[culprit].path))
                    pending = rest[:culprit] + rest[culprit + 1 :]
                    continue
                # DALI failed on a batch without naming a file: its batches in flight, one
                # loader per file, so that only the failing ones are left out.
                in_flight = (PREFETCH + 2) * self.batch_size
                for item in rest[:in_flight]:
                    _, error = self._predict_batches([item], scratch, predicted)
                    if error is not None:
                        skip(item.path, _reason(str(error), item.path))
                pending = rest[in_flight:]
        summary.seconds = time.perf_counter() - start
        return summary

    @torch.no_grad()
    def _predict_batches(
        self, items: Sequence[Item], scratch: str, on_prediction: Callable[[Prediction], None]
    ) -> tuple[int, ImageError | None]:
        """Predict ``items`` in order until the end of their first run from one source (files,
        or one shard set) or the loader's first ImageError.

        Returns how many were predicted and the error (None: no error).
        """
        table = items[0].table
        run = next((i for i, item in enumerate(items) if item.table is not table), len(items))
        items = items[:run]
        if table is not None:  # a shard set's samples: read from the set
            source = table.subset([item.index for item in items])
        else:
            source = os.path.join(scratch, "items.txt")
            # Absolute paths, so the loader's error messages name files as _named_item looks
            # for them; label 0 stands in for "unknown": the loader's labels are not used.
            write_list(source, ((item.path, item.label or 0) for item in items), absolute=True)
        loader = build_loader(
            source,
            train=False,
            backend=self.backend,
            batch_size=self.batch_size,
            image_size=self.model.image_size,
            device=self.device,
            num_threads=self.threads,
            dtype=self.amp_dtype or torch.float32,
            num_classes=len(self.model.class_names),
            prefetch=PREFETCH,
            check_files=False,  # check_files() above did more than this stat
        )
        done = 0
        try:
            for images, _ in loader:
                with torch.autocast(
                    images.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
                ):
                    logits = self.net(images)
                # Order by the logits, as evaluate() does; probabilities in float32.
                logits = logits.float()
                top = logits.topk(self.top_k, dim=1)
                probabilities = torch.softmax(logits, dim=1).gather(1, top.indices)
                for row, (classes, probs) in enumerate(
                    zip(top.indices.tolist(), probabilities.tolist(), strict=True)
                ):
                    item = items[done + row]
                    on_prediction(Prediction(item.path, item.label, tuple(classes), tuple(probs)))
                done += len(logits)
        except ImageError as error:
            return done, error
        finally:
            del loader  # PIL workers and DALI pipelines go now, not at some later collection
        return done, None


def _named_item(message: str, items: Sequence[Item]) -> int | None:
    """Index of the item whose file the loader's error names as ``PATH: reason``.

    Searched anywhere in the message, not only at its start: a PIL worker's error reaches us
    as its traceback's last line, which may start with the exception's qualified name.
    """
    for index, item in enumerate(items):
        if _absolute(item.path) + ": " in message:
            return index
    return None


def _absolute(path: str) -> str:
    """The name a loader gives ``path``: absolute, or a URL or shard sample as it is."""
    return path if s3.is_url(path) or ".tar:" in path else os.path.abspath(path)


def _reason(message: str, path: str) -> str:
    """What the loader's error says after ``PATH: ``, on one line."""
    named = _absolute(path) + ": "
    text = message.split(named, 1)[1] if named in message else message
    return " ".join(text.split())


# --- ONNX export ------------------------------------------------------------------------------


def import_onnx_modules():
    """(onnx, onnxruntime); InferenceError with the install hint when one is missing.

    onnxscript is checked too: torch.onnx.export's exporter (torch.export based, the default
    since torch 2.9) writes the graph with it.
    """
    modules = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            modules.append(__import__(name))
        except ImportError:
            raise InferenceError(f"{name} is not installed: {EXPORT_INSTALL_HINT}") from None
    return modules[0], modules[1]


def run_config_lists(model_path: str) -> list[str]:
    """The val and train lists named by the config.toml beside model.pt (a run folder)."""
    import tomllib

    folder = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    config_file = os.path.join(os.path.abspath(folder), "config.toml")
    try:
        with open(config_file, "rb") as f:
            config = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return []
    lists = [config[key] for key in ("val_list", "train_list") if config.get(key)]
    if len(lists) == 2:
        # A val list of comments only (make_lists --val-fraction 0, or classes of one image
        # each) is the trainer's "no validation": the train list's images are the ones to
        # check with, not an error that the val list holds no samples.
        try:
            read_table(lists[0])
        except EmptyListError:
            return lists[1:]
        except ListError:
            pass  # any other fault is named when the images are collected
    return lists


@dataclass
class ExportReport:
    path: str
    num_classes: int
    checked_images: int
    max_abs_difference: float
    tolerance: float
    batch_sizes: tuple[int, ...]
    metadata: dict[str, str]
    seconds: float


def _check_images(
    check_paths: Sequence[str],
    model: LoadedModel,
    size: int,
    max_images: int,
    on_skip: Callable[[str, str], None],
) -> list[torch.Tensor]:
    """The first ``max_images`` readable images of ``check_paths`` with the val transform;
    the unreadable ones reported in input order; InferenceError when none is readable."""
    from pipelines.common import open_rgb
    from pipelines.pil import val_transform

    problems: dict[str, str] = {}
    items: list[Item] = []
    given_order: list[str] = []  # every path as met, for reporting problems in that order
    for given in check_paths:
        found = collect_inputs(
            [given],
            class_names=model.class_names,
            on_skip=problems.__setitem__,
            score_labels=False,  # labels are unused here: another class map is no reason to refuse
        )
        given_order += [item.path for item in found] if found else [given]
        items += found
    readable = check_files(items, on_skip=problems.__setitem__)
    transform = val_transform(size)
    images = []
    for item in readable:
        if len(images) == max_images:
            break
        try:
            images.append(transform(open_rgb(item.source())))
        except Exception as exc:  # PIL raises many types for a bad file; it names none
            problems[item.path] = f"cannot be decoded ({type(exc).__name__}: {exc})"
    for path in given_order:
        if path in problems:
            on_skip(path, problems.pop(path))
    if not images:
        raise InferenceError(
            f"none of the {len(given_order)} check images could be read (each named above): "
            "pass --check-images PATH... with readable images"
            if given_order
            else "no images to check the export with in "
            + " ".join(check_paths)
            + ": pass --check-images PATH... (image files, folders or list files)"
        )
    return images


def export_onnx(
    model_path: str,
    out_path: str,
    *,
    check_paths: Sequence[str],
    tolerance: float = ONNX_TOLERANCE,
    max_check_images: int = ONNX_CHECK_IMAGES,
    on_skip: Callable[[str, str], None] = lambda path, reason: None,
    model: LoadedModel | None = None,
) -> ExportReport:
    """Export model.pt to ONNX (dynamic batch axis, float32 NCHW input ``images`` of the
    val crop size, output ``logits``), with the preprocessing and class names as metadata.

    Before anything is written, onnxruntime runs the exported graph on real images prepared
    with the validation transform (``pipelines.pil.val_transform``, what model.pt's
    preprocessing describes), in two batch sizes (a single check image is repeated to make
    the larger), and the logits must agree with PyTorch's within ``tolerance``; otherwise
    ExportCheckError and no file. ``model``: model_path already loaded. Skipped check images
    are reported in the order they were given.
    """
    onnx, ort = import_onnx_modules()
    from pipelines.fileio import atomic_write

    start = time.perf_counter()
    model = model or load_model(model_path)
    net = model.net.float().eval()
    size = model.image_size
    images = _check_images(check_paths, model, size, max_check_images, on_skip)
    checked_images = len(images)
    if len(images) == 1:  # two batch sizes even so: the batch axis must be checked dynamic
        images = images * 2
    batch = torch.stack(images)

    # A batch of 2 as the example: the exporter specializes sizes 0 and 1, never the axis.
    example = torch.zeros(2, 3, size, size)
    program = torch.onnx.export(
        net,
        (example,),
        dynamo=True,
        verbose=False,
        input_names=[ONNX_INPUT],
        output_names=[ONNX_OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    proto = program.model_proto
    metadata = {
        "arch": model.arch,
        "weights": model.weights,
        "class_names": json.dumps(model.class_names),
        "preprocessing": json.dumps(model.preprocessing),
        **({"pretrained": json.dumps(model.pretrained)} if model.pretrained else {}),
        "input": f"{ONNX_INPUT}: float32 (batch, 3, {size}, {size}), RGB, normalized as "
        "in preprocessing; output logits (batch, classes), softmax for probabilities",
    }
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    serialized = proto.SerializeToString()

    session = ort.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = net(batch).numpy()
    worst = 0.0
    # The whole batch and a single image: the batch axis must be dynamic, not traced at 2.
    batch_sizes = tuple(sorted({len(batch), 1}, reverse=True))
    for n in batch_sizes:
        (logits,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: batch[:n].numpy()})
        worst = max(worst, float(abs(logits - expected[:n]).max()))
    if not math.isfinite(worst) or worst > tolerance:
        raise ExportCheckError(
            f"onnxruntime's logits differ from PyTorch's by up to {worst:.3g} on "
            f"{checked_images} images (tolerance {tolerance:g}); {out_path} was not written"
        )
    atomic_write(out_path, lambda f: f.write(serialized))
    return ExportReport(
        path=out_path,
        num_classes=len(model.class_names),
        checked_images=checked_images,
        max_abs_difference=worst,
        tolerance=tolerance,
        batch_sizes=batch_sizes,
        metadata=metadata,
        seconds=time.perf_counter() - start,
    )
