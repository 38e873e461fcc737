"""tools/export_onnx.py: model.pt -> ONNX, checked with onnxruntime against PyTorch.

onnx, onnxruntime and onnxscript are in the ``test`` extra, so these run wherever the tests
do; the no-onnx branch runs with an onnx package that cannot be imported, first on the path.
onnxruntime is imported inside the test that uses it, not here: ``pytest -m gpu`` collects
this module too, on GPU machines that have no test extra (benchmarks/gpu_suite.sh).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib

import numpy as np
import pytest
import torch
import torchvision

from pipelines.common import open_rgb
from pipelines.lists import read_classes, read_list
from pipelines.pil import val_transform
from trainer.checkpoint import export_model, preprocessing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORT = os.path.join(REPO, "tools", "export_onnx.py")
IMAGE_SIZE = 32
DIFFERENCE_LINE = re.compile(
    r"^checked with onnxruntime on (\d+) images \(batches of (\d+) and 1\): "
    r"max abs logit difference (\S+) \(tolerance (\S+)\)$",
    re.M,
)


def _load_cli():
    spec = importlib.util.spec_from_file_location("export_onnx_cli", EXPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


export_main = _load_cli()


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    """A run folder as training leaves it for export: model.pt and config.toml naming the
    lists. The model is a fresh resnet18 (the export's fidelity does not depend on training)."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    net = torchvision.models.get_model("resnet18", num_classes=tiny_data.num_classes)
    export_model(
        str(folder / "model.pt"), model=net, arch="resnet18",
        class_names=read_classes(tiny_data.classes_file), image_size=IMAGE_SIZE,
    )  # fmt: skip
    (folder / "config.toml").write_text(
        f'train_list = "{tiny_data.train_list}"\nval_list = "{tiny_data.val_list}"\n'
    )
    return folder


def torch_logits(model_file: str, batch: torch.Tensor) -> np.ndarray:
    saved = torch.load(model_file, map_location="cpu", weights_only=True)
    net = torchvision.models.get_model(saved["arch"], num_classes=len(saved["class_names"]))
    net.load_state_dict(saved["model"])
    with torch.no_grad():
        return net.eval()(batch).numpy()


@pytest.mark.slow
def test_command_line_exports_a_checked_model_with_metadata(tmp_path, tiny_data, run_dir):
    out = tmp_path / "model.onnx"
    proc = subprocess.run(
        [sys.executable, EXPORT, str(run_dir / "model.pt"), str(out),
         "--check-images", tiny_data.val_list],
        capture_output=True, text=True, cwd="/",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    checked = DIFFERENCE_LINE.search(proc.stdout)
    assert checked, proc.stdout
    assert checked.group(1) == checked.group(2) == "8"
    assert float(checked.group(3)) < 1e-3 and float(checked.group(4)) == 1e-3

    # The file stands on its own: onnxruntime, its metadata and the val preprocessing.
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == read_classes(tiny_data.classes_file)
    assert json.loads(meta["preprocessing"]) == preprocessing(IMAGE_SIZE)
    assert meta["arch"] == "resnet18" and meta["weights"] == "raw"
    (image_input,) = session.get_inputs()
    assert image_input.name == "images"
    assert image_input.shape[1:] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert isinstance(image_input.shape[0], str)  # a named, dynamic batch axis
    # Images the export check did not use (it took the first 8), in a batch size it never saw.
    transform = val_transform(IMAGE_SIZE)
    paths = [s.path for s in read_list(tiny_data.val_list)[-5:]]
    batch = torch.stack([transform(open_rgb(p)) for p in paths])
    (logits,) = session.run(["logits"], {"images": batch.numpy()})
    expected = torch_logits(str(run_dir / "model.pt"), batch)
    assert logits.shape == (5, tiny_data.num_classes)
    assert np.abs(logits - expected).max() < 1e-3
    assert (logits.argmax(1) == expected.argmax(1)).all()


@pytest.mark.slow
def test_check_images_default_to_the_runs_val_list(capsys, tmp_path, run_dir):
    out = tmp_path / "default.onnx"
    assert export_main([str(run_dir / "model.pt"), str(out)]) == 0
    captured = capsys.readouterr()
    assert DIFFERENCE_LINE.search(captured.out).group(1) == "8", captured.out
    assert out.stat().st_size > 1_000_000  # resnet18's weights are inside the file

    # A run trained without validation: its val list holds only a comment (make_lists
    # --val-fraction 0 writes one). The check takes the train list's images; it stopped with
    # "error: .../Test.txt: the list holds no samples" instead.
    no_val = tmp_path / "no_val"
    no_val.mkdir()
    (no_val / "model.pt").write_bytes((run_dir / "model.pt").read_bytes())
    empty_val = tmp_path / "Test.txt"
    empty_val.write_text("# no validation images\n")
    train_list = tomllib.loads((run_dir / "config.toml").read_text())["train_list"]
    (no_val / "config.toml").write_text(f'train_list = "{train_list}"\nval_list = "{empty_val}"\n')
    assert export_main([str(no_val / "model.pt"), str(tmp_path / "no_val.onnx")]) == 0
    captured = capsys.readouterr()
    assert DIFFERENCE_LINE.search(captured.out).group(1) == "8", captured.err

    # A model.pt alone, without its run's config.toml: no images to check with, an error.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.pt").write_bytes((run_dir / "model.pt").read_bytes())
    assert export_main([str(alone / "model.pt"), str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: no images to check the export with")
    assert not (tmp_path / "x.onnx").exists()


def test_a_failed_check_writes_nothing(capsys, tmp_path, tiny_data, run_dir):
    """A tolerance no float computation meets: the check must fail, name the difference,
    and leave no file (an unchecked .onnx must never look like a good one)."""
    out = tmp_path / "strict.onnx"
    rc = export_main(
        [str(run_dir / "model.pt"), str(out), "--check-images", tiny_data.val_list,
         "--tolerance", "1e-12"]
    )  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert rc == 1
    assert len(err) == 1
    assert re.match(r"error: onnxruntime's logits differ from PyTorch's by up to \S+ on 8 ", err[0])
    assert err[0].endswith(f"{out} was not written")
    assert not out.exists()


def test_without_onnx_one_error_line(tmp_path, run_dir):
    # An onnx that cannot be imported, first on the path: what a machine without it sees.
    shim = tmp_path / "shim" / "onnx"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no onnx here')\n")
    env = {**os.environ, "PYTHONPATH": f"{shim.parent}{os.pathsep}{REPO}"}
    out = tmp_path / "model.onnx"
    proc = subprocess.run(
        [sys.executable, EXPORT, str(run_dir / "model.pt"), str(out)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: onnx is not installed: pip install -e '.[export]'"]
    assert not out.exists()


def test_an_existing_output_is_refused_before_any_work(capsys, tmp_path, run_dir):
    out = tmp_path / "earlier.onnx"
    out.write_bytes(b"an earlier export")
    assert export_main([str(run_dir / "model.pt"), str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {out} exists: choose another name or pass --overwrite"]
    assert out.read_bytes() == b"an earlier export"
    assert export_main([str(run_dir / "model.pt"), str(out), "--overwrite"]) == 0
    assert out.stat().st_size > 1_000_000


@pytest.mark.slow
def test_check_image_problems_are_said_plainly(capsys, tmp_path, tiny_data, run_dir):
    model = str(run_dir / "model.pt")
    # A missing model is named first, even with no check images to be found beside it.
    assert export_main([str(tmp_path / "none.pt"), str(tmp_path / "a.onnx")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'none.pt'}: model file not found\n"
    # One check image: still two batch sizes (it is repeated).
    image = read_list(tiny_data.val_list)[0].path
    assert export_main([model, str(tmp_path / "one.onnx"), "--check-images", image]) == 0
    assert "on 1 image (batches of 2 and 1)" in capsys.readouterr().out
    # Every check image bad: said so, in the order given.
    empty, junk = tmp_path / "empty.jpg", tmp_path / "junk.jpg"
    empty.write_bytes(b"")
    junk.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    gone = tmp_path / "gone.jpg"
    argv = [model, str(tmp_path / "bad.onnx"), "--check-images", str(junk), str(gone), str(empty)]
    assert export_main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[1] for line in err[:3]] == [str(junk), str(gone), str(empty)]
    assert (
        err[3]
        == "error: none of the 3 check images could be read (each named above): pass --check-images PATH... with readable images"
    )
    # A check list with another class map: labels are unused here, so it is no reason to refuse.
    other = tmp_path / "other"
    other.mkdir()
    (other / "classes.txt").write_text("".join(f"c{k}\n" for k in range(3)))
    (other / "Test.txt").write_text(f"{image} 2\n")
    assert (
        export_main(
            [model, str(tmp_path / "other.onnx"), "--check-images", str(other / "Test.txt")]
        )
        == 0
    )
