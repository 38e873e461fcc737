"""The benchmark's method in-process: queue-sized warm-up, windows inside one epoch, the
first-window flag, epoch-boundary timing; real loaders (DALI in CPU mode, PIL) and real torch."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from benchmarks import report, throughput
from benchmarks.cli import BenchmarkInputError
from benchmarks.throughput import Variant, Windows
from pipelines import build_loader
from pipelines.lists import format_line, read_list
from pipelines.tuning import LoaderPlan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loader(tiny_data, backend, *, batch_size=8):
    return build_loader(
        tiny_data.train_list,
        train=True,
        backend=backend,
        batch_size=batch_size,
        image_size=32,
        num_threads=1,
        seed=0,
        dtype=torch.float32,
    )


def test_backend_items_carry_their_own_settings():
    pil, dali, tuned = throughput.parse_variants("pil,dali,dali:hw=0.99:threads=8:prefetch=3")
    assert pil == Variant("pil", "pil")
    assert dali == Variant("dali", "dali")
    assert tuned == Variant("dali:hw=0.99:threads=8:prefetch=3", "dali", 8, 3, None, 0.99)


@pytest.mark.parametrize(
    "text, why",
    [
        ("ffcv", "unknown loader"),
        ("dali:hw", "not key=value"),
        ("dali:speed=3", "not key=value"),
        ("pil:decode=cpu", "dali only"),
        ("dali:decode=gpu", "decode is auto, mixed or cpu"),
        ("dali:hw=x", "not a number"),
        ("dali:hw=7", "hw is a share in [0, 1]"),
        ("dali:threads=0", "threads is at least 1"),
        ("pil:threads=-2", "threads is at least 1"),
        ("dali:prefetch=0", "prefetch is at least 1"),
        ("dali,pil,dali", "names dali more than once"),
        ("dali:threads=2:threads=3", "threads is set twice"),
    ],
)
def test_bad_backend_items_are_refused_by_name(text, why):
    with pytest.raises(BenchmarkInputError, match="--backends") as refused:
        throughput.parse_variants(text)
    assert why in str(refused.value)


def test_queue_depth_counts_every_batch_a_loader_holds_ahead():
    # 16 workers x prefetch 2: the 32 batches that outlasted a 10-step warm-up on the H100.
    assert throughput.queue_depth(LoaderPlan("pil", None, 16, None, 2)) == 32
    assert throughput.queue_depth(LoaderPlan("pil-gpu", None, 16, None, 2)) == 33
    assert throughput.queue_depth(LoaderPlan("pil", None, 0, None, 2)) == 0
    assert throughput.queue_depth(LoaderPlan("dali", "mixed", 16, 0.99, 3)) == 3


def test_first_window_above_median_is_flagged():
    drifting = throughput.summarize(
        "pil", "train", [Windows([3226.0, 2587.0, 2294.0], 0.2, None)], {}
    )
    assert drifting["first_window_drift"] is True
    assert drifting["first_window_above_median_percent"] == pytest.approx(100 * (3226 / 2587 - 1))
    steady = throughput.summarize(
        "dali", "train", [Windows([3900.0, 3850.0, 3880.0], 0.1, None)], {}
    )
    assert steady["first_window_drift"] is False
    assert steady["images_per_sec_per_gpu"] == 3880.0


def test_windows_never_cross_an_epoch_end(tiny_data):
    """one_epoch refuses to run past the end of epoch 0 instead of timing a boundary."""
    loader = _loader(tiny_data, "pil", batch_size=16)  # 120 images: 7 steps per epoch
    assert len(loader) == 7
    assert len(list(throughput.one_epoch(loader, 7))) == 7
    with pytest.raises(RuntimeError, match="epoch ended after 7 of the 8 steps"):
        list(throughput.one_epoch(loader, 8))


def test_timed_windows_on_cpu_time_each_window_and_report_no_gpu_idle(tiny_data):
    loader = _loader(tiny_data, "dali")
    consumed = []
    batches = (consumed.append(b) or b for b in throughput.one_epoch(loader, 2 + 3 * 2))
    windows = throughput.timed_windows(
        batches,
        train_step=lambda images, labels: None,
        device=torch.device("cpu"),
        batch_size=8,
        warmup=2,
        iters=3,
        repeats=2,
    )
    assert len(consumed) == 8  # warm-up + windows, nothing more
    assert len(windows.rates) == 2 and all(r > 0 for r in windows.rates)
    assert 0.0 <= windows.host_data_wait_fraction <= 1.0
    assert windows.gpu_idle_fraction is None


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_epoch_boundaries_time_natural_epoch_ends(tiny_data, backend):
    loader = _loader(tiny_data, backend, batch_size=40)  # 3 steps per epoch
    costs = throughput.epoch_boundaries(
        loader, train_step=None, device=torch.device("cpu"), boundaries=2, steady_step_seconds=0.0
    )
    assert len(costs) == 2
    assert all(c > 0 for c in costs)  # with no steady step subtracted: the first batch's wait


# --- bad input: one error line, exit status 2, before anything is measured -------------------

TINY_SWEEP = ["--arch", "resnet18", "--batch-size", "4", "--image-size", "32"]
TINY_SWEEP += ["--warmup", "1", "--iters", "2", "--repeats", "2"]
TINY = TINY_SWEEP + ["--workers", "1", "--boundaries", "0"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--backends", "dali:decode=mixed"], "dali:decode=mixed: mixed decode runs on the GPU"),
        (["--dali-decode", "mixed", "--backends", "dali"], "mixed decode runs on the GPU"),
        (["--backends", "dali:threads=0"], "threads is at least 1"),
        (["--workers", "0"], "argument --workers: 0 is below the minimum, 1"),
        (["--batch-size", "0"], "argument --batch-size: 0 is below the minimum, 1"),
        (["--iters", "0"], "argument --iters: 0 is below"),
        (["--repeats", "0"], "argument --repeats: 0 is below"),
        (["--warmup", "-5"], "argument --warmup: -5 is below the minimum, 0"),
        (["--image-size", "0"], "argument --image-size: 0 is below"),
        (["--boundary-steps", "0"], "argument --boundary-steps: 0 is below"),
        (["--prefetch", "0"], "argument --prefetch: 0 is below"),
        (["--hw-decoder-load", "7"], "argument --hw-decoder-load: 7.0 is outside [0, 1]"),
        (["--modes", "train,train"], "--modes takes a comma-separated subset"),
        (["--sweep", "--plot", "x.png"], "--plot does not apply to --sweep"),
        (["--sweep", "--backends", "pil"], "--backends does not apply to --sweep"),
        (["--toml", "best.toml"], "--toml applies to --sweep only"),
        (["--sweep-threads", "2"], "--sweep-threads applies to --sweep only"),
        (["--sweep-prefetch", "2"], "--sweep-prefetch applies to --sweep only"),
        (["--sweep", "--sweep-threads", "0"], "--sweep-threads: every value must be at least 1"),
        (["--sweep", "--sweep-hw-decoder-load", "2"], "must be within [0.0, 1.0]"),
        # One loader's settings: the sweep would measure its own values instead.
        (["--sweep", "--workers", "1"], "--workers does not apply to --sweep (each"),
        (["--sweep", "--prefetch", "3"], "use --sweep-prefetch to choose the values swept"),
        (["--sweep", "--dali-decode", "cpu"], "use --sweep-decode to choose"),
        (["--sweep", "--hw-decoder-load", "0.5"], "use --sweep-hw-decoder-load to choose"),
        (["--sweep", "--boundaries", "2"], "--boundaries does not apply to --sweep"),
        # DALI's settings without a DALI row would be dropped without a word.
        (["--backends", "pil", "--dali-decode", "cpu"], "--dali-decode sets the DALI loader"),
        (["--backends", "pil-gpu", "--hw-decoder-load", "0.5"], "has no dali item"),
        (["--arch", "resnet9000"], "--arch resnet9000: not a torchvision model"),
        (["--plot", "chart.doc"], "matplotlib cannot write .doc"),
    ],
)
def test_bad_values_are_one_line_before_measuring(tiny_data, tmp_path, capsys, flags, message):
    tiny = TINY_SWEEP if "--sweep" in flags else TINY
    status = _main(["--list", tiny_data.train_list, *tiny, *flags], tmp_path)
    out, err = capsys.readouterr()
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err, err
    assert "benchmark:" not in out  # refused before anything was set up or measured
    assert not list(tmp_path.iterdir())  # nothing written


def _main(argv, tmp_path) -> int:
    cwd = os.getcwd()
    os.chdir(tmp_path)  # relative outputs (x.png, best.toml) would land here
    try:
        return throughput.main(argv)
    except SystemExit as e:  # argparse's refusal
        return e.code
    finally:
        os.chdir(cwd)


def test_outputs_that_exist_are_refused_before_measuring(tiny_data, tmp_path, capsys):
    for flag in ("--json", "--plot", "--toml"):
        earlier = tmp_path / f"earlier{flag[2:]}.png"
        earlier.write_text("an earlier result")
        tiny, extra = (TINY_SWEEP, ["--sweep"]) if flag == "--toml" else (TINY, [])
        argv = ["--list", tiny_data.train_list, *tiny, *extra, flag, str(earlier)]
        assert throughput.main(argv) == 2
        err = capsys.readouterr().err
        assert err == f"error: {flag} {earlier} exists: choose another name or pass --overwrite\n"
        assert earlier.read_text() == "an earlier result"


def test_a_bad_list_is_named_at_its_own_line_not_the_repeated_one(tiny_data, tmp_path, capsys):
    samples = read_list(tiny_data.train_list)
    listed = tmp_path / "mine.txt"
    lines = [format_line(s.path, s.label) for s in samples[:7]]
    lines.insert(5, format_line(str(tmp_path / "gone.jpg"), 0))
    listed.write_text("".join(lines))
    argv = ["--list", str(listed), *TINY, "--backends", "dali", "--modes", "loader"]
    assert throughput.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'gone.jpg'}: image file listed at {listed}:6 ")
    listed.write_text(lines[0] + "not a line\n")
    assert throughput.main(argv) == 2
    assert f"{listed}:2" in capsys.readouterr().err


def test_a_run_cut_after_any_row_keeps_the_ceiling_and_the_gaps(
    tiny_data, tmp_path, monkeypatch, capsys
):
    """gpu_suite's stages run under `timeout`: the JSON as written after each row is what a
    cut run leaves. The synthetic ceiling is measured first, so every train row written
    carries its gap to the ceiling; the tables still show the ceiling last."""
    written = []
    monkeypatch.setattr(
        report, "write_json", lambda path, payload: written.append(json.loads(json.dumps(payload)))
    )
    argv = ["--list", tiny_data.train_list, *TINY, "--backends", "dali", "--json", "x.json"]
    assert _main(argv, tmp_path) == 0
    first = written[0]["results"]
    assert [(r["variant"], r["mode"]) for r in first] == [("synthetic", "synthetic")]
    for payload in written:
        for row in payload["results"]:
            if row["mode"] == "train":
                assert row["gap_to_ceiling_percent"] is not None
    assert any(r["mode"] == "train" for r in written[-1]["results"])
    table = capsys.readouterr().out.split("| loader | mode |")[1].split("\n\n")[0]
    assert table.strip().splitlines()[-1].startswith("| synthetic | synthetic |")


def test_items_that_resolve_to_the_same_loader_are_measured_once(tiny_data, tmp_path, capsys):
    # gpu_suite's table names "dali" (the trainer's choice) beside explicit DALI rows; on a
    # 16-core GPU machine the choice is one of them (cpu decode, 16 threads): device time
    # spent twice on one loader. Here, without a GPU: dali = dali:decode=cpu.
    argv = ["--list", tiny_data.train_list, *TINY, "--backends", "pil,dali,dali:decode=cpu"]
    assert _main([*argv, "--modes", "loader", "--json", "x.json"], tmp_path) == 0
    out = capsys.readouterr().out
    assert "  dali:decode=cpu: the same settings as dali: measured once, as that\n" in out
    payload = json.loads((tmp_path / "x.json").read_text())
    assert [r["variant"] for r in payload["results"]] == ["pil", "dali"]
    assert payload["settings"]["same_settings"] == {"dali:decode=cpu": "dali"}
    assert "; dali:decode=cpu: the same settings as dali, measured once" in report.header_line(
        payload
    )


@pytest.mark.slow
def test_sigterm_still_removes_the_temporary_lists(tiny_data, tmp_path):
    """gpu_suite's `timeout` sends SIGTERM: the repeated lists must not stay in /tmp."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
    script = os.path.join(
        os.path.dirname(os.path.dirname(throughput.__file__)), "benchmarks", "throughput.py"
    )
    argv = ["--list", tiny_data.train_list, *TINY, "--iters", "50", "--backends", "pil"]
    proc = subprocess.Popen(
        [sys.executable, script, *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:  # the repeated list exists once the plan is printed
            if line.startswith("benchmark:"):
                break
        assert [p.name for p in scratch.iterdir() if p.name.startswith("throughput-lists-")]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert [p.name for p in scratch.iterdir() if p.name.startswith("throughput-lists-")] == []


def _row(variant, mode, windows, gap=None):
    return {
        "variant": variant,
        "mode": mode,
        "window_images_per_sec_per_gpu": windows,
        "images_per_sec_per_gpu": sorted(windows)[len(windows) // 2],
        "gap_to_ceiling_percent": gap,
    }


def test_implausible_figures_get_a_busy_machine_note():
    steady = [
        _row("dali", "train", [100.0, 104.0, 98.0], gap=20.0),
        _row("synthetic", "synthetic", [125.0, 126.0]),
    ]
    assert report.notes(steady) == []
    noisy = [
        _row("pil", "loader", [35.0, 261.0, 200.0]),
        _row("dali", "train", [900.0, 905.0], gap=-757.0),
        _row("synthetic", "synthetic", [105.0, 106.0]),
    ]
    notes = report.notes(noisy)
    assert any("pil loader: its windows differ 7.46x (35 to 261 img/s)" in n for n in notes)
    just_over = report.notes([_row("pil", "loader", [100.0, 151.8])])
    assert "differ 1.52x" in just_over[0] and "more than the 1.5x" in just_over[0]
    assert any("dali train: " in n and "757% above the synthetic ceiling" in n for n in notes)
    assert notes[-1] == report.BUSY_MACHINE_NOTE
    table = report.markdown_table(
        [
            {
                **r,
                "images_per_sec_per_gpu_min": 1,
                "images_per_sec_per_gpu_max": 1,
                "images_per_sec_total": 1,
                "host_data_wait_fraction": 0.0,
                "gpu_idle_fraction": None,
            }
            for r in noisy
        ]
    )
    assert table.splitlines()[-1].endswith("| n/a | - |")  # synthetic: no host data wait


def test_suite_summary_says_how_each_stage_ended(tmp_path):
    # gpu_suite.sh's stages.tsv: a figure missing from the summary is explained there.
    from benchmarks.report import suite_summary

    (tmp_path / "stages.tsv").write_text(
        "mixed-decode rows\tskipped\t0\tno CUDA on this machine\n"
        "table\t0\t41\nsweep\t124\t55\ncompile\t1\t3\n"
    )
    summary = suite_summary(str(tmp_path))
    assert "table: no results" in summary and "sweep: no results" in summary
    assert "- mixed-decode rows: skipped: no CUDA on this machine, 0 s" in summary
    assert "- table: done, 41 s" in summary
    assert "- sweep: cut by its time limit (figures above are partial), 55 s" in summary
    assert "- compile: failed, exit 1 (see compile.log), 3 s" in summary


@pytest.mark.slow
def test_gpu_suite_collects_the_gpu_tests_without_the_test_extra(tmp_path):
    # gpu_suite.sh runs `pytest -m gpu tests` on the GPU machine, whose image has torch,
    # numpy and pillow but not the test extra (onnx, onnxruntime, onnxscript, matplotlib): a
    # test module importing one of them at the top stops the collection, and no GPU test runs.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shim = tmp_path / "shim"
    for name in ("onnx", "onnxruntime", "onnxscript", "matplotlib"):
        (shim / name).mkdir(parents=True)
        (shim / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n"
        )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), repo])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q",
         "-p", "no:cacheprovider", "tests"],
        capture_output=True, text=True, cwd=repo, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tests/test_pipelines_gpu.py::" in proc.stdout


