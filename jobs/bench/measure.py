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


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 1.0) -> float:
    """Dense ``n × n`` matmul FLOP/s on the current threads."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start)



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
