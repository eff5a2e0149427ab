"""What this machine can contribute: memory, accelerator, cores and a cached one-second speed benchmark."""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from cakep2p import paths

log = logging.getLogger(__name__)

BENCHMARK_FILE = "capacity-benchmark.json"
BENCHMARK_VERSION = 2   # 2: a CPU's bandwidth is that of the decode kernel's weight reads, not of a copy
CPU_SAFETY_MARGIN_MIN = 1 << 30       # leave at least 1 GiB of RAM to the OS and other programs
CPU_SAFETY_MARGIN_FRACTION = 0.10     # ... or 10% of total RAM, whichever is larger
GPU_SAFETY_MARGIN_MIN = 256 << 20     # CUDA context, fragmentation, activations


@dataclass(frozen=True)
class Capacity:
    ram_total: int
    ram_available: int
    accelerator: str          # "cuda" | "mps" | "cpu"
    device_name: str
    vram_total: int
    vram_free: int
    cpu_cores: int
    gflops: float             # float32 matmul, on the accelerator that runs the model
    bandwidth: float          # bytes/s: weight reads of a 16-bit decode kernel (CPU), a tensor copy (GPUs)
    os: str


def probe(max_memory: int | None = None, run_benchmark: bool = True) -> Capacity:
    """Measure this machine now; the speed benchmark runs once per machine and is cached in paths.cache_dir().

    `max_memory` is accepted for call-site symmetry with offered_memory(); the capacity itself is never capped.
    """
    del max_memory
    memory = psutil.virtual_memory()
    accelerator, device_name, vram_total, vram_free = _accelerator()
    gflops, bandwidth = _cached_benchmark(accelerator, device_name) if run_benchmark else (0.0, 0.0)
    return Capacity(
        ram_total=int(memory.total), ram_available=int(memory.available),
        accelerator=accelerator, device_name=device_name,
        vram_total=int(vram_total), vram_free=int(vram_free),
        cpu_cores=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        gflops=gflops, bandwidth=bandwidth,
        os=f"{platform.system()} {platform.release()} {platform.machine()}".strip(),
    )


def offered_memory(cap: Capacity, max_memory: int | None) -> int:
    """Bytes this node offers for model parts: what the device can spare, capped by --max-memory."""
    if cap.accelerator == "cuda":
        spare = cap.vram_free - max(GPU_SAFETY_MARGIN_MIN, int(cap.vram_total * 0.05))
    elif cap.accelerator == "mps":     # unified memory: the GPU budget is bounded by free RAM too
        spare = min(cap.vram_free, cap.ram_available) - max(CPU_SAFETY_MARGIN_MIN, int(cap.ram_total * 0.10))
    else:
        spare = cap.ram_available - max(CPU_SAFETY_MARGIN_MIN, int(cap.ram_total * CPU_SAFETY_MARGIN_FRACTION))
    spare = max(0, spare)
    return spare if max_memory is None else max(0, min(spare, int(max_memory)))


def _accelerator() -> tuple[str, str, int, int]:
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        return "cuda", torch.cuda.get_device_name(0), total, free
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        total = int(torch.mps.recommended_max_memory())
        return "mps", f"Apple GPU ({platform.machine()})", total, max(0, total - torch.mps.current_allocated_memory())
    return "cpu", _cpu_model(), 0, 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def benchmark_key(accelerator: str, device_name: str) -> str:
    """The benchmark cache key: one measurement per machine, CPU model and accelerator."""
    return f"v{BENCHMARK_VERSION}|{socket.gethostname()}|{_cpu_model()}|{accelerator}|{device_name}"


def benchmark_cache_path() -> Path:
    return paths.cache_dir() / BENCHMARK_FILE


def _cached_benchmark(accelerator: str, device_name: str) -> tuple[float, float]:
    path = benchmark_cache_path()
    key = benchmark_key(accelerator, device_name)
    try:
        stored = json.loads(path.read_text())
        entry = stored.get(key) if isinstance(stored, dict) else None
        if isinstance(entry, dict):
            return float(entry["gflops"]), float(entry["bandwidth"])
    except (OSError, ValueError, KeyError, TypeError):
        stored = {}
    gflops, bandwidth = run_benchmark(accelerator)
    stored = stored if isinstance(stored, dict) else {}
    stored[key] = {"gflops": gflops, "bandwidth": bandwidth, "measured_at": time.time()}
    try:
        paths.write_atomically(path, json.dumps(stored, indent=1).encode("utf-8"))
    except OSError as error:
        log.debug("could not cache the capacity benchmark in %s: %s", path, error)
    return gflops, bandwidth


def run_benchmark(accelerator: str = "cpu", budget_s: float = 0.4) -> tuple[float, float]:
    """(matmul GFLOP/s, bandwidth bytes/s) on the given device, each measured for about budget_s. A CPU's bandwidth
    is what decoding a 16-bit model reads through the engine's own kernel (bf16 arithmetic or fbgemm's fp16 under
    float32, as auto loads it): on a CPU without bf16 hardware that is half its copy bandwidth or less, and the
    planner predicts decode time from it. A GPU's is a tensor copy's."""
    import torch

    device = torch.device("cuda" if accelerator == "cuda" else "mps" if accelerator == "mps" else "cpu")
    size = 1024 if device.type != "cpu" else 512
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    gflops = _best_rate(lambda: torch.mm(a, b), device, work=2 * size**3 / 1e9, budget_s=budget_s)
    if device.type == "cpu":
        return round(gflops, 2), round(_decode_read_rate(budget_s), 0)
    elements = (64 << 20) // 4           # 64 MiB source, read once and written once per copy
    source = torch.empty(elements, device=device).fill_(1.0)
    target = torch.empty_like(source)
    bandwidth = _best_rate(lambda: target.copy_(source), device, work=2 * elements * 4, budget_s=budget_s)
    return round(gflops, 2), round(bandwidth, 0)


def _decode_read_rate(budget_s: float) -> float:
    """Weight bytes/s of one token's matrix-vector product with a 64 MiB bf16 matrix (beyond the caches)."""
    import torch

    from cakep2p.engine.kernels import has_bf16_hardware, linear, prepare

    compute = torch.bfloat16 if has_bf16_hardware() else torch.float32
    weight = (torch.randn(8192, 4096, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    prepared = prepare(weight, compute, torch.device("cpu"))
    x = torch.randn(1, 4096).to(compute)
    with torch.inference_mode():
        return _best_rate(lambda: linear(x, prepared), torch.device("cpu"), work=weight.numel() * 2,
                          budget_s=budget_s)


def _best_rate(step, device, work: float, budget_s: float) -> float:
    import torch

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        elif device.type == "mps":
            torch.mps.synchronize()

    step()                                # warm-up
    synchronize()
    best = 0.0
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        step()
        synchronize()
        elapsed = time.perf_counter() - started
        if elapsed > 0:
            best = max(best, work / elapsed)
    return best