def test_sweep_toml_keeps_the_runs_notes_as_comments(tmp_path):
    from benchmarks.sweep import toml_file_text
    from trainer.config import load_config_file

    note = "note: dali train: its windows differ 2.0x (10 to 20 img/s), more than the 1.5x"
    text = toml_file_text("resnet50, batch 256/GPU", [note], 'loader = "dali"\nworkers = 8\n')
    assert f"# {note}\n" in text and text.startswith("# Loader settings measured best")
    path = tmp_path / "best.toml"
    path.write_text(text)
    assert load_config_file(str(path)) == {"loader": "dali", "workers": 8}  # comments only


@pytest.mark.slow
def test_trainer_check_stops_and_resumes_the_trainer_with_every_feature_on(tiny_data, tmp_path):
    # gpu_suite.sh's first stage, at its CPU smoke settings: the same code the GPU runs.
    out = tmp_path / "trainer"
    steps = 8
    done = subprocess.run(
        [
            sys.executable, os.path.join(REPO, "benchmarks", "trainer_check.py"),
            "--list", str(tiny_data.train_list), "--out", str(out), "--arch", "resnet18",
            "--batch-size", "4", "--image-size", "32", "--steps-per-epoch", str(steps),
            "--val-images", "8", "--timeout", "300",
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "trainer.json").read_text())
    assert all(result["checks"].values()) and len(result["checks"]) == 5, result["checks"]
    stopped, resumed = result["stopped"]["probe"], result["resumed"]["probe"]
    # The stop lost no step and repeated none: epoch 1, part of 2; then the rest of 2.
    assert stopped["exit_status"] == 143 and resumed["exit_status"] == 0
    assert steps < stopped["train_steps"] < 2 * steps
    assert stopped["train_steps"] + resumed["train_steps"] == 2 * steps
    # Every build reported: run 1 trains epoch 1 (progressive resize: 24 px) and 2 (32 px) and
    # evaluates; run 2 trains the rest of epoch 2 and evaluates.
    sizes = [(b["train"], b["image_size"]) for b in stopped["pipeline_builds"]]
    assert sizes == [(True, 24), (False, 32), (True, 32)], sizes
    assert [b["train"] for b in resumed["pipeline_builds"]] == [True, False]
    assert stopped["host_syncs"].startswith("not counted")  # no CUDA here: said, not zero
    summary = report.trainer_summary(str(out / "trainer.json"))
    assert "- ok: run 2 resumed inside epoch 2" in summary and "FAILED" not in summary
