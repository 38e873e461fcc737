"""Pretrained weights by torchvision name, offline: a pre-filled TORCH_HOME, and downloads
from a real HTTP server on 127.0.0.1 (``PRETRAINED_MIRROR`` points the trainer at it);
fine-tuning options (--freeze-backbone-epochs, --head-lr-mult) on real torchrun runs.

This machine cannot reach download.pytorch.org, so the stand-in for torchvision's file is a
resnet18 of random weights (BatchNorm statistics drawn too, so that "unchanged" means
something) saved under the exact name torchvision gives it.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib

import pytest
import torch
import torchvision
from test_trainer_faults import base_flags, fails

from trainer import weights
from trainer.config import TrainerError, parse_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
MAIN = os.path.join(REPO, "trainer", "main.py")
R18_FILE = "resnet18-f37072fd.pth"  # torchvision's name for ResNet18_Weights.IMAGENET1K_V1


def stand_in_state(seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = torchvision.models.resnet18().state_dict()
    for key, tensor in state.items():
        if key.endswith("running_mean"):
            tensor.normal_(0.0, 0.1)
        elif key.endswith("running_var"):
            tensor.uniform_(0.5, 1.5)
    return state


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory) -> str:
    """A TORCH_HOME whose hub cache holds resnet18's IMAGENET1K_V1 file (a stand-in)."""
    home = tmp_path_factory.mktemp("torch_home")
    folder = home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(stand_in_state(), folder / R18_FILE)
    return str(home)


class Server:
    """A real HTTP server on 127.0.0.1 serving ``files`` (path -> bytes); counts requests.
    ``cut``: paths whose body stops half-way (the connection closes early). ``delay``:
    seconds between chunks, so a download lasts a while."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.delay = 0.0
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                sent = body[: len(body) // 2] if self.path in server.cut else body
                step = max(1, len(sent) // 8)
                for start in range(0, len(sent), step):
                    self.wfile.write(sent[start : start + step])
                    self.wfile.flush()
                    time.sleep(server.delay)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: any request is refused at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def named_file(folder, payload: bytes, stem: str = "net") -> tuple[str, str]:
    """(file name with the payload's own hash prefix, as torch.hub names files; its bytes)."""
    return f"{stem}-{hashlib.sha256(payload).hexdigest()[:8]}.pth", payload


def fake_weights(server_url: str, name: str, folder) -> weights.NamedWeights:
    """NamedWeights for a file of the test's own (its name carries its true hash)."""
    return weights.NamedWeights(
        "resnet18", f"Test_Weights.{name}", f"{server_url}/models/{name}", str(folder / name), None
    )


# --- names --------------------------------------------------------------------------------


def test_names_resolve_to_torchvisions_weights_and_its_cache_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(weights.MIRROR_ENV, raising=False)
    enum = torchvision.models.ResNet50_Weights
    for given in ("IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2", "imagenet1k_v2", "DEFAULT"):
        found = weights.resolve(given, "resnet50")
        assert found.name == "ResNet50_Weights.IMAGENET1K_V2" and found.enum is enum.IMAGENET1K_V2
        # The very file torchvision's own weights= would download and read.
        assert found.file == str(tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth")
        assert found.url == enum.IMAGENET1K_V2.url and found.hash_prefix == "11ad3fa6"
    facts = weights.resolve("IMAGENET1K_V2", "resnet50").facts()
    assert (facts["eval_resize_size"], facts["eval_crop_size"]) == (232, 224)
    assert facts["imagenet_1k_acc1"] == 80.858 and facts["categories"] == 1000
    assert weights.resolve("IMAGENET1K_V1", "resnet50").facts()["eval_resize_size"] == 256
    # A mirror keeps the path; the facts keep torchvision's own URL.
    monkeypatch.setenv(weights.MIRROR_ENV, "http://mirror.example/pytorch/")
    mirrored = weights.resolve("DEFAULT", "resnet18")
    assert mirrored.url == "http://mirror.example/pytorch/models/resnet18-f37072fd.pth"
    assert mirrored.facts()["url"] == "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    # Files are files: an existing path, and anything that cannot be a name.
    existing = tmp_path / "IMAGENET1K_V1"
    existing.write_bytes(b"")
    assert weights.resolve(str(existing), "resnet18") is None
    assert weights.resolve("weights/resnet18.pth", "resnet18") is None


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ("IMAGENET1K_V2", "no such weights for resnet18 (and no such file); its weights are "
         "IMAGENET1K_V1 (DEFAULT)"),
        ("ResNet50_Weights.IMAGENET1K_V2", "weights of resnet50, but --arch is resnet18, whose "
         "weights are IMAGENET1K_V1 (DEFAULT)"),
        ("ResNet51_Weights.IMAGENET1K_V1", "torchvision has no ResNet51_Weights"),
    ],
)  # fmt: skip
def test_a_name_the_arch_lacks_is_one_line_listing_its_names(
    capsys, tmp_path, tiny_data, given, words
):
    fails(capsys, [*base_flags(tiny_data, tmp_path / "out"), "--pretrained", given], given, words)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_pretrained_alone_means_default_and_facts_do_not_read_back_as_settings(tmp_path):
    assert parse_config(["--train-list", "t.txt", "--pretrained"]).pretrained == "DEFAULT"
    assert parse_config(["--pretrained", "--epochs", "3"]).pretrained == "DEFAULT"
    saved = tmp_path / "config.toml"
    saved.write_text(
        'arch = "resnet50"\npretrained = "ResNet50_Weights.IMAGENET1K_V2"\n\n'
        '[pretrained_weights]\nname = "ResNet50_Weights.IMAGENET1K_V2"\neval_resize_size = 232\n'
    )
    cfg = parse_config(["--config", str(saved), "--train-list", "t.txt"])
    assert cfg.pretrained == "ResNet50_Weights.IMAGENET1K_V2"
    with pytest.raises(TrainerError, match="--freeze-backbone-epochs trains the head alone"):
        parse_config(["--train-list", "t.txt", "--freeze-backbone-epochs", "1"])
    with pytest.raises(TrainerError, match="--head-lr-mult must be > 0"):
        parse_config(["--train-list", "t.txt", "--head-lr-mult", "0"])


