"""The benchmark's method in-process: queue-sized warm-up, windows inside one epoch, the
first-window flag, epoch-boundary timing; real loaders (DALI in CPU mode, PIL) and real torch."""

import pytest
import torch

from benchmarks import throughput
from benchmarks.throughput import Variant, Windows
from pipelines import build_loader
from pipelines.tuning import LoaderPlan


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
    "text", ["ffcv", "dali:hw", "dali:speed=3", "pil:decode=cpu", "dali:decode=gpu", "dali:hw=x"]
)
def test_bad_backend_items_are_refused_by_name(text):
    with pytest.raises(SystemExit, match="--backends"):
        throughput.parse_variants(text)


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
