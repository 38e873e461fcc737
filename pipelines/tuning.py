"""The loader settings a run gets by default, chosen from measurement, and why.

``plan_loader`` turns what the user left open (``--dali-decode auto``, no ``--workers``, no
``--dali-hw-decoder-load``) into concrete settings plus one sentence per choice, so the
trainer's startup line can say what it picked and on what grounds. The numbers come from an
H100 (80 GB HBM3, 16 cores; torch 2.11+cu130, DALI 2.4.0), resnet50, bf16, batch 256,
channels_last, ``benchmarks/throughput.py`` on 25,600 demo JPEGs, img/s per GPU end to end
(synthetic ceiling 3,969):

    DALI mixed, hw_decoder_load 0.65 (DALI's default), 16 threads   3,694
    DALI mixed, hw_decoder_load 0.99, 16 threads                    3,849
    DALI mixed, hw_decoder_load 0.99,  8 threads                    3,896
    DALI mixed, hw_decoder_load 0.99,  4 threads                    3,811
    DALI cpu decode, 16 threads                                     3,934
    PIL DataLoader, 16 workers                                      2,201

Every choice here is a default only: ``benchmarks/throughput.py --sweep`` measures the
alternatives on the user's own list and machine and prints the flags that won.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The share of JPEGs sent to the GPU's hardware JPEG engine (A100, H100 and newer; ignored on
# GPUs without one). DALI's 0.65 is tuned for decode latency; while training saturates the
# SMs, every image left to the CUDA decoder costs training time (3,896 vs 3,694 img/s).
HW_DECODER_LOAD = 0.99
# With GPU decode the host threads only parse headers, read files and feed the decoders:
# beyond 8 they contend with the training process for the CPU (3,896 at 8 vs 3,849 at 16).
MIXED_MAX_THREADS = 8
# --dali-decode auto on a GPU decodes on the host only when the host's cores decode faster,
# by HOST_DECODE_MARGIN, than the model trains. Measured: 16 threads of the H100 host decoded
# 7,491 img/s (loader alone, resnet50 crops), 468 a core; resnet50 trained at 3,969 img/s
# (the synthetic ceiling); CPU decode won end to end there (3,934 vs 3,896), and with fewer
# cores the GPU's decoders are the faster path by far (loader 14,573 img/s at 8 threads).
# Reasoned, not measured: another model trains at that rate times
# resnet50's FLOPs over its own (torchvision's weights metadata), so resnet18 (1.8 GFLOPs)
# needs ~8,900 img/s, more than 16 cores decode; and the rate counts physical cores: a
# hardware thread's sibling adds little to JPEG decoding.
HOST_DECODE_IMAGES_PER_CORE = 7491 / 16
RESNET50_IMAGES_PER_SEC = 3969
RESNET50_GFLOPS = 4.089
HOST_DECODE_MARGIN = 1.5  # 16 cores for resnet50: 1.89x, and CPU decode won there (by 1%)
DEFAULT_PREFETCH = 2


@dataclass(frozen=True)
class LoaderPlan:
    backend: str
    decode: str | None  # DALI: "mixed" or "cpu"; None for the PIL backends
    threads: int  # DALI threads or PIL workers, per GPU (rank)
    hw_decoder_load: float | None  # mixed decode only
    prefetch: int  # batches the loader runs ahead
    reasons: list[str] = field(default_factory=list)

    def dali_options(self) -> dict:
        """Decoder arguments for ``build_loader(dali_options=...)``."""
        return {} if self.hw_decoder_load is None else {"hw_decoder_load": self.hw_decoder_load}

    def describe(self) -> str:
        """One line for the startup log: what was chosen, and why."""
        if self.backend == "dali":
            what = f"dali, {self.decode} decode, {self.threads} threads/GPU"
            if self.hw_decoder_load is not None:
                what += f", hw_decoder_load {self.hw_decoder_load:g}"
        else:
            what = f"{self.backend}, {self.threads} workers/GPU"
        what += f", prefetch {self.prefetch}"
        return f"{what} ({'; '.join(self.reasons)})" if self.reasons else what


def plan_loader(
    *,
    backend: str,
    device_type: str,
    cores_per_rank: int,
    cores_reason: str,
    dali_decode: str = "auto",
    threads: int | None = None,
    hw_decoder_load: float | None = None,
    prefetch: int | None = None,
    physical_cores_per_rank: int | None = None,
    model_gflops: float | None = None,
) -> LoaderPlan:
    """Concrete loader settings for one rank; ``None``/``"auto"`` mean "choose for me".

    cores_per_rank: the CPU cores this rank may use (its share of the node's usable cores);
    cores_reason: how that was worked out, e.g. "16 usable cores / 8 ranks on this node".
    physical_cores_per_rank: the same share counted in physical cores (hardware threads of
    one core counted once; None: taken as ``cores_per_rank``). model_gflops: the model's
    forward GFLOPs per image (None: taken as resnet50's). Both decide ``auto``'s placement.
    """
    reasons: list[str] = []
    prefetch = DEFAULT_PREFETCH if prefetch is None else prefetch
    if backend != "dali":
        if threads is None:
            threads = cores_per_rank
            reasons.append(f"workers: {cores_reason}")
        return LoaderPlan(backend, None, threads, None, prefetch, reasons)

    cuda = device_type == "cuda"
    decode = dali_decode
    if decode == "auto":
        planned_threads = threads if threads is not None else cores_per_rank
        if not cuda:
            decode = "cpu"
            reasons.append("decode: auto = cpu without a GPU")
        else:
            physical = physical_cores_per_rank or planned_threads
            cores = min(planned_threads, physical)
            host = cores * HOST_DECODE_IMAGES_PER_CORE
            gflops = model_gflops or RESNET50_GFLOPS
            needed = RESNET50_IMAGES_PER_SEC * RESNET50_GFLOPS / gflops
            model = f"a {gflops:.1f}-GFLOP model" if model_gflops else "resnet50 (assumed)"
            why = (
                f"{cores} physical cores/GPU decode ~{host:,.0f} img/s; {model} trains at "
                f"~{needed:,.0f} img/s on an H100"
            )
            if host >= HOST_DECODE_MARGIN * needed:
                decode = "cpu"
                reasons.append(
                    f"decode: auto = cpu, {why} (host decode >= {HOST_DECODE_MARGIN:g}x)"
                )
            else:
                decode = "mixed"
                reasons.append(
                    f"decode: auto = mixed (GPU), {why} (host decode < {HOST_DECODE_MARGIN:g}x)"
                )
    if threads is None:
        threads = cores_per_rank
        if decode == "mixed" and threads > MIXED_MAX_THREADS:
            threads = MIXED_MAX_THREADS
            reasons.append(
                f"threads: {MIXED_MAX_THREADS}, the best measured with GPU decode ({cores_reason})"
            )
        else:
            reasons.append(f"threads: {cores_reason}")
    if decode == "mixed" and hw_decoder_load is None:
        hw_decoder_load = HW_DECODER_LOAD
        reasons.append(f"hw_decoder_load {HW_DECODER_LOAD:g}, measured best for training")
    elif decode != "mixed" and hw_decoder_load is not None:
        hw_decoder_load = None  # the hardware decoder exists only for GPU decode
        reasons.append("hw_decoder_load ignored: it applies to GPU (mixed) decode only")
    return LoaderPlan(backend, decode, threads, hw_decoder_load, prefetch, reasons)
