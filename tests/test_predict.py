"""tools/predict.py and trainer.inference: top-k predictions of a run's model.pt.

Every test predicts with a model.pt written by the trainer's export_model, on the tiny demo
data and files made here: real DALI in CPU mode, real PIL workers, real files, nothing mocked.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import PIL.Image
import pytest
import torch
import torchvision
import torchvision.transforms.v2 as T
from torch import nn

from pipelines import build_loader
from pipelines.lists import read_classes, read_list, write_list
from trainer import inference
from trainer.checkpoint import export_model
from trainer.main import main as trainer_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREDICT = os.path.join(REPO, "tools", "predict.py")
IMAGE_SIZE = 32
# DALI's resize is within a grey level of PIL's: its probabilities were up to 0.006 from the
# PIL-resized reference here (PIL's: 3e-6), while a resize to the crop size itself (no 0.875)
# moved them by up to 0.29, and leaving out the normalization by 0.40.
DALI_TOLERANCE = 0.02
TOP1_LINE = re.compile(r"^top-1 (\d+\.\d\d)% over (\d+) labelled images$")


def _load_cli():
    spec = importlib.util.spec_from_file_location("predict_cli", PREDICT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


predict_main = _load_cli()


@pytest.fixture(scope="module")
def single_process():
    # The trainer reads torchrun's variables; a test run under torchrun must not leak them.
    with pytest.MonkeyPatch.context() as patch:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            patch.delenv(key, raising=False)
        yield


@pytest.fixture(scope="module")
def model_file(tiny_data, tmp_path_factory) -> str:
    """model.pt of a fresh resnet18 at 32 px, written by the trainer's own export_model.

    Its BatchNorm statistics are measured on the tiny training images (a forward pass in
    train mode), so its predictions differ from image to image as a trained model's do,
    without the cost of training one.
    """
    torch.manual_seed(0)
    net = torchvision.models.get_model("resnet18", num_classes=tiny_data.num_classes)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a plain average over the batches seen
    net.train()
    calibration = build_loader(
        tiny_data.train_list, train=False, backend="pil", batch_size=40,
        image_size=IMAGE_SIZE, num_threads=0,
    )  # fmt: skip
    with torch.no_grad():
        for images, _ in calibration:
            net(images)
    path = str(tmp_path_factory.mktemp("run") / "model.pt")
    export_model(
        path, model=net, arch="resnet18", class_names=read_classes(tiny_data.classes_file),
        image_size=IMAGE_SIZE,
    )  # fmt: skip
    return path


def run_predict(capsys, *args: str) -> tuple[int, list[str], list[str]]:
    """tools/predict.py's main in this process: (exit status, stdout lines, stderr lines)."""
    rc = predict_main(list(args))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return rc, captured.out.splitlines(), captured.err.splitlines()


def parse_line(line: str) -> tuple[str, list[tuple[str, float]]]:
    path, *ranked = line.split("\t")
    return path, [(name, float(p)) for name, p in (r.rsplit(" ", 1) for r in ranked)]


def prediction_lines(stdout: list[str]) -> list[str]:
    return [line for line in stdout if "\t" in line]


@pytest.mark.parametrize("to_csv", [False, True])
def test_ctrl_c_is_one_line_and_writes_no_csv(
    tiny_data, model_file, capsys, monkeypatch, tmp_path, to_csv
):
    real_run = inference.Predictor.run

    def interrupted_run(self, items, *, on_prediction, **kwargs):
        def count(prediction):  # Ctrl-C arrives after the third prediction
            on_prediction(prediction)
            if count.n == 2:
                raise KeyboardInterrupt
            count.n += 1

        count.n = 0
        return real_run(self, items, on_prediction=count, **kwargs)

    monkeypatch.setattr(inference.Predictor, "run", interrupted_run)
    csv_file = tmp_path / "p.csv"
    extra = ["--csv", str(csv_file)] if to_csv else []
    rc = predict_main(["--model", model_file, tiny_data.val_list, "--workers", "0", *extra])
    out, err = capsys.readouterr()
    assert rc == 130
    assert err == (
        f"interrupted after 3 predictions{f'; {csv_file} not written' if to_csv else ''}\n"
    )
    assert len(prediction_lines(out.splitlines())) == (0 if to_csv else 3)
    assert not csv_file.exists()


