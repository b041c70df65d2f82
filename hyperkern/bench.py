"""``python -m hyperkern bench``: HyperLSTM against ``torch.nn.LSTM``, measured in one process.

Every figure is a ratio of timings taken side by side, interleaved, in the same process (the
machines here are noisy); absolute times are printed for reference only. The cases are shared
with the pytest-benchmark suites in ``benchmarks/``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch


@dataclass(frozen=True)
class Case:
    name: str
    X: int
    H: int
    Hh: int
    E: int
    B: int
    T: int
    target_fwd: float  # ratio to nn.LSTM the issue asks for
    target_fwdbwd: Optional[float]  # None: forward only


CASES = (  # targets: issue 11 (the CPU backend at nn.LSTM's speed)
    Case("ptb", X=50, H=1000, Hh=128, E=4, B=32, T=100, target_fwd=1.3, target_fwdbwd=1.4),
    Case("small", X=32, H=256, Hh=64, E=4, B=16, T=100, target_fwd=2.5, target_fwdbwd=2.5),
    Case("latency", X=50, H=1000, Hh=128, E=4, B=1, T=100, target_fwd=1.5, target_fwdbwd=None),
)


def make_models(case: Case, backend: str = "torch", dtype=torch.float32, device="cpu"):
    """The nn.LSTM baseline and the HyperLSTM (paper initialisation) for a case."""
    from hyperkern import HyperLSTM

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(case.X, case.H).to(device=device, dtype=dtype)
    hyper = HyperLSTM(case.X, case.H, case.Hh, case.E, backend=backend, device=device, dtype=dtype)
    x = torch.randn(case.T, case.B, case.X, device=device, dtype=dtype)
    return lstm, hyper, x


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


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: Dict[str, Callable[[], None]], repeats: int, device="cpu") -> Dict[str, float]:
    """Median seconds per call of each fn, with the fns run round-robin so drift hits all alike."""
    for fn in fns.values():  # warm-up (allocator, MKL packing, lazy init)
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


def run_case(case: Case, backends=("torch",), repeats: int = 5, device="cpu") -> List[dict]:
    lstm, hyper, x = make_models(case, backend=backends[0], device=device)
    rows = []
    modes = [("forward", forward_fn)] + ([("forward+backward", forward_backward_fn)] if case.target_fwdbwd else [])
    for mode, make in modes:
        fns = {"nn.LSTM": make(lstm, x)}
        for b in backends:
            m = hyper if b == backends[0] else with_backend(hyper, b)
            fns[f"HyperLSTM[{b}]"] = make(m, x)
        times = time_interleaved(fns, repeats, device)
        base = times["nn.LSTM"]
        target = case.target_fwd if mode == "forward" else case.target_fwdbwd
        for name, sec in times.items():
            rows.append({
                "case": case.name, "mode": mode, "model": name, "ms": sec * 1e3,
                "tokens_per_s": case.T * case.B / sec, "ratio_to_lstm": sec / base,
                "target_ratio": None if name == "nn.LSTM" else target,
                "shape": asdict(case),
            })
    return rows


def with_backend(model, backend):
    """The same weights under another backend (a shallow module copy; parameters are shared)."""
    import copy

    m = copy.copy(model)
    m._modules = dict(model._modules)  # own module dict, so setting backend leaves the original alone
    m.backend = backend
    return m


def machine_description() -> dict:
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


def format_rows(rows: List[dict]) -> str:
    head = f"{'case':8s} {'mode':17s} {'model':20s} {'ms':>9s} {'tokens/s':>10s} {'ratio':>6s} {'target':>7s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        target = "" if r["target_ratio"] is None else f"<={r['target_ratio']:.1f}"
        flag = ""
        if r["target_ratio"] is not None:
            flag = "  met" if r["ratio_to_lstm"] <= r["target_ratio"] else "  MISSED"
        lines.append(f"{r['case']:8s} {r['mode']:17s} {r['model']:20s} {r['ms']:9.1f} "
                     f"{r['tokens_per_s']:10.0f} {r['ratio_to_lstm']:6.2f} {target:>7s}{flag}")
    return "\n".join(lines)


def timed_backends(device) -> tuple:
    """The HyperLSTM backends ``bench`` times on ``device``: the Triton kernels beside the torch
    path on CUDA (when the registry says they run there), the torch path alone otherwise."""
    from hyperkern.ops.hyper_lstm import backend_status

    if torch.device(device).type == "cuda" and backend_status("triton", device, torch.float32)[0]:
        return ("triton", "torch")
    return ("torch",)


def main(out: str = "bench-results", quick: bool = False, cases=None, gpu_check: Optional[str] = None) -> int:
    threads = int(os.environ.get("HYPERKERN_BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    machine = machine_description()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"measured on {machine['gpu'] or machine['cpu']} ({device}, {threads} threads, torch {machine['torch']}); "
          "ratios are to torch.nn.LSTM timed interleaved in this process")
    selected = [c for c in CASES if not cases or c.name in cases]
    if quick:
        selected = [Case(c.name, c.X, c.H, c.Hh, c.E, c.B, 10, c.target_fwd, c.target_fwdbwd) for c in selected]
    backends = timed_backends(device)
    if "triton" in backends:
        from hyperkern.ops.precision import dot_precision

        print(f"HyperLSTM[triton] fp32 dots: {dot_precision(torch.float32)} (hyperkern.ops.precision)")
    rows = []
    for case in selected:
        rows += run_case(case, backends=backends, repeats=3 if quick else 7, device=device)
    print(format_rows(rows))
    from hyperkern.ops.hyper_lstm.cpu import gemm

    print(gemm.format_choices())
    result = {"machine": machine, "device": device, "measured": rows, "gemm_choices": gemm.choices()}
    from hyperkern import perf_model  # pure Python: never imports Triton

    print()
    result["gpu_model"] = perf_model.rows()
    print(perf_model.format_table(result["gpu_model"]))
    print()
    result["gpu_model_backward"] = perf_model.rows_bwd()
    print(perf_model.format_table_bwd(result["gpu_model_backward"]))
    if gpu_check:
        from hyperkern import report

        print("\n" + report.merge_gpu_check(result, gpu_check))
    from hyperkern.ops.static_gen import bench_rows, format_bench_rows

    print("\nStatic hypernetwork: every 3x3 kernel of WRN-40-1 (242 tiles), one generation, fp32")
    static_rows = bench_rows(repeats=3 if quick else 7) + bench_rows(repeats=3 if quick else 7, backward=True)
    print(format_bench_rows(static_rows))
    result["static"] = static_rows

    from hyperkern import report

    print("\nTime per token against sequence length and hidden size (measured, interleaved with nn.LSTM)")
    result["sweep"] = report.sweep(device=device, **(report.QUICK if quick else {}))
    print(report.format_sweep(result["sweep"]))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "bench.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {path}")
    png = report.plot(path, os.path.join(out, "bench.png"))
    if png:
        print(f"wrote {png}")
    return 0
