"""Per-step profile of the torch backend's C++ time loop (docs/cpu_backend.md, issue 19).

    flock /tmp/hyperkern-cpu.lock .venv/bin/python benchmarks/profile_cpu.py [ptb small latency] [--gemm]

For each shape: one warm call under ``torch.profiler``, the self CPU time of each range the loop
shows (its GEMM calls through the dispatcher, ``hyper_lstm_cpu::forward_rows`` /
``backward_rows``, the post-loop GEMMs) divided by T, and the rest. The profiler adds a few µs
per recorded op, so per-step figures of the small shapes read a little high; totals without the
profiler are printed beside them. ``--gemm``: each loop GEMM timed warm and alone against a plain
copy of the weight's bytes (the bandwidth bound at B <= 4).
"""
from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict

import torch

from hyperkern.bench import CASES, make_models
from hyperkern.timing import machine_description

GEMM_OPS = ("aten::mm", "aten::addmm", "mkl::_mkl_linear", "mkldnn::_linear_pointwise", "aten::bmm",
            "hyper_lstm_cpu::dot_pair")


def _median_time(fn, n=7):
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def profile(case, train: bool):
    lstm, hyper, x = make_models(case)
    if train:
        xg = x.clone().requires_grad_(True)

        def run():
            out, _ = hyper(xg)
            out.sum().backward()
            hyper.zero_grad(set_to_none=True)
    else:
        def run():
            with torch.no_grad():
                hyper(x)
    run()
    run()
    total = _median_time(run, 5)
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU]) as p:
        run()
    by = defaultdict(float)
    counts = defaultdict(int)
    for ev in p.key_averages():
        by[ev.key] += ev.self_cpu_time_total
        counts[ev.key] += ev.count
    T = case.T
    rows_f = by.pop("hyper_lstm_cpu::forward_rows", 0.0)
    rows_b = by.pop("hyper_lstm_cpu::backward_rows", 0.0)
    gemm = {k: (by.pop(k), counts[k]) for k in list(by) if k in GEMM_OPS}
    rest = sum(by.values())
    top = sorted(by.items(), key=lambda kv: -kv[1])[:6]
    mode = "fwd+bwd" if train else "fwd"
    print(f"\n{case.name} {mode} B={case.B} T={T} X={case.X} H={case.H} Hh={case.Hh}: "
          f"{total * 1e3:.2f} ms per call unprofiled ({total / T * 1e6:.0f} µs per step)")
    for k, (us, c) in gemm.items():
        print(f"  {k:28s} {us / 1e3:8.2f} ms  {c:5d} calls  {us / T:7.1f} µs/step")
    print(f"  {'forward rows':28s} {rows_f / 1e3:8.2f} ms  {rows_f / T:7.1f} µs/step")
    if train:
        print(f"  {'backward rows':28s} {rows_b / 1e3:8.2f} ms  {rows_b / T:7.1f} µs/step")
    print(f"  {'everything else':28s} {rest / 1e3:8.2f} ms  {rest / T:7.1f} µs/step; largest: "
          + ", ".join(f"{k} {v / 1e3:.2f}" for k, v in top))
    lt = _median_time(lambda: (lstm(xg)[0].sum().backward() if train else None) if train else
                      _nograd(lstm, x), 5)
    print(f"  nn.LSTM {mode}: {lt * 1e3:.2f} ms ({lt / T * 1e6:.0f} µs per step)")


def _nograd(m, x):
    with torch.no_grad():
        m(x)


def gemm_vs_copy():
    """Each loop GEMM warm and alone (the variant chosen for it) against a copy of its weight."""
    from hyperkern.ops.hyper_lstm.cpu import gemm

    for (M, K, N) in ((1, 1000, 4000), (1, 1128, 512), (1, 1000, 4512), (32, 1000, 4000), (32, 1128, 512),
                      (32, 1000, 4512), (16, 256, 1024), (16, 320, 256), (16, 256, 1280)):
        W = torch.randn(N, K)
        x = torch.randn(M, K)
        src, dst = torch.randn(N * K), torch.empty(N * K)
        t_copy = _median_time(lambda: dst.copy_(src), 21)
        line = f"  M={M:<3d} K={K:<5d} N={N:<5d} weights {N * K * 4 / 1e6:5.1f} MB: copy {t_copy * 1e6:7.0f} µs " \
               f"({2 * N * K * 4 / t_copy / 1e9:5.0f} GB/s r+w)"
        for v in gemm.available(torch.float32):
            p = gemm.pack(v, W, M)
            t = _median_time(lambda: gemm.apply(v, x, W, p, M), 21)
            line += f"; {v} {t * 1e6:6.0f} µs ({N * K * 4 / t / 1e9:4.0f} GB/s)"
        print(line)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    m = machine_description()
    print(f"{m['cpu']}, {torch.get_num_threads()} threads, torch {m['torch']}")
    if "--gemm" in sys.argv:
        gemm_vs_copy()
    for case in CASES:
        if args and case.name not in args:
            continue
        profile(case, train=False)
        if case.target_fwdbwd is not None:
            profile(case, train=True)