# --- downloads ------------------------------------------------------------------------------


def test_a_download_is_hash_checked_and_lands_whole_or_not_at_all(server, tmp_path):
    folder = tmp_path / "hub" / "checkpoints"
    good_name, good = named_file(folder, os.urandom(300_000))
    server.files[f"/models/{good_name}"] = good
    progress = io.StringIO()  # not a terminal: a line per 10%
    target = fake_weights(server.url, good_name, folder)
    assert weights.fetch_one(target, stream=progress) == target.file
    with open(target.file, "rb") as f:
        assert f.read() == good
    lines = progress.getvalue().splitlines()
    assert lines[0] == f"downloading Test_Weights.{good_name} from {target.url} to {target.file}"
    shares = [int(re.search(r": +(\d+)% ", line).group(1)) for line in lines[1:]]
    assert shares == sorted(shares) and shares[-1] == 100 and len(shares) <= 10
    # Cached: used as it is, no request.
    count = len(server.requests)
    assert weights.fetch_one(target, stream=io.StringIO()) == target.file
    assert len(server.requests) == count

    # Bytes other than the name promises: refused, and nothing left of them.
    bad_name = f"net-{hashlib.sha256(b'other').hexdigest()[:8]}.pth"
    server.files[f"/models/{bad_name}"] = os.urandom(1000)
    with pytest.raises(weights.DownloadError) as refused:
        weights.fetch_one(fake_weights(server.url, bad_name, folder), stream=io.StringIO())
    assert "its SHA-256 is" in str(refused.value) and "not kept" in str(refused.value)
    # A connection cut half-way: no file under the final name, no temporary one either.
    cut_name, cut = named_file(folder, os.urandom(200_000), stem="cut")
    server.files[f"/models/{cut_name}"] = cut
    server.cut.add(f"/models/{cut_name}")
    with pytest.raises(weights.DownloadError, match="the connection ended after"):
        weights.fetch_one(fake_weights(server.url, cut_name, folder), stream=io.StringIO())
    assert sorted(os.listdir(folder)) == [good_name]