@pytest.mark.slow
def test_command_line_predicts_files_and_folders_in_order(tiny_data, model_file):
    """The real command line (its sys.path set-up, its exit status) on an image file and a
    folder: one line per image, in order, top-k most probable first."""
    classes = read_classes(tiny_data.classes_file)
    folder = os.path.join(tiny_data.root, "val", classes[1])
    single = os.path.join(tiny_data.root, "val", classes[0], "val_0000.jpg")
    proc = subprocess.run(
        [
            sys.executable,
            PREDICT,
            "--model",
            model_file,
            single,
            folder,
            "--top-k",
            "3",
            "--cpu-threads",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    lines = prediction_lines(proc.stdout.splitlines())
    in_folder = sorted(os.listdir(folder))
    assert len(in_folder) == 4
    assert [parse_line(line)[0] for line in lines] == [single] + [
        os.path.join(folder, name) for name in in_folder
    ]
    for line in lines:
        ranked = parse_line(line)[1]
        assert len(ranked) == 3
        assert all(name in classes for name, _ in ranked)
        assert len({name for name, _ in ranked}) == 3
        probabilities = [p for _, p in ranked]
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1.0001
    # Unlabelled input: no accuracy line, but the throughput line.
    assert not any(TOP1_LINE.match(line) for line in proc.stdout.splitlines())
    said = re.search(r"^predicted 5 images in [\d.]+ s: \d+ img/s \((.*)\)$", proc.stdout, re.M)
    assert said and ", torch 1, " in said.group(1)  # the model's threads, as asked


@pytest.mark.slow
def test_a_reader_that_goes_away_ends_it_quietly(tiny_data, model_file):
    # `predict.py ... | head -1`: a traceback (BrokenPipeError at the summary line), or with
    # more images 'error: [Errno 32] Broken pipe' and status 2, as if the input were bad.
    proc = subprocess.Popen(
        [sys.executable, PREDICT, "--model", model_file, "--workers", "0", tiny_data.val_list],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # before its first write: the reader has gone
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGPIPE, err
    assert err == "", err


def test_files_of_a_folder_that_are_not_images_are_counted(capsys, tmp_path, tiny_data, model_file):
    # A phone's .HEIC photos, a .gif, Thumbs.db: left out, as before, but no longer in silence
    # ("predicted 2 images" of a folder of six photos said nothing of the other four).
    folder = tmp_path / "photos"
    (folder / "2023").mkdir(parents=True)
    source = os.path.join(tiny_data.root, "val", read_classes(tiny_data.classes_file)[0])
    first, second = sorted(os.listdir(source))[:2]
    shutil.copy(os.path.join(source, first), folder / "a.jpg")
    shutil.copy(os.path.join(source, second), folder / "2023" / "b.JPG")
    for name in ("IMG_1.HEIC", "2023/IMG_2.HEIC", "IMG_3.heic", "anim.gif", "Thumbs.db"):
        (folder / name).write_bytes(b"not decoded")
    (folder / ".DS_Store").write_bytes(b"hidden: not counted")
    rc, out, _ = run_predict(capsys, "--model", model_file, "--workers", "0", str(folder))
    assert rc == 0
    assert len(prediction_lines(out)) == 2
    notes = [line for line in out if line.startswith(f"note: {folder}: ")]
    assert notes[0].startswith(
        f"note: {folder}: 5 other files not predicted (.heic 3, .db 1, .gif 1)"
    )


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_list_to_csv_with_top_k_capped_at_the_class_count(capsys, tmp_path, tiny_data, model_file, backend):  # fmt: skip
    classes = read_classes(tiny_data.classes_file)
    out_csv = tmp_path / "predictions.csv"
    rc, out, err = run_predict(
        capsys, "--model", model_file, tiny_data.val_list, "--top-k", "50",
        "--batch-size", "6", "--backend", backend, "--workers", "1", "--csv", str(out_csv),
    )  # fmt: skip
    assert rc == 0, err
    assert prediction_lines(out) == []  # with --csv the predictions go to the file only
    with open(out_csv, newline="") as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], rows[1:]
    assert header[:4] == ["path", "label", "class_1", "probability_1"]
    assert header[-2:] == ["class_10", "probability_10"]  # top-k 50 capped at 10 classes
    samples = read_list(tiny_data.val_list)
    assert [r[0] for r in rows] == [s.path for s in samples]
    assert [r[1] for r in rows] == [classes[s.label] for s in samples]
    correct = 0
    for row in rows:
        names, probabilities = row[2::2], [float(p) for p in row[3::2]]
        assert sorted(names) == sorted(classes)  # every class once: all 10 ranked
        assert probabilities == sorted(probabilities, reverse=True)
        assert math.isclose(sum(probabilities), 1.0, abs_tol=1e-4)
        correct += names[0] == row[1]
    (top1_line,) = [m for m in map(TOP1_LINE.match, out) if m]
    assert float(top1_line.group(1)) == round(100 * correct / len(rows), 2)
    assert int(top1_line.group(2)) == len(samples)
    assert any(line.endswith(f"wrote {out_csv}") for line in out)


def reference_probabilities(model_file: str, path: str) -> torch.Tensor:
    """model.pt read with torch and torchvision alone, its ``preprocessing`` applied as the
    README's snippet does, but resizing the PIL image (as the PIL loader does; the snippet
    resizes a tensor, whose antialiasing differs slightly)."""
    m = torch.load(model_file, map_location="cpu", weights_only=True)
    p = m["preprocessing"]
    net = torchvision.models.get_model(m["arch"], num_classes=len(m["class_names"])).eval()
    net.load_state_dict(m["model"])
    tf = T.Compose(
        [
            T.Resize(p["resize_size"]),  # on the PIL image
            T.CenterCrop(p["image_size"]),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(p["mean"], p["std"]),
        ]
    )
    with torch.no_grad():
        return torch.softmax(net(tf(PIL.Image.open(path).convert("RGB"))[None]), dim=1)[0]


def test_probabilities_follow_the_model_files_preprocessing(tiny_data, model_file):
    """The image size and normalization come from model.pt: PIL-backend probabilities equal
    those of its preprocessing applied by hand; DALI's resize differs by up to a grey level."""
    samples = read_list(tiny_data.val_list)[::7]
    items = [inference.Item(s.path, s.label) for s in samples]
    model = inference.load_model(model_file)
    assert model.image_size == IMAGE_SIZE
    reference = {s.path: reference_probabilities(model_file, s.path) for s in samples}
    for backend, tolerance in (("pil", 1e-5), ("dali", DALI_TOLERANCE)):
        predictions = []
        inference.Predictor(
            model, backend=backend, device=torch.device("cpu"), batch_size=4, top_k=10,
            threads=1,
        ).run(items, on_prediction=predictions.append, on_skip=pytest.fail)  # fmt: skip
        assert [p.path for p in predictions] == [s.path for s in samples]
        for p in predictions:
            ours = torch.zeros(10).index_put_(
                (torch.tensor(p.classes),), torch.tensor(p.probabilities)
            )
            difference = (ours - reference[p.path]).abs().max().item()
            assert difference < tolerance, backend


@pytest.mark.parametrize(("backend", "amp"), [("dali", "bf16"), ("pil", "off")])
def test_top1_equals_eval_only(tmp_path, tiny_data, model_file, single_process, backend, amp):
    """Same weights, list, loader, batch size and --amp: predict's top-1 is --eval-only's."""
    out = tmp_path / "eval"
    rc = trainer_main(
        [
            "--eval-only", "--pretrained", model_file, "--train-list", tiny_data.train_list,
            "--val-list", tiny_data.val_list, "--arch", "resnet18",
            "--image-size", str(IMAGE_SIZE), "--batch-size", "8", "--workers", "1",
            "--loader", backend, "--amp", amp, "--output-dir", str(out),
        ]
    )  # fmt: skip
    assert rc in (0, None)
    with open(out / "eval.json") as f:
        evaluated = json.load(f)
    samples = read_list(tiny_data.val_list)
    predictor = inference.Predictor(
        inference.load_model(model_file), backend=backend, device=torch.device("cpu"),
        batch_size=8, top_k=5, threads=1, amp=amp,
    )  # fmt: skip
    summary = predictor.run(
        [inference.Item(s.path, s.label) for s in samples],
        on_prediction=lambda p: None,
        on_skip=pytest.fail,
    )
    assert summary.labelled == evaluated["val_images"] == len(samples)
    assert summary.top1 == evaluated["val_top1"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_bad_files_are_named_and_skipped(capsys, tmp_path, tiny_data, model_file, backend):
    """Missing, empty, non-image, corrupt and truncated files: each named once on stderr and
    left out; every other image is predicted, exactly as it is without the bad ones."""
    good = [s.path for s in read_list(tiny_data.val_list)[:12]]
    folder = tmp_path / "images"
    folder.mkdir()
    copies = []
    for i, path in enumerate(good):
        copies.append(str(folder / f"{i:02d}_good{os.path.splitext(path)[1]}"))
        shutil.copyfile(path, copies[-1])
    with open(good[0], "rb") as f:
        jpeg = f.read()
    bad = {
        # Header checks find these before any loader runs...
        "03_empty.jpg": b"",
        "05_text.jpg": b"this is not an image\n" * 20,
        # ...decoding finds these, mid-pass (batches of 2): the loader restarts without them.
        "07_truncated.jpg": jpeg[: len(jpeg) // 2],
        "09_corrupt.jpg": jpeg[:200] + bytes(range(256)) * 12,
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    missing_arg = str(tmp_path / "nowhere.jpg")
    listed = tmp_path / "with_missing.txt"
    write_list(listed, [(copies[0], 0), (str(tmp_path / "gone.jpg"), 1), (copies[1], 0)])

    flags = ["--model", model_file, "--batch-size", "2", "--backend", backend, "--workers", "1"]
    rc, out, err = run_predict(capsys, *flags, str(folder), missing_arg, str(listed))
    assert rc == 1
    skipped = sorted(line.split(": ")[1] for line in err if line.startswith("skipped: "))
    expected = sorted([str(folder / n) for n in bad] + [missing_arg, str(tmp_path / "gone.jpg")])
    assert skipped == expected, err
    predicted = [parse_line(line) for line in prediction_lines(out)]
    assert [p for p, _ in predicted] == sorted(copies) + [copies[0], copies[1]]
    assert "skipped 6 images (named on stderr)" in out
    assert any(m and m.group(2) == "2" for m in map(TOP1_LINE.match, out))  # the list's two

    # The two decode failures were found by the loader, mid-pass, not by the header check.
    summary = inference.Predictor(
        inference.load_model(model_file), backend=backend, device=torch.device("cpu"),
        batch_size=2, top_k=1, threads=1,
    ).run(
        inference.collect_inputs(
            [str(folder)], class_names=read_classes(tiny_data.classes_file), on_skip=pytest.fail
        ),
        on_prediction=lambda p: None, on_skip=lambda path, reason: None,
    )  # fmt: skip
    assert (summary.loader_restarts, summary.skipped, summary.predicted) == (2, 4, len(copies))

    rc, clean_out, _ = run_predict(capsys, *flags, *sorted(copies))
    assert rc == 0
    clean = dict(parse_line(line) for line in prediction_lines(clean_out))
    for path, ranked in predicted:
        assert ranked == clean[path]  # the same outputs: no prediction moved to another file


def test_bad_input_is_one_error_line(capsys, tmp_path, tiny_data, model_file):
    def fails(*args: str, mentions: str) -> None:
        rc, _, err = run_predict(capsys, *args)
        errors = [line for line in err if line.startswith("error: ")]
        assert rc == 2 and len(errors) == 1 and mentions in errors[0], err

    image = read_list(tiny_data.val_list)[0].path
    fails("--model", str(tmp_path / "none.pt"), image, mentions="none.pt: model file not found")
    state_dict = tmp_path / "state_dict.pt"  # weights alone: no arch, classes, preprocessing
    torch.save(torch.load(model_file, weights_only=True)["model"], state_dict)
    fails("--model", str(state_dict), image, mentions="not a model.pt of this trainer")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails("--model", model_file, str(empty), mentions="no images to predict")
    bad_label = tmp_path / "labels.txt"
    bad_label.write_text(f"{image} 10\n")  # 10 classes: labels 0..9
    fails("--model", model_file, str(bad_label), mentions=f"{bad_label}:1")
    other_classes = tmp_path / "other"
    other_classes.mkdir()
    (other_classes / "classes.txt").write_text("".join(f"c{k}\n" for k in range(10)))
    (other_classes / "Test.txt").write_text(f"{image} 3\n")
    fails("--model", model_file, str(other_classes / "Test.txt"), mentions="not the model's")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"GIF89a not really")
    fails("--model", model_file, str(junk), mentions="none of the 1 images could be predicted")


def test_an_existing_csv_is_refused_before_any_work(capsys, tmp_path, tiny_data, model_file):
    out = tmp_path / "predictions.csv"
    out.write_text("earlier results\n")
    image = read_list(tiny_data.val_list)[0].path
    rc, stdout, err = run_predict(capsys, "--model", model_file, image, "--csv", str(out))
    assert rc == 2 and stdout == []  # nothing predicted
    assert err == [f"error: --csv {out} exists: choose another name or pass --overwrite"]
    assert out.read_text() == "earlier results\n"
    rc, _, err = run_predict(capsys, "--model", model_file, image, "--csv", str(tmp_path))
    assert rc == 2 and err == [f"error: --csv {tmp_path} is a folder: name a file"]
    args = ("--model", model_file, image, "--csv", str(out), "--overwrite", "--backend", "pil")
    rc, _, _ = run_predict(capsys, *args)
    assert rc == 0 and out.read_text().startswith("path,label,class_1,")


@pytest.mark.slow
def test_model_problems_are_one_plain_line(capsys, tmp_path, tiny_data, model_file):
    image = read_list(tiny_data.val_list)[0].path

    def error_of(model: str) -> str:
        rc, _, err = run_predict(capsys, "--model", model, image)
        assert rc == 2 and len(err) == 1, err
        return err[0]

    saved = torch.load(model_file, weights_only=True)
    other_arch = tmp_path / "other_arch.pt"
    torch.save({**saved, "arch": "resnet34"}, other_arch)  # resnet18's weights under resnet34
    assert error_of(str(other_arch)) == (
        f"error: {other_arch}: its weights do not fit resnet34: they look like resnet18's"
    )
    junk = tmp_path / "notes.pt"
    junk.write_text("not a torch save")
    message = error_of(str(junk))
    assert "not a model.pt of this trainer" in message and "weights_only" not in message
    no_size = tmp_path / "no_size.pt"
    torch.save({**saved, "preprocessing": {"mean": [0.5] * 3}}, no_size)
    assert "preprocessing has no image_size" in error_of(str(no_size))
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    assert f"{empty_run}: a folder without model.pt" in error_of(str(empty_run))
    # A run folder holding model.pt is taken as its model.pt.
    run = os.path.dirname(model_file)
    rc, out, _ = run_predict(capsys, "--model", run, image, "--backend", "pil")
    assert rc == 0 and len(prediction_lines(out)) == 1


def test_list_labels_without_classes_txt_are_scored_with_a_note(
    capsys, tmp_path, tiny_data, model_file
):
    samples = read_list(tiny_data.val_list)[:3]
    bare = tmp_path / "bare.txt"  # no classes.txt beside it
    write_list(str(bare), [(s.path, s.label) for s in samples], absolute=True)
    rc, out, _ = run_predict(capsys, "--model", model_file, str(bare), "--backend", "pil")
    assert rc == 0
    assert (
        f"note: {bare} has no classes.txt beside it: its labels were scored as the model's class indices"
        in "\n".join(out)
    )
    assert any(TOP1_LINE.match(line) for line in out)
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{samples[0].path} 12\n")
    rc, _, err = run_predict(capsys, "--model", model_file, str(bad))
    assert rc == 2 and err == [
        f"error: {bad}:1: label 12 is outside [0, 10): the model has 10 classes"
    ]
