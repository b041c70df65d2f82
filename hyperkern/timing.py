"""What the measuring tools share (``bench``, ``report``, the benchmark suites, the examples): the
machine's description and timings taken side by side in one process.

Every figure the tools report is a ratio of timings taken interleaved in the same process (the
machines here are noisy), so :func:`time_interleaved` runs the candidates round-robin.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Dict, List

import torch


def machine_description() -> dict:
    """CPU model, thread count, torch / Python versions and the GPU (if any): named beside every timing."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def forward_fn(model, x) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            model(x)
    return run


def forward_backward_fn(model, x) -> Callable[[], None]:
    xg = x.clone().requires_grad_(True)

    def run():
        out, _ = model(xg)
        out.sum().backward()
        model.zero_grad(set_to_none=True)
        xg.grad = None
    return run


def with_backend(model, backend):
    """The same weights under another backend (a shallow module copy; parameters are shared)."""
    import copy

    m = copy.copy(model)
    m._modules = dict(model._modules)  # own module dict, so setting backend leaves the original alone
    m.backend = backend
    return m


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: Dict[str, Callable[[], None]], repeats: int, device="cpu") -> Dict[str, float]:
    """Median seconds per call of each fn, with the fns run round-robin so drift hits all alike."""
    for fn in fns.values():  # warm-up (allocator, GEMM packing, lazy init)
        fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}
