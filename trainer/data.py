"""Which data a run uses: the train and val lists and the class names (``resolve_data``), and
the checks that they fit together, so that a wrong pairing fails at start in one line rather
than training against the wrong labels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipelines import paths
from pipelines.lists import CLASSES_FILE, VAL_LIST, classes_beside, missing_file, read_classes
from pipelines.shards import manifest_path
from trainer import dist
from trainer.config import Config, TrainerError
from trainer.model import first_difference


@dataclass(frozen=True)
class DataSpec:
    train_list: str
    val_list: str | None
    class_names: list[str]
    classes_file: str | None
    demo: bool

    @property
    def named_classes(self) -> list[str] | None:
        """The class names when a classes file gives them; None with --num-classes alone,
        whose names are the numbers "0", "1", ... and name no class to compare."""
        return self.class_names if self.classes_file else None


def prepare_demo_data(info: dist.DistInfo) -> str:
    """Generate the demo data set once (reused after), return its Train.txt."""
    from pipelines.demo import MARKER_FILE, DemoDataError, default_demo_root, ensure_demo_data

    root = default_demo_root()
    if os.path.isfile(os.path.join(root, MARKER_FILE)):
        what = f"the demo data in {root} (generated earlier)"
    else:
        what = f"demo data generated now in {root} (once: about 25 s on 2 cores; reused after)"
    # One line, before the wait, so a first run does not look stuck while images are drawn.
    dist.print0(f"no --train-list: training the demo recipe (see --help) on {what}")
    # ensure_demo_data holds a file lock while it writes: one rank generates, the others wait
    # on the lock and then find the finished tree.
    try:
        return ensure_demo_data(root, preset="default").train_list
    except DemoDataError as exc:  # a folder of other data, or of another preset: never replaced
        raise TrainerError(str(exc)) from None


def resolve_data(cfg: Config, info: dist.DistInfo) -> DataSpec:
    """Which lists and class names to use; the loaders then parse and check the lists."""
    demo = cfg.train_list is None
    train_list = prepare_demo_data(info) if demo else cfg.train_list
    shard_set = manifest_path(train_list) is not None  # make_shards.py's folder or manifest
    if not (shard_set or paths.is_file(train_list)):  # before "no classes.txt beside it"
        raise TrainerError(
            f"--train-list {train_list}: {missing_file(train_list, 'list', 'no such file')}"
        )
    val_list = cfg.val_list
    if val_list is None and not shard_set:  # a shard set's val set is given, never guessed
        beside = paths.join(paths.dirname(train_list), VAL_LIST)
        val_list = beside if paths.is_file(beside) and beside != paths.abspath(train_list) else None
    classes_file = cfg.classes or classes_beside(train_list)
    if classes_file is not None:
        if not paths.is_file(classes_file):
            why = missing_file(classes_file, "classes", "classes file not found")
            raise TrainerError(f"{classes_file}: {why}")
        class_names = read_classes(classes_file)
        if cfg.num_classes is not None and cfg.num_classes != len(class_names):
            raise TrainerError(
                f"{classes_file}: names {len(class_names)} classes, but --num-classes is "
                f"{cfg.num_classes}; fix one (the head needs one class count)"
            )
    elif cfg.num_classes is not None:
        class_names = [str(i) for i in range(cfg.num_classes)]
    else:
        raise TrainerError(
            f"{train_list}: no {CLASSES_FILE} beside it; give --classes FILE or --num-classes N"
        )
    if len(class_names) < 2:
        raise TrainerError(
            f"{classes_file or '--num-classes'}: {len(class_names)} class; a classifier needs at "
            "least 2 (top-1 over one class is always 100%)"
        )
    if cfg.classes is not None:
        check_given_classes(cfg.classes, classes_beside(train_list), class_names)
    if val_list:
        check_val_classes(val_list, classes_beside(train_list), class_names)
    # Absolute, so the saved config.toml works from any folder.
    return DataSpec(
        paths.abspath(train_list),
        paths.abspath(val_list) if val_list else None,
        class_names,
        paths.abspath(classes_file) if classes_file else None,
        demo,
    )


def check_given_classes(given: str, beside: str | None, class_names: list[str]) -> None:
    """A ``--classes`` file that names other classes than the classes.txt beside the train
    list, whose labels that one numbered: every class would be trained, scored and saved in
    model.pt under another's name (predict.py then says 'cat' for a dog), without a word."""
    if beside is None or paths.samefile(given, beside):
        return
    theirs = read_classes(beside)
    if theirs != class_names:
        raise TrainerError(
            f"{given}: --classes names other classes than {beside}, which numbered the train "
            f"list's labels ({first_difference(theirs, class_names)}); pass that file (to "
            "rename classes, edit it: one map for every list), or make the lists again"
        )


def check_val_classes(val_list: str, train_classes: str | None, class_names: list[str]) -> None:
    """A val list made with its own class map (make_lists run on another tree) numbers the
    classes its own way: label k must name the same class in both lists, or every val image
    is scored against the wrong class without a word. ``train_classes``: the classes.txt
    beside the train list (lists sharing it share the map); ``class_names``: the run's."""
    val_classes = classes_beside(val_list)
    if val_classes is None:
        return
    if train_classes is not None and paths.samefile(val_classes, train_classes):
        return
    classes_file = train_classes or "--classes/--num-classes"
    val_names = read_classes(val_classes)
    if val_names == class_names:
        return
    raise TrainerError(
        f"{val_classes}: the val list's classes differ from the train list's ({classes_file}): "
        f"{first_difference(val_names, class_names)}; make both lists with one class map "
        "(make_lists on ROOT with train/ and val/)"
    )


def check_train_labels(train_loader, data: DataSpec) -> None:
    """The classes the train list really uses: one class is no classification problem (top-1
    is 100% from the first step), whatever classes.txt names."""
    labels = train_loader.table.labels  # never empty: an empty list fails before this
    if labels.min() == labels.max():
        label = int(labels[0])
        raise TrainerError(
            f"{data.train_list}: every sample has label {label} "
            f"({data.class_names[label]!r}); a classifier needs images of at least 2 classes"
        )