def test_offline_or_unreachable_is_one_line_naming_the_url_and_where_to_put_a_copy(
    monkeypatch, capsys, tmp_path, tiny_data, server
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    cached = tmp_path / "home" / "hub" / "checkpoints" / R18_FILE
    flags = [*base_flags(tiny_data, tmp_path / "out"), "--pretrained", "IMAGENET1K_V1"]
    unreachable = closed_port_url()
    monkeypatch.setenv(weights.MIRROR_ENV, unreachable)
    fails(
        capsys, flags,
        f"ResNet18_Weights.IMAGENET1K_V1: could not download {unreachable}/models/{R18_FILE} "
        f"(Connection refused); on a machine without network, put a copy of {R18_FILE} at "
        f"{cached}",
    )  # fmt: skip
    # The trainer's own download, from a server serving other bytes: refused, nothing kept.
    server.files[f"/models/{R18_FILE}"] = b"not resnet18"
    monkeypatch.setenv(weights.MIRROR_ENV, server.url)
    fails(capsys, flags, f"{server.url}/models/{R18_FILE}: its SHA-256 is", str(cached))
    assert server.requests == [f"/models/{R18_FILE}"]
    assert os.listdir(cached.parent) == []
    assert not (tmp_path / "out" / "last.pt").exists()
    # A cache that cannot be written is said as that, before any request.
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "a_file"))
    fails(capsys, flags, f"cannot write {tmp_path / 'a_file' / 'hub'} (Not a directory)")
    assert len(server.requests) == 1


DRIVER = """
import os, sys, torch
sys.path.insert(0, {repo!r})
from trainer import dist, weights
info = dist.setup_distributed()
target = weights.NamedWeights("resnet18", "Test_Weights.X", {url!r}, {file!r}, None)
path = weights.fetch_for_node(target, info)
print(f"rank {{info.rank}} loaded {{len(torch.load(path, weights_only=True))}} tensors", flush=True)
dist.cleanup_distributed()
"""


