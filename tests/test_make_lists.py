"""Class folders -> lists (pipelines/scan.py and tools/make_lists.py) on generated trees."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pipelines.lists import ListError, read_classes, read_list
from pipelines.scan import (
    SKIP_HIDDEN,
    SKIP_NOT_IMAGE,
    SKIP_OUTPUT,
    SKIP_OUTSIDE,
    ScanError,
    check_image,
    format_summary,
    make_lists,
    scan_folders,
    split_train_val,
    val_count,
    verify_images,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKE_LISTS = os.path.join(REPO, "tools", "make_lists.py")


def make_tree(root, make_image, counts: dict[str, int], *, size=(12, 10)) -> list[str]:
    """``counts[class] = n`` JPEGs in ``root/<class>/``; returns the image paths."""
    paths = []
    for name, n in counts.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(n):
            paths.append(make_image(os.path.join(root, name, f"img{i:03d}.jpg"), size=size))
    return paths


def _load_cli():
    spec = importlib.util.spec_from_file_location("make_lists_cli", MAKE_LISTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CLI = _load_cli()
cli_main = _CLI.main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, MAKE_LISTS, *args], capture_output=True, text=True, timeout=120
    )


# --- the split -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [
        (10, 0.1, 1),
        (100, 0.1, 10),
        (25, 0.1, 3),  # 2.5 rounds half up
        (14, 0.1, 1),  # 1.4 rounds to 1
        (3, 0.1, 1),  # at least one once there are two images
        (2, 0.9, 1),  # never the whole class
        (1, 0.5, 0),  # a single image stays in train
        (0, 0.5, 0),
        (50, 0.0, 0),
        (10, 0.5, 5),
    ],
)
def test_val_count_rounding(n, fraction, expected):
    assert val_count(n, fraction) == expected


def test_flat_split_is_stratified_and_deterministic(tmp_path, make_image):
    counts = {"a": 20, "b": 7, "c": 1, "d": 33}
    make_tree(tmp_path / "root", make_image, counts)
    first = make_lists(tmp_path / "root", out_dir=tmp_path / "o1", val_fraction=0.25, seed=3)
    again = make_lists(tmp_path / "root", out_dir=tmp_path / "o2", val_fraction=0.25, seed=3)
    other = make_lists(tmp_path / "root", out_dir=tmp_path / "o3", val_fraction=0.25, seed=4)

    assert first.layout == "flat" and first.classes == ["a", "b", "c", "d"]
    val_per_label = Counter(s.label for s in first.val)
    assert val_per_label == {0: 5, 1: 2, 3: 8}  # round(n * 0.25), class c keeps its one image
    assert Counter(s.label for s in first.train) == {0: 15, 1: 5, 2: 1, 3: 25}
    assert not {s.path for s in first.train} & {s.path for s in first.val}

    for name in ("Train.txt", "Test.txt", "classes.txt"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()
    assert again.val == first.val and again.train == first.train
    assert {s.path for s in other.val} != {s.path for s in first.val}
    assert Counter(s.label for s in other.val) == val_per_label  # same sizes, other picks

    # The lists on disk are what the report says, relative to their folder.
    assert read_list(first.val_list, num_classes=4) == first.val
    assert read_list(first.train_list, num_classes=4) == first.train
    assert (tmp_path / "o1" / "Train.txt").read_text().startswith("../root/a/img")


def test_split_of_one_class_does_not_depend_on_the_others(tmp_path, make_image):
    make_tree(tmp_path / "one", make_image, {"a": 12, "b": 9})
    make_tree(tmp_path / "two", make_image, {"a": 12, "b": 9, "c": 30})
    one = make_lists(tmp_path / "one", out_dir=tmp_path / "o1", val_fraction=0.3, seed=1)
    two = make_lists(tmp_path / "two", out_dir=tmp_path / "o2", val_fraction=0.3, seed=1)

    def picks(report):
        return sorted(os.path.relpath(s.path, report.root) for s in report.val if s.label < 2)

    assert picks(one) == picks(two)


def test_zero_fraction_writes_a_comment_only_val_list(tmp_path, make_image):
    make_tree(tmp_path / "root", make_image, {"a": 4, "b": 3})
    report = make_lists(tmp_path / "root", out_dir=tmp_path / "out", val_fraction=0.0)
    assert report.val == [] and len(report.train) == 7
    text = (tmp_path / "out" / "Test.txt").read_text()
    assert text.startswith("# no validation samples") and text.count("\n") == 1
    with pytest.raises(ListError, match="holds no samples"):
        read_list(report.val_list)


def test_split_takes_fractions_in_range_only(tmp_path, make_image):
    make_tree(tmp_path / "root", make_image, {"a": 2})
    for fraction in (-0.1, 1.0, 1.5):
        with pytest.raises(ScanError, match=r"in \[0, 1\)"):
            make_lists(tmp_path / "root", out_dir=tmp_path / "out", val_fraction=fraction)
    with pytest.raises(ScanError):
        split_train_val([], val_fraction=1.0)


# --- layouts and what gets listed --------------------------------------------------------


def test_train_val_layout_keeps_each_split_and_the_train_class_map(tmp_path, make_image):
    root = tmp_path / "root"
    make_tree(root / "train", make_image, {"b": 3, "a": 2, "c": 2})
    make_tree(root / "val", make_image, {"c": 1, "b": 2})  # a subset of the classes is fine
    report = make_lists(root, out_dir=tmp_path / "out", val_fraction=0.5)
    assert report.layout == "split"
    assert read_classes(report.classes_file) == ["a", "b", "c"]
    train = read_list(report.train_list, num_classes=3)
    val = read_list(report.val_list, num_classes=3)
    assert Counter(s.label for s in train) == {0: 2, 1: 3, 2: 2}
    assert Counter(s.label for s in val) == {1: 2, 2: 1}  # labels from train/, no resplit
    assert all(f"{os.sep}val{os.sep}" in s.path for s in val)


def test_val_images_without_class_folders_are_an_error_not_an_empty_val(tmp_path, make_image):
    # ImageNet's val/ is flat (ILSVRC2012_val_*.JPEG, labels in the devkit): it was listed as
    # "skipped: 3 outside the class folders", Test.txt said val/ held no images, and the
    # trainer ran without validation.
    root = tmp_path / "root"
    make_tree(root / "train", make_image, {"a": 2, "b": 2})
    os.makedirs(root / "val")
    for i in range(3):
        make_image(str(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG"), size=(12, 10))
    with pytest.raises(ScanError, match=r"val: its 3 images lie directly in it.*<class>/<image>"):
        make_lists(root, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    # Some in class folders, some loose: the loose ones are named in a note.
    make_tree(root / "val", make_image, {"a": 1})
    report = make_lists(root, out_dir=tmp_path / "out")
    assert len(report.val) == 1
    assert any("3 images directly in" in note for note in report.notes), report.notes


def test_test_folder_serves_as_val_and_val_wins_over_test(tmp_path, make_image):
    root = tmp_path / "root"
    make_tree(root / "train", make_image, {"a": 2, "b": 1})
    make_tree(root / "test", make_image, {"a": 1})
    report = make_lists(root, out_dir=tmp_path / "o1")
    assert report.layout == "split" and len(report.val) == 1
    make_tree(root / "val", make_image, {"a": 2})
    report = make_lists(root, out_dir=tmp_path / "o2")
    assert len(report.val) == 2 and any("test" in note for note in report.notes)


def test_val_class_missing_from_train_is_an_error_naming_it(tmp_path, make_image):
    root = tmp_path / "root"
    make_tree(root / "train", make_image, {"a": 2, "b": 2})
    make_tree(root / "val", make_image, {"a": 1, "zebra": 1})
    with pytest.raises(ScanError, match=r"val/zebra: class 'zebra' is not among the 2 training"):
        make_lists(root, out_dir=tmp_path / "out")
    result = run_cli(str(root), "--out-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "zebra" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert not os.path.exists(tmp_path / "out" / "Train.txt")  # nothing half-written


def test_skipped_files_empty_classes_and_nested_folders(tmp_path, make_image):
    root = tmp_path / "root"
    make_tree(root, make_image, {"cat": 2, "dog": 1})
    make_image(root / "cat" / "deeper" / "deepest" / "nested.PNG", fmt="PNG")
    make_image(root / "dog" / "UPPER.JPEG")
    make_image(root / "dog" / ".hidden.jpg")  # hidden even though it is an image
    make_image(root / "dog" / ".cache" / "thumb.jpg")  # hidden folder: not walked
    make_image(root / ".hidden_class" / "x.jpg")  # not a class
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "image.jpg.bak").write_text("nor is this")
    (root / "stray.jpg").write_bytes(b"")  # outside any class folder
    os.makedirs(root / "empty")
    os.makedirs(root / "also_empty" / "sub")
    (root / "also_empty" / "sub" / "readme.md").write_text("no images here")

    report = make_lists(root, out_dir=tmp_path / "out", val_fraction=0.0)
    assert report.classes == ["also_empty", "cat", "dog", "empty"]  # empty ones keep a label
    assert report.empty_classes == ["also_empty", "empty"]
    listed = sorted(os.path.relpath(s.path, root) for s in report.train)
    assert listed == [
        "cat/deeper/deepest/nested.PNG",
        "cat/img000.jpg",
        "cat/img001.jpg",
        "dog/UPPER.JPEG",
        "dog/img000.jpg",
    ]
    assert {s.label for s in report.train} == {1, 2}
    reasons = {os.path.relpath(p, root): r for p, r in report.skipped}
    assert reasons == {
        ".hidden_class": SKIP_HIDDEN,
        "also_empty/sub/readme.md": SKIP_NOT_IMAGE,
        "cat/image.jpg.bak": SKIP_NOT_IMAGE,
        "cat/notes.txt": SKIP_NOT_IMAGE,
        "dog/.cache": SKIP_HIDDEN,
        "dog/.hidden.jpg": SKIP_HIDDEN,
        "stray.jpg": SKIP_OUTSIDE,
    }
    summary = format_summary(report)
    assert "warning: empty class folder: also_empty" in summary
    assert (
        "skipped: 7 (3 hidden; 3 not an image file: .bak 1, .md 1, .txt 1; "
        "1 outside the class folders)"
    ) in summary
    assert "empty classes: 2" in summary


def test_output_folder_inside_root_is_not_a_class(tmp_path, make_image):
    root = tmp_path / "root"
    make_tree(root, make_image, {"a": 3, "b": 3})
    first = make_lists(root, out_dir=root / "lists")
    again = make_lists(root, out_dir=root / "lists")  # the folder exists now
    assert again.classes == first.classes == ["a", "b"]
    assert (str(root / "lists"), SKIP_OUTPUT) in again.skipped
    other = tmp_path / "other"
    make_tree(other, make_image, {"a": 3, "b": 3})
    make_lists(other, out_dir=other)
    beside = make_lists(other, out_dir=other)  # lists right in ROOT: files outside the classes
    assert beside.classes == ["a", "b"]
    assert (str(other / "Train.txt"), SKIP_OUTSIDE) in beside.skipped


def test_an_out_dir_that_is_a_class_folder_keeps_the_class(tmp_path, make_image):
    # --out-dir ROOT/b, a class folder of images: the class b was left out as "the output
    # folder" (classes: 1 of 2, its images counted as one skipped folder).
    root = tmp_path / "root"
    make_tree(root, make_image, {"a": 3, "b": 3})
    for _ in range(2):  # the second run finds the lists in b
        report = make_lists(root, out_dir=root / "b")
        assert report.classes == ["a", "b"]
        assert len(report.train) + len(report.val) == 6


def test_symlinked_folders_are_followed_once(tmp_path, make_image):
    root = tmp_path / "root"
    make_tree(root, make_image, {"a": 1})
    make_tree(tmp_path / "elsewhere", make_image, {"b": 2})
    os.symlink(tmp_path / "elsewhere" / "b", root / "b")
    os.symlink(root / "a", root / "a" / "loop")  # a cycle must not hang the walk
    scan = scan_folders(root)
    assert scan.classes == ["a", "b"]
    assert Counter(s.label for s in scan.samples) == {0: 1, 1: 2}


def test_unicode_and_spaces_round_trip_through_read_list(tmp_path, make_image):
    root = tmp_path / "my data"
    names = {"ñandú café": 3, "日本 語": 2, "#hash": 2, "plain": 2}
    make_tree(root, make_image, names)
    make_image(root / "plain" / "a  b  c .jpg")
    make_image(root / "plain" / "ünï cødé 1.jpg")
    for absolute in (False, True):
        out = tmp_path / f"lists abs={absolute}"
        report = make_lists(root, out_dir=out, val_fraction=0.34, absolute=absolute)
        classes = read_classes(out / "classes.txt")
        assert classes == sorted(names)
        train = read_list(out / "Train.txt", num_classes=len(classes))
        val = read_list(out / "Test.txt", num_classes=len(classes))
        assert train == report.train and val == report.val
        assert all(os.path.isfile(s.path) for s in train + val)
        assert len(train) + len(val) == 11
        first_path = (out / "Train.txt").read_text(encoding="utf-8").split("\n")[0]
        assert first_path.startswith(str(root) if absolute else "../my data/")


# --- verify ------------------------------------------------------------------------------


def make_broken_files(folder, make_image) -> dict[str, str]:
    """Three unusable files in ``folder``: name -> the words its reason must hold."""
    good = make_image(os.path.join(folder, "good.jpg"), size=(64, 48))
    data = Path(good).read_bytes()
    Path(folder, "truncated.jpg").write_bytes(data[: len(data) // 2])
    Path(folder, "empty.jpg").write_bytes(b"")
    Path(folder, "text.jpg").write_text("this is not a JPEG at all\n")
    return {"truncated.jpg": "runcated", "empty.jpg": "empty file", "text.jpg": "not an image"}


def test_check_image_reasons(tmp_path, make_image):
    broken = make_broken_files(tmp_path, make_image)
    assert check_image(str(tmp_path / "good.jpg")) is None
    for name, words in broken.items():
        assert words in check_image(str(tmp_path / name))
    assert "FileNotFoundError" in check_image(str(tmp_path / "gone.jpg"))
    # Odd but decodable files pass: grayscale, CMYK, RGBA and a PNG inside a .jpg.
    for mode, fmt in (("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG")):
        assert check_image(make_image(tmp_path / f"odd_{mode}.jpg", mode=mode, fmt=fmt)) is None


def test_verify_images_serial_and_chunked_agree(tmp_path, make_image):
    broken = make_broken_files(tmp_path, make_image)
    paths = sorted(str(tmp_path / n) for n in [*broken, "good.jpg"])
    serial = verify_images(paths, workers=1)
    assert [os.path.basename(p) for p, _ in serial] == sorted(broken)
    assert verify_images(paths, workers=2, chunk_size=1) == serial


def test_verify_reports_its_progress_after_each_chunk(tmp_path, make_image, capsys):
    broken = make_broken_files(tmp_path, make_image)
    paths = sorted(str(tmp_path / n) for n in [*broken, "good.jpg"])

    def progress_calls(workers: int) -> list[tuple[int, int, int]]:
        calls = []
        verify_images(paths, workers=workers, chunk_size=1, on_progress=lambda *a: calls.append(a))
        return calls

    for workers in (1, 2):
        calls = progress_calls(workers)
        assert [checked for checked, _, _ in calls] == [1, 2, 3, 4]
        assert {total for _, total, _ in calls} == {4}
        assert calls[-1][2] == len(broken)  # failures so far, all of them at the end
    # The command line's printer: a line per interval on stderr, none for the last chunk
    # (the summary follows it), nothing on stdout.
    progress = _CLI.VerifyProgress(interval_s=0)
    progress(250, 1000, 3)
    progress(1000, 1000, 3)
    out, err = capsys.readouterr()
    assert out == ""
    assert re.fullmatch(
        r"--verify: 250 of 1,000 images checked \(25%\), 3 excluded so far, "
        r"[\d,]+ images/s, (under a minute|about [\d,]+ min) left\n",
        err,
    )
    quiet = _CLI.VerifyProgress()  # the default interval: a small tree prints nothing
    quiet(1, 2, 0)
    assert capsys.readouterr().err == ""


def test_ctrl_c_during_verify_is_one_line_and_drops_the_chunks_not_started(
    tmp_path, make_image, monkeypatch, capsys
):
    import signal

    import pipelines.scan as scan

    class InterruptedPool:  # a pool whose map is cut short by Ctrl-C after one chunk
        def __init__(self, **kwargs):
            self.kwargs, self.shutdowns = kwargs, []
            pools.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.shutdown()

        def map(self, fn, chunks):
            yield fn(next(iter(chunks)))
            raise KeyboardInterrupt

        def shutdown(self, wait=True, *, cancel_futures=False):
            self.shutdowns.append(cancel_futures)

    pools: list[InterruptedPool] = []
    monkeypatch.setattr(scan, "ProcessPoolExecutor", InterruptedPool)
    root = tmp_path / "root"
    make_tree(root, make_image, {"a": 4, "b": 4})
    assert cli_main([str(root), "--out-dir", str(tmp_path / "out"), "--verify"]) == 130
    assert capsys.readouterr().err == "interrupted: no lists written\n"
    assert not os.path.exists(tmp_path / "out")
    (pool,) = pools
    assert pool.shutdowns[0] is True  # pending chunks cancelled before the pool is left
    # The workers leave Ctrl-C to the parent: no traceback from each of them.
    previous = signal.getsignal(signal.SIGINT)
    try:
        pool.kwargs["initializer"]()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_cli_verify_names_each_excluded_file(tmp_path, make_image):
    root = tmp_path / "root"
    make_tree(root, make_image, {"a": 4, "b": 4})
    broken = make_broken_files(root / "b", make_image)
    out = tmp_path / "out"
    result = run_cli(
        str(root), "--out-dir", str(out), "--verify", "--workers", "2", "--val-fraction", "0.25"
    )
    assert result.returncode == 0, result.stderr
    excluded = [line for line in result.stdout.splitlines() if line.startswith("excluded: ")]
    assert len(excluded) == 3
    for line, (name, words) in zip(excluded, sorted(broken.items()), strict=True):
        assert line.startswith(f"excluded: {root / 'b' / name}: ") and words in line
    assert "--verify: 12 images checked, 3 excluded" in result.stdout
    listed = {s.path for s in read_list(out / "Train.txt") + read_list(out / "Test.txt")}
    assert len(listed) == 9  # 4 + 4 + good.jpg
    assert not any(os.path.basename(p) in broken for p in listed)
    # The split comes after verification: b has 5 usable files, round(5 * 0.25) = 1 for val.
    assert Counter(s.label for s in read_list(out / "Test.txt")) == {0: 1, 1: 1}


def test_cli_summary_and_absolute_paths(tmp_path, make_image):
    root = tmp_path / "root"
    make_tree(root, make_image, {"a": 10, "b": 10})
    result = run_cli(str(root), "--out-dir", str(tmp_path / "out"), "--absolute", "--seed", "5")
    assert result.returncode == 0, result.stderr
    assert "classes: 2" in result.stdout
    assert "train: 18 images" in result.stdout and "val: 2 images" in result.stdout
    for line in (tmp_path / "out" / "Train.txt").read_text().splitlines():
        assert line.startswith(f"{root}/")


@pytest.mark.parametrize(
    ("layout", "words"),
    [
        ("missing", "no such folder"),
        ("no_classes", "no class folders"),
        ("no_images", "no image files in 2 class folders"),
        ("only_train", "looks like half of a split layout"),
        ("one_class", "a classifier needs at least 2 classes"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, make_image, capsys, layout, words):
    root = tmp_path / "root"
    if layout == "no_classes":
        os.makedirs(root)
        make_image(root / "loose.jpg")
    elif layout == "no_images":
        os.makedirs(root / "a")
        os.makedirs(root / "b")
        (root / "a" / "readme.txt").write_text("x")
    elif layout == "only_train":  # pointed at the parent of train/, with no val/ beside it
        make_tree(root / "train", make_image, {"cat": 2, "dog": 2})
    elif layout == "one_class":
        make_tree(root, make_image, {"cat": 3})
        os.makedirs(root / "dog")  # an empty class folder does not make a second class
    with pytest.raises(ScanError, match=re.escape(words)):
        make_lists(root, out_dir=tmp_path / "out")
    assert cli_main([str(root), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "out")
    if layout == "only_train":
        assert f"if {root / 'train' / 'train'} holds" not in err
        assert "run on it instead" in err and str(root / "train") in err


def test_verify_that_empties_a_class_leaves_one_class_an_error(tmp_path, make_image):
    # Every "broken" image fails --verify: one class is left, which is no classifier.
    make_tree(tmp_path / "root", make_image, {"good": 4})
    for i in range(3):
        (tmp_path / "root" / "broken").mkdir(exist_ok=True)
        (tmp_path / "root" / "broken" / f"{i}.jpg").write_text("not a JPEG\n")
    with pytest.raises(ScanError, match="one class with images"):
        make_lists(tmp_path / "root", out_dir=tmp_path / "out", verify=True, workers=1)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(("train", "val"), [("Train", "Val"), ("train", "validation")])
def test_split_folders_in_any_case_and_validation(tmp_path, make_image, train, val):
    make_tree(tmp_path / "root" / train, make_image, {"cat": 2, "dog": 2})
    make_tree(tmp_path / "root" / val, make_image, {"cat": 1, "dog": 1})
    report = make_lists(tmp_path / "root", out_dir=tmp_path / "out")
    assert report.layout == "split" and report.classes == ["cat", "dog"]
    assert (len(report.train), len(report.val)) == (4, 2)


def test_lists_nested_deeper_inside_root_are_not_a_class(tmp_path, make_image):
    root = tmp_path / "root"
    make_tree(root, make_image, {"apple": 3, "banana": 3})
    first = make_lists(root, out_dir=root / "Lists" / "v1")
    second = make_lists(root, out_dir=root / "Lists" / "v2")
    assert first.classes == second.classes == ["apple", "banana"]
    assert not second.empty_classes


def test_names_a_list_cannot_hold_are_skipped_and_counted(tmp_path, make_image):
    root = tmp_path / "root"
    make_tree(root, make_image, {"a": 2, "b": 2})
    bad = os.path.join(os.fsencode(root / "a"), b"caf\xe9.jpg")  # Latin-1, not UTF-8
    make_image(os.fsdecode(bad))
    make_image(root / "b" / "photo.JFIF")  # JPEG under another name is listed
    report = make_lists(root, out_dir=tmp_path / "out")
    assert ("name not valid UTF-8 (a list cannot hold it)") in dict(report.skipped).values()
    assert len(report.train) + len(report.val) == 5
    summary = format_summary(report)
    assert "1 name not valid UTF-8" in summary


def test_verify_rejects_what_dali_cannot_decode(tmp_path, make_image):
    # PIL decodes all three; DALI (libpng, its format list) does not.
    good = make_image(tmp_path / "good.png", fmt="PNG")
    data = bytearray(Path(good).read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF  # a flipped byte inside the compressed data: CRC error
    Path(tmp_path / "crc.png").write_bytes(bytes(data))
    Path(tmp_path / "short.png").write_bytes(Path(good).read_bytes()[:-20])
    make_image(tmp_path / "gif_as.png", fmt="GIF")
    assert check_image(good) is None
    assert "CRC error in its 'IDAT' chunk" in check_image(str(tmp_path / "crc.png"))
    assert "truncated PNG" in check_image(str(tmp_path / "short.png"))
    assert "a GIF image, a format DALI does not decode" in check_image(str(tmp_path / "gif_as.png"))


def test_summary_names_classes_without_val_images(tmp_path, make_image):
    make_tree(tmp_path / "root", make_image, {"many": 10, "single": 1})
    report = make_lists(tmp_path / "root", out_dir=tmp_path / "out")
    assert "note: class 'single' has no val images" in format_summary(report)


def test_many_classes_without_val_images_are_one_line_not_one_each(tmp_path, make_image):
    # A train/ of 30 classes and a val/ of 3 of them: 27 classes without val images, and 12
    # empty val folders; one note and one warning with the count and the first names.
    root = tmp_path / "root"
    make_tree(root / "train", make_image, {f"c{k:02d}": 1 for k in range(30)})
    make_tree(root / "val", make_image, {f"c{k:02d}": 1 for k in range(3)})
    for k in range(3, 15):
        os.makedirs(root / "val" / f"c{k:02d}")
    summary = format_summary(make_lists(root, out_dir=tmp_path / "out"))
    lines = summary.splitlines()
    assert "note: 27 classes have no val images: 'c03', 'c04', 'c05', 'c06', 'c07', ..." in lines
    warning = "warning: 12 empty class folders: val/c03, val/c04, val/c05, val/c06, val/c07, ..."
    assert warning in lines
    assert "empty classes: 12" in lines and len(lines) == 9, summary


@pytest.mark.parametrize(
    ("value", "words"), [("abc", "'abc' is not an integer"), ("0", "0 is below the minimum, 1")]
)
def test_a_bad_number_for_a_flag_is_said_in_words(tmp_path, capsys, value, words):
    # The tools' number types are the benchmarks' (benchmarks/cli.py); argparse's own message
    # for a non-number named the checking function: "invalid _positive value: 'abc'".
    with pytest.raises(SystemExit) as stopped:
        cli_main([str(tmp_path), "--workers", value])
    assert stopped.value.code == 2
    assert f"error: argument --workers: {words}\n" in capsys.readouterr().err


def test_out_dir_that_is_a_file_is_one_line(tmp_path, make_image, capsys):
    make_tree(tmp_path / "root", make_image, {"a": 2, "b": 2})
    (tmp_path / "afile").write_text("x")
    assert cli_main([str(tmp_path / "root"), "--out-dir", str(tmp_path / "afile")]) == 2
    assert "--out-dir is a file, not a folder" in capsys.readouterr().err


def test_an_earlier_lists_folder_inside_root_is_not_a_class(tmp_path, make_image):
    # make_lists ROOT --out-dir ROOT/lists, then another --out-dir: "lists" holds only list
    # files and no image, so it is no class and renumbers nothing.
    root = tmp_path / "root"
    make_tree(root, make_image, {"apple": 3, "banana": 3})
    make_lists(root, out_dir=root / "lists")
    make_lists(root, out_dir=root / "Lists" / "v1")
    report = make_lists(root, out_dir=tmp_path / "elsewhere")
    assert report.classes == ["apple", "banana"] and not report.empty_classes


def test_flat_classes_named_like_split_folders(tmp_path, make_image):
    # "train" and "test" holding images are classes of a flat tree, not a split layout; a
    # lone "valid" with nested images is a class too.
    root = tmp_path / "root"
    make_tree(root, make_image, {"train": 3, "test": 3, "other": 3})
    make_image(root / "valid" / "sub" / "a.jpg")
    make_image(root / "valid" / "sub" / "b.jpg")
    report = make_lists(root, out_dir=tmp_path / "out")
    assert report.layout == "flat"
    assert report.classes == ["other", "test", "train", "valid"]


def test_empty_class_holding_a_list_file_keeps_its_label(tmp_path, make_image):
    root = tmp_path / "root"
    make_tree(root, make_image, {"cat": 2, "dog": 2})
    (root / "zebra").mkdir()
    (root / "zebra" / "Train.txt").write_text("notes of mine\n")
    report = make_lists(root, out_dir=tmp_path / "out")
    assert report.classes == ["cat", "dog", "zebra"] and report.empty_classes == ["zebra"]


def test_split_layout_counts_what_lies_beside_it(tmp_path, make_image):
    root = tmp_path / "root"
    make_tree(root / "train", make_image, {"cat": 2, "dog": 2})
    make_tree(root / "val", make_image, {"cat": 1, "dog": 1})
    make_tree(root / "other", make_image, {"x": 2})
    report = make_lists(root, out_dir=tmp_path / "out")
    assert (str(root / "other"), "beside the train/ and val/ folders") in report.skipped
