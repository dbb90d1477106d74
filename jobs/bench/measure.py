"""Measuring on the current device: timing interleaved variants, peak memory, the dense matmul rate."""

from __future__ import annotations

import platform
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


@contextmanager
def peak_memory(device: torch.device) -> Iterator[list[float]]:
    """Yields a list that holds, after the block, the peak memory in GB: max allocated on CUDA, else RSS."""
    box: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield box
        box.append(torch.cuda.max_memory_allocated(device) / 2**30)
        return
    peak, done = [rss_bytes()], threading.Event()

    def poll() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], rss_bytes())

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        done.set()
        thread.join()
        box.append(max(peak[0], rss_bytes()) / 2**30)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


HALF_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def native_half(device: torch.device) -> list[torch.dtype]:
    """Reduced precisions the hardware runs natively (CUDA; CPUs with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return [torch.bfloat16, torch.float16] if torch.cuda.is_bf16_supported() else [torch.float16]
    checks = [getattr(torch.cpu, n, lambda: False) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return [torch.bfloat16] if any(c() for c in checks) else []


def best_rate(run: Callable[[], object], flop: float, device: torch.device, seconds: float,
              windows: int = 3) -> float:
    """FLOP/s of ``run`` (``flop`` each call): the best of ``windows`` timed windows after a warm-up call. Other
    work on the machine only ever slows a window down, so the best one is the closest to the kernel's rate."""
    run()
    sync(device)
    best = 0.0
    for _ in range(windows):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            run()
            count += 1
            sync(device)
        best = max(best, flop * count / (time.perf_counter() - start))
    return best


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 1.0) -> float:
    """Dense ``n × n`` matmul FLOP/s on the current threads."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return best_rate(lambda: a @ b, 2 * n**3, device, seconds)


def conv_rate(device: torch.device, dtype: torch.dtype, channels: int, side: int, batch: int,
              seconds: float = 1.0) -> float:
    """FLOP/s of a 3×3 convolution, ``channels`` in and out on ``batch × side × side`` (the UNet's commonest
    layer; on a CPU it runs through oneDNN, not the BLAS a matmul runs through, and can be the faster)."""
    x = torch.randn(batch, channels, side, side, device=device, dtype=dtype)
    w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)
    flop = 2 * batch * side * side * channels * channels * 9
    return best_rate(lambda: torch.nn.functional.conv2d(x, w, padding=1), flop, device, seconds)


def dense_rates(device: torch.device, smoke: bool) -> tuple[dict[str, Any], dict[tuple[str, int], float]]:
    """The dense rate per precision and thread count, the ceiling MFU is taken against: the larger of a matmul's
    and a 3×3 convolution's (the best of several windows each). Returns the ``matmul`` section (``{dtype}_flops``:
    the matmul, ``{dtype}_conv_flops``: the convolution) and ``(dtype, threads) → FLOP/s``.

    A matmul alone is no ceiling on a CPU: on AMD EPYC (Zen 4) MKL's fp32 matmul ran at about 160 GFLOP/s where
    oneDNN's convolutions, most of a UNet's FLOPs, ran at about 210, so a UNet step measured against the matmul
    read an MFU over 1."""
    n, threads = (1024 if smoke else 2048), torch.get_num_threads()  # smoke: big enough to outlast a busy core's
    conv = {"channels": 128, "side": 32, "batch": 4} if smoke else {"channels": 320, "side": 32, "batch": 8}
    seconds = 0.45 if smoke else 1.5
    measured: dict[tuple[str, str, int], float] = {}

    def both(name: str, dtype: torch.dtype, t: int) -> None:
        measured["", name, t] = matmul_rate(device, dtype, n, seconds)
        measured["_conv", name, t] = conv_rate(device, dtype, **conv, seconds=seconds)

    both("fp32", torch.float32, threads)
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
        both("fp32", torch.float32, 1)
        torch.set_num_threads(threads)
    for half in native_half(device):
        both(HALF_NAMES[half], half, threads)
    section = {"n": n, "conv": conv, **{f"{d}{kind}_flops" + ("_1_thread" if t == 1 and threads > 1 else ""): r
                                        for (kind, d, t), r in measured.items()}}
    rates = {(d, t): max(r for (_, d2, t2), r in measured.items() if (d2, t2) == (d, t)) for _, d, t in measured}
    return section, rates


@dataclass
class Variant:
    """One way of taking a training step; ``enter``/``leave`` switch the shared model in and out of it."""

    name: str
    what: str
    step: Callable[[], None]
    samples_per_step: int
    samples_per_concept: int
    enter: Callable[[], None] = lambda: None
    leave: Callable[[], None] = lambda: None
    flops_from: str | None = None
    """Same computation as that variant (its FLOP count is reused)."""
    threads: int | None = None
    dtype: str = "fp32"
    """Precision of the frozen model: the matmul rate its utilisation is measured against."""
    times: list[float] = field(default_factory=list)
    flops: float = 0.0
    peak_gb: float = 0.0


def measure(variants: list[Variant], device: torch.device, reps: int, count_flops: bool = True) -> None:
    """Warm every variant up, count its FLOPs once, then time it ``reps`` times, interleaved."""
    for v in variants:
        v.enter()
        v.step()
        if count_flops and v.flops_from is None:
            with FlopCounterMode(display=False) as counter:
                v.step()
            v.flops = counter.get_total_flops()
        v.leave()
        print(f"[benchmark] warmed up {v.name}", file=sys.stderr, flush=True)
    by_name = {v.name: v for v in variants}
    for v in variants:
        if v.flops_from:
            v.flops = by_name[v.flops_from].flops if v.flops_from in by_name else 0.0
    for _ in range(reps):
        for v in variants:
            v.enter()
            sync(device)
            with peak_memory(device) as peak:
                start = time.perf_counter()
                v.step()
                sync(device)
                v.times.append(time.perf_counter() - start)
            v.peak_gb = max(v.peak_gb, peak[0])
            v.leave()
            print(f"[benchmark] {v.name}: {v.times[-1]:.3f} s", file=sys.stderr, flush=True)