@pytest.mark.slow
def test_one_download_per_node_while_the_other_ranks_wait(server, tmp_path):
    payload = io.BytesIO()
    torch.save({f"w{k}": torch.full((1000,), float(k)) for k in range(20)}, payload)
    name, body = named_file(tmp_path, payload.getvalue())
    server.files[f"/models/{name}"] = body
    server.delay = 0.2  # about 2 s: the waiting rank checks in a few times meanwhile
    script = tmp_path / "driver.py"
    file = tmp_path / "cache" / name
    script.write_text(DRIVER.format(repo=REPO, url=f"{server.url}/models/{name}", file=str(file)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(
        [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node=2", str(script)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert server.requests == [f"/models/{name}"]  # one download for the node's two ranks
    assert sorted(re.findall(r"rank \d loaded 20 tensors", proc.stdout)) == [
        "rank 0 loaded 20 tensors",
        "rank 1 loaded 20 tensors",
    ]
    assert proc.stderr.count("downloading Test_Weights.") == 1
    assert os.listdir(file.parent) == [name]


# --- training from a cached file, fine-tuning options ------------------------------------


def run_env(torch_home: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "TORCH_HOME": torch_home}
    env[weights.MIRROR_ENV] = closed_port_url()  # any network use would fail the run
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
        env.pop(key, None)
    return env


def fine_tune_flags(tiny_data, out, *extra: str) -> list[str]:
    return [
        "--train-list", tiny_data.train_list, "--arch", "resnet18", "--image-size", "32",
        "--batch-size", "8", "--epochs", "2", "--workers", "1", "--log-interval", "1",
        "--optimizer", "adamw", "--lr", "0.001", "--warmup-epochs", "0.5",
        "--pretrained", "IMAGENET1K_V1", "--freeze-backbone-epochs", "1", "--head-lr-mult", "10",
        "--no-plots", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def split(state: dict) -> tuple[dict, dict]:
    """(backbone tensors, head tensors) of a resnet18 state dict."""
    head = {k: v for k, v in state.items() if k.startswith("fc.")}
    return {k: v for k, v in state.items() if k not in head}, head


@pytest.fixture(scope="module")
def fine_tuned(torch_home, tiny_data, tmp_path_factory):
    """2 ranks, 2 epochs: the first trains the head alone, the second everything."""
    out = tmp_path_factory.mktemp("fine_tuned") / "run"
    proc = subprocess.run(
        [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node=2", MAIN,
         *fine_tune_flags(tiny_data, out)],
        env=run_env(torch_home), capture_output=True, text=True, timeout=300, cwd=out.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_two_ranks_fine_tune_from_the_cached_file_with_no_network(fine_tuned, torch_home):
    out, proc = fine_tuned
    cached = os.path.join(torch_home, "hub", "checkpoints", R18_FILE)
    assert "downloading" not in proc.stderr
    assert (
        f"pretrained ResNet18_Weights.IMAGENET1K_V1 ({cached}): loaded 120 tensors, kept the new "
        "head (skipped fc.weight, fc.bias: other class count)" in proc.stdout
    )
    # The weights' facts, in config.toml (which still reads back) and model.pt.
    with open(out / "config.toml", "rb") as f:
        saved = tomllib.load(f)
    assert saved["pretrained"] == "ResNet18_Weights.IMAGENET1K_V1"
    facts = saved["pretrained_weights"]
    assert facts["url"] == "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert (facts["file"], facts["eval_resize_size"], facts["eval_crop_size"]) == (cached, 256, 224)
    assert load(out / "model.pt")["pretrained"] == facts
    parse_config(["--config", str(out / "config.toml")])
    # --head-lr-mult 10: the head's lr is 10x the rest's at every logged step.
    logged = re.findall(r" lr ([\d.e-]+) head lr ([\d.e-]+) ", proc.stdout)
    assert len(logged) == 14  # 7 steps an epoch, each logged
    assert all(float(head) == pytest.approx(10 * float(lr), rel=1e-3) for lr, head in logged)
    assert len({lr for lr, _ in logged}) > 5  # warmup and cosine moved both
    # Epoch 1 trained the head alone, epoch 2 everything: the backbone moved only then.
    assert "epoch 1: the backbone is frozen (its BatchNorm statistics too)" in proc.stdout
    assert "epoch 2: the whole model trains from here" in proc.stdout
    pretrained_backbone, pretrained_head = split(stand_in_state())
    backbone, _ = split(load(out / "last.pt")["model"])
    moved = [k for k in pretrained_backbone if not torch.equal(backbone[k], pretrained_backbone[k])]
    assert any(k.endswith("running_mean") for k in moved) and "conv1.weight" in moved


@pytest.mark.slow
def test_sigterm_while_frozen_resumes_bit_for_bit(fine_tuned, torch_home, tiny_data, tmp_path):
    reference, _ = fine_tuned
    out = tmp_path / "preempted"
    env = run_env(torch_home)
    cmd = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node=2", MAIN]
    proc = subprocess.Popen(
        [*cmd, *fine_tune_flags(tiny_data, out)], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in proc.stdout:
        if "epoch 1/2 step 2/7" in line:
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    saved = load(out / "last.pt")
    assert saved["epoch"] == 0 and 2 < saved["position"]["step"] < 7  # inside the frozen epoch
    # Frozen so far: the backbone, BatchNorm statistics included, is the pretrained one.
    backbone, _ = split(saved["model"])
    pretrained_backbone, _ = split(stand_in_state())
    assert all(torch.equal(backbone[k], v) for k, v in pretrained_backbone.items())
    resumed = subprocess.run(
        [*cmd, *fine_tune_flags(tiny_data, out, "--resume", "auto")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "--pretrained is not loaded" in resumed.stdout
    got, want = load(out / "last.pt"), load(reference / "last.pt")
    different = [k for k in want["model"] if not torch.equal(got["model"][k], want["model"][k])]
    assert different == []


def test_frozen_epochs_leave_the_backbone_as_loaded(
    monkeypatch, capsys, torch_home, tiny_data, tmp_path
):
    from trainer.main import main

    monkeypatch.setenv("TORCH_HOME", torch_home)
    monkeypatch.setenv(weights.MIRROR_ENV, closed_port_url())
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "probe"
    # Every epoch frozen: a linear probe. The head learns, nothing else moves.
    flags = fine_tune_flags(tiny_data, out, "--epochs", "1", "--log-interval", "7")
    assert main(flags) == 0, capsys.readouterr().err
    backbone, head = split(load(out / "last.pt")["model"])
    pretrained_backbone, _ = split(stand_in_state())
    assert all(torch.equal(backbone[k], v) for k, v in pretrained_backbone.items())
    start = torchvision.models.resnet18(num_classes=10)
    assert not torch.equal(head["fc.weight"], start.fc.weight)


@pytest.mark.slow
def test_eval_only_of_named_weights_and_predict_and_export_by_name(
    monkeypatch, capsys, torch_home, tiny_data, tmp_path
):
    """torchvision's weights by name wherever weights are loaded: --eval-only (a stand-in
    with a head for the 10 demo classes under torchvision's file name), predict.py, and
    export_onnx.py."""
    import json

    from trainer.main import main

    home = tmp_path / "home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    state = stand_in_state()
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][:10], state["fc.bias"][:10]
    torch.save(state, home / "hub" / "checkpoints" / R18_FILE)
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv(weights.MIRROR_ENV, closed_port_url())
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "eval"
    flags = [
        "--eval-only", "--pretrained", "ResNet18_Weights.IMAGENET1K_V1", "--arch", "resnet18",
        "--train-list", tiny_data.train_list, "--image-size", "32", "--workers", "1",
        "--output-dir", str(out),
    ]  # fmt: skip
    assert main(flags) == 0, capsys.readouterr().err
    record = json.loads((out / "eval.json").read_text())
    assert record["weights"] == "ResNet18_Weights.IMAGENET1K_V1" and record["val_images"] == 40
    with open(out / "config.toml", "rb") as f:
        assert tomllib.load(f)["pretrained_weights"]["eval_crop_size"] == 224

    # predict.py and export_onnx.py take the 1000-class file (the pre-filled one) by name.
    from test_export import export_main
    from test_predict import predict_main

    monkeypatch.setenv("TORCH_HOME", torch_home)
    capsys.readouterr()  # the evaluation's lines
    images = os.path.join(os.path.dirname(tiny_data.train_list), "val")
    predict = [images, "--workers", "0", "--top-k", "1"]
    assert predict_main([*predict, "--model", "IMAGENET1K_V1", "--arch", "resnet18"]) == 0
    printed = capsys.readouterr().out.splitlines()
    categories = set(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    predicted = [line.split("\t")[1].rsplit(" ", 1)[0] for line in printed[:40]]
    assert len(predicted) == 40 and set(predicted) <= categories
    assert predict_main([*predict, "--model", "IMAGENET1K_V1"]) == 2
    error = capsys.readouterr().err.strip()
    assert (
        error.count("\n") == 0 and "needs --arch (e.g. --arch resnet50) or its qualified" in error
    )
    onnx_file = tmp_path / "r18.onnx"
    named = "ResNet18_Weights.IMAGENET1K_V1"
    assert export_main([named, str(onnx_file), "--check-images", images]) == 0
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert props["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert json.loads(props["pretrained"])["eval_crop_size"] == 224
    assert len(json.loads(props["class_names"])) == 1000


def test_the_docs_table_of_sizes_is_torchvisions():
    """docs/fine-tuning.md's table of weights, eval sizes and top-1 is what the installed
    torchvision says (a new release that changes them fails here, not silently)."""
    with open(os.path.join(REPO, "docs", "fine-tuning.md"), encoding="utf-8") as f:
        rows = re.findall(
            r"^\| (\w+) \| `(\w+)`( \(DEFAULT\))? \| (\d+) / (\d+) \| ([\d.]+) \| (\d+) MB \|$",
            f.read(),
            re.MULTILINE,
        )
    assert len(rows) == 12
    for arch, name, default, resize, crop, top1, size in rows:
        enum = torchvision.models.get_model_weights(arch)
        found = weights.resolve(name, arch).facts()
        assert (found["eval_resize_size"], found["eval_crop_size"]) == (int(resize), int(crop))
        assert found["imagenet_1k_acc1"] == float(top1)
        assert (enum[name] is enum.DEFAULT) == bool(default)
        assert round(enum[name].meta["_file_size"]) == int(size)
