"""``python -m hyperkern bench``: HyperLSTM against ``torch.nn.LSTM``, measured in one process.

Every figure is a ratio of timings taken side by side, interleaved, in the same process (the
machines here are noisy); absolute times are printed for reference only. The cases are shared
with the pytest-benchmark suites in ``benchmarks/``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import perf_model
from .perf_model import Shape
from .timing import forward_backward_fn, forward_fn, machine_description, time_interleaved, with_backend


@dataclass(frozen=True)
class Case(Shape):
    """A benchmark shape (the performance model's :class:`~hyperkern.perf_model.Shape`) with the
    ratios to nn.LSTM the issues ask for."""

    target_fwd: Optional[float] = None
    target_fwdbwd: Optional[float] = None  # None: forward only


CASES = (  # targets: issue 19 (the CPU backend at nn.LSTM's speed on AMD EPYC too; issue 11's were 1.3/1.4, 2.5/2.5, 1.5)
    Case("ptb", X=50, H=1000, Hh=128, E=4, B=32, T=100, target_fwd=1.2, target_fwdbwd=1.3),
    Case("small", X=32, H=256, Hh=64, E=4, B=16, T=100, target_fwd=2.0, target_fwdbwd=2.0),
    Case("latency", X=50, H=1000, Hh=128, E=4, B=1, T=100, target_fwd=1.3, target_fwdbwd=None),
)


def make_models(case: Case, backend: str = "torch", dtype=torch.float32, device="cpu"):
    """The nn.LSTM baseline and the HyperLSTM (paper initialisation) for a case."""
    from hyperkern import HyperLSTM

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(case.X, case.H).to(device=device, dtype=dtype)
    hyper = HyperLSTM(case.X, case.H, hyper_size=case.Hh, embed_size=case.E, backend=backend, device=device, dtype=dtype)
    x = torch.randn(case.T, case.B, case.X, device=device, dtype=dtype)
    return lstm, hyper, x


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


@dataclass(frozen=True)
class SamplingCase:
    """Step-by-step calls (issue 19): sampling from a language model, one token per call, no
    gradient. ``cell``: ``HyperLSTMCell`` against ``nn.LSTMCell``; ``layer``: ``HyperLSTM`` with
    T=1 against ``nn.LSTM``, the state fed back every step. Each Hyper* loop runs as is (every call
    derives its weights) and inside ``hyperkern.cached_weights()`` (once per parameter version)."""

    X: int = 64
    H: int = 256
    Hh: int = 64
    E: int = 4
    B: int = 1
    steps: int = 200
    target_cell: float = 2.0
    target_layer: float = 1.5


SAMPLING = SamplingCase()


CACHED = " +cached_weights"  # the suffix of a loop run inside hyperkern.cached_weights()


def sampling_fns(case: SamplingCase = SAMPLING, backend: str = "torch") -> Dict[str, object]:
    """The six sampling loops of ``steps`` calls each, as zero-argument functions."""
    from hyperkern import HyperLSTM, HyperLSTMCell, cached_weights

    torch.manual_seed(0)
    kw = dict(hyper_size=case.Hh, embed_size=case.E)
    cells = {"nn.LSTMCell": torch.nn.LSTMCell(case.X, case.H),
             "HyperLSTMCell": HyperLSTMCell(case.X, case.H, backend=backend, **kw)}
    layers = {"nn.LSTM": torch.nn.LSTM(case.X, case.H), "HyperLSTM": HyperLSTM(case.X, case.H, backend=backend, **kw)}
    x = torch.randn(case.B, case.X)

    def cell_loop(cell):
        def run():
            with torch.no_grad():
                hx = None
                for _ in range(case.steps):
                    out = cell(x, hx)  # nn.LSTMCell: (h, c); HyperLSTMCell: (h, state)
                    hx = out if isinstance(cell, torch.nn.LSTMCell) else out[1]
        return run

    def layer_loop(layer):
        x1 = x.unsqueeze(0)

        def run():
            with torch.no_grad():
                hx = None
                for _ in range(case.steps):
                    _, hx = layer(x1, hx)
        return run

    def cached(run):
        def run_cached():
            with cached_weights():
                run()
        return run_cached

    fns = {k: cell_loop(m) for k, m in cells.items()}
    fns.update({k: layer_loop(m) for k, m in layers.items()})
    fns.update({k + CACHED: cached(fns[k]) for k in ("HyperLSTMCell", "HyperLSTM")})
    return fns


def run_sampling(case: SamplingCase = SAMPLING, repeats: int = 7) -> List[dict]:
    """The sampling loops timed interleaved in one process: µs per step and the ratios
    HyperLSTMCell / nn.LSTMCell and HyperLSTM / nn.LSTM."""
    times = time_interleaved(sampling_fns(case), repeats)
    rows = []
    for name, base, target in (("HyperLSTMCell", "nn.LSTMCell", case.target_cell),
                               ("HyperLSTM", "nn.LSTM", case.target_layer)):
        for n in (base, name, name + CACHED):
            rows.append({"case": "sampling", "model": n, "us_per_step": times[n] / case.steps * 1e6,
                         "ratio": times[n] / times[base], "target_ratio": None if n == base else target,
                         "shape": asdict(case)})
    return rows


def format_sampling(rows: List[dict]) -> str:
    c = rows[0]["shape"]
    lines = [f"sampling loop: {c['steps']} calls of one step, X={c['X']} H={c['H']} Hh={c['Hh']} E={c['E']} "
             f"B={c['B']}, no grad"]
    for r in rows:
        flag = "" if r["target_ratio"] is None else (
            f"  <={r['target_ratio']:.1f} " + ("met" if r["ratio"] <= r["target_ratio"] else "MISSED"))
        lines.append(f"  {r['model']:29s} {r['us_per_step']:8.1f} µs/step  ratio {r['ratio']:5.2f}{flag}")
    return "\n".join(lines)


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


def static_rows(layer_shapes: Optional[Sequence[Tuple[int, int]]] = None, z_dim: int = 64, hidden: int = 64,
               backends: Sequence[str] = ("reference", "torch", "triton"), device: Optional[str] = None,
               dtype: torch.dtype = torch.float32, repeats: int = 5, backward: bool = False) -> List[Dict]:
    """One row per usable backend: ms per full generation (median of ``repeats``) of a layer list
    (default: WRN-40-1's), plus a ``model`` row from :func:`hyperkern.perf_model.static_generation`.

    The Triton backend is timed only on CUDA (under the interpreter its time means nothing).
    """
    from hyperkern import static_kernel_gen_layers, wrn_hyper_layer_shapes
    from hyperkern.ops.precision import dot_precision
    from hyperkern.ops.static_gen import backend_status, count_tiles

    layer_shapes = list(layer_shapes) if layer_shapes is not None else wrn_hyper_layer_shapes(40, 1)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    E = count_tiles(layer_shapes, (16, 16))
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.1).to(device, dtype).requires_grad_(backward)  # noqa: E731
    args = (mk(E, z_dim), mk(16, hidden, z_dim), mk(16, hidden), mk(16 * 9, hidden), mk(16 * 9))
    def make_run(name):
        def run():
            ws = static_kernel_gen_layers(*args, kernel_size=3, layer_shapes=layer_shapes, backend=name)
            if backward:
                torch.autograd.backward(ws, [torch.ones_like(w) for w in ws])
        return run

    # the Triton backend is timed only on CUDA (under the interpreter its time means nothing)
    usable = [n for n in backends if backend_status(n, device, dtype, backward, hidden=hidden)[0]
              and (n != "triton" or device.type == "cuda")]
    times = time_interleaved({n: make_run(n) for n in usable}, repeats, device)
    rows = [{"backend": name, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
             "tiles": E, "pass": "fwd+bwd" if backward else "fwd", "ms": 1e3 * sec}
            for name, sec in times.items()]
    dot = dot_precision(dtype)
    model = perf_model.static_generation(layer_shapes, z_dim, hidden, precision="fp32" if dot == "ieee" else dot)
    key = "bwd_predicted_us" if backward else "fwd_predicted_us"
    rows.append({"backend": "model: H100 (triton)", "device": "H100 SXM", "dtype": str(dtype).replace("torch.", ""),
                 "tiles": E, "pass": "fwd+bwd" if backward else "fwd",
                 "ms": (model["fwd_predicted_us"] + (model[key] if backward else 0)) / 1e3, **model})
    return rows


def format_static_rows(rows: Sequence[Dict]) -> str:
    """The static-generation table ``python -m hyperkern bench`` can print."""
    lines = ["| backend | device | dtype | tiles | pass | ms per generation |", "|---|---|---|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['device']} | {r['dtype']} | {r['tiles']} | {r['pass']} | {r['ms']:.4f} |")
    m = next((r for r in rows if "fwd_flops" in r), None)
    p = perf_model.PEAKS
    if m is not None:
        lines.append(
            f"\nmodel ({m['precision']}): forward {m['fwd_flops'] / 1e6:.1f} MFLOP, {m['fwd_min_bytes'] / 1e6:.2f} MB "
            f"minimum HBM traffic (weights written once + inputs read once), 1 launch -> "
            f"{m['fwd_t_mem_us']:.2f} us memory, {m['fwd_t_flop_us']:.2f} us compute, ~{m['fwd_predicted_us']:.1f} us "
            f"with launch; backward {m['bwd_flops'] / 1e6:.1f} MFLOP, {m['bwd_bytes'] / 1e6:.2f} MB "
            f"(minimum {m['bwd_min_bytes'] / 1e6:.2f} MB), {m['bwd_launches']} launches -> ~{m['bwd_predicted_us']:.1f} us. "
            f"Assumptions (hyperkern.perf_model.PEAKS): H100 SXM {p['hbm_bw'] / 1e12:.2f} TB/s HBM, dense peaks "
            f"bf16/fp16 {p['flops']['bf16'] / 1e12:.0f}, tf32 {p['flops']['tf32'] / 1e12:.0f}, fp32 (CUDA cores) "
            f"{p['flops']['fp32'] / 1e12:.0f} TFLOP/s, {p['launch_host'] * 1e6:.0f} us per launch.")
    return "\n".join(lines)


def timed_backends(device) -> tuple:
    """The HyperLSTM backends ``bench`` times on ``device``: the Triton kernels beside the torch
    path on CUDA (when the registry says they run there), the torch path alone otherwise."""
    from hyperkern.ops.hyper_lstm import backend_status

    if torch.device(device).type == "cuda" and backend_status("triton", device, torch.float32)[0]:
        return ("triton", "torch")
    return ("torch",)


def main(out: str = "bench-results", quick: bool = False, cases=None, gpu_check: Optional[str] = None,
         threads: Optional[int] = None) -> int:
    """Run the benchmark tables; ``threads``: intra-op threads (default: torch's, i.e. the machine's
    cores), recorded with the results."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    machine = machine_description()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"measured on {machine['gpu'] or machine['cpu']} ({device}, {threads} threads, torch {machine['torch']}); "
          "ratios are to torch.nn.LSTM timed interleaved in this process")
    selected = [c for c in CASES if not cases or c.name in cases]
    if quick:
        selected = [replace(c, T=10) for c in selected]
    backends = timed_backends(device)
    if "triton" in backends:
        from hyperkern.ops.precision import dot_precision

        print(f"HyperLSTM[triton] fp32 dots: {dot_precision(torch.float32)} (hyperkern.ops.precision)")
    rows = []
    for case in selected:
        rows += run_case(case, backends=backends, repeats=3 if quick else 7, device=device)
    print(format_rows(rows))
    result_sampling = run_sampling(repeats=3 if quick else 7) if device == "cpu" else []
    if result_sampling:
        print(format_sampling(result_sampling))
    from hyperkern.ops.hyper_lstm.cpu import gemm

    print(gemm.format_choices())
    result = {"machine": machine, "device": device, "measured": rows, "sampling": result_sampling,
              "gemm_choices": gemm.choices()}
    print()
    result["gpu_model"] = perf_model.rows()
    print(perf_model.format_table(result["gpu_model"]))
    print()
    result["gpu_model_persistent"] = perf_model.rows_persistent()
    print(perf_model.format_table_persistent(result["gpu_model_persistent"]))
    print()
    result["gpu_model_backward"] = perf_model.rows_bwd()
    print(perf_model.format_table_bwd(result["gpu_model_backward"]))
    if gpu_check:
        from hyperkern import report

        print("\n" + report.merge_gpu_check(result, gpu_check))
    print("\nStatic hypernetwork: every 3x3 kernel of WRN-40-1 (242 tiles), one generation, fp32")
    srows = static_rows(repeats=3 if quick else 7) + static_rows(repeats=3 if quick else 7, backward=True)
    print(format_static_rows(srows))
    result["static"] = srows

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
