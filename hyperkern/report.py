"""Benchmark report for ``make bench``: a time-per-token sweep and a PNG plot of bench.json.

- :func:`sweep` measures the time per token of ``HyperLSTM`` (each usable backend) and of
  ``torch.nn.LSTM`` against sequence length and against hidden size, forward and
  forward+backward, with :func:`hyperkern.timing.time_interleaved` (the fns of one shape run
  round-robin in this process, so machine noise hits them alike). It returns JSON-ready rows.
- :func:`format_sweep` prints those rows as a table (no plotting library needed).
- :func:`plot` reads the JSON that ``python -m hyperkern bench`` wrote and draws the panels:
  time/token vs T, time/token vs H, and — when the JSON has them — the static-generation
  comparison (``"static"``) and the modelled GPU figures (``"gpu_model"``, ``"gpu_model_backward"``). Every panel says
  whether its numbers were measured (and on which CPU / GPU) or modelled. matplotlib is an
  optional extra (``pip install -e .[plot]``) imported only here, lazily.
"""
from __future__ import annotations

import json
import math
import textwrap
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .timing import forward_backward_fn, forward_fn, time_interleaved, with_backend

MODES = ("forward", "forward+backward")
# The float64-capable reference runs a Python loop of small ops: time it only where that is quick.
REFERENCE_MAX = (50, 256)  # (T, H): the reference backend is timed only where T <= 50 and H <= 256
# Smoke settings for `python -m hyperkern bench --quick`: sweep(**QUICK) takes a few seconds.
QUICK = dict(T_values=(10, 25), H_values=(64, 128), T_fixed=10, H_fixed=64, repeats=1)


def sweep_backends(device) -> List[str]:
    """HyperLSTM backends worth timing on ``device``: "torch" always, "triton" on CUDA (never
    under the CPU interpreter, whose times mean nothing), "reference" (at small sizes only)."""
    from .ops.hyper_lstm import backend_status

    names = ["torch"]
    if torch.device(device).type == "cuda" and backend_status("triton", device)[0]:
        names.append("triton")
    names.append("reference")
    return names


def _shapes(T_values, H_values, T_fixed, H_fixed):
    for T in T_values:
        yield "T", T, H_fixed
    for H in H_values:
        if not (H == H_fixed and T_fixed in T_values):  # that point is already in the T sweep
            yield "H", T_fixed, H


def sweep(T_values: Sequence[int] = (25, 50, 100, 200), H_values: Sequence[int] = (128, 256, 512, 1024),
          T_fixed: int = 50, H_fixed: int = 256, B: int = 16, X: int = 64, Hh: int = 64, E: int = 4,
          modes: Sequence[str] = MODES, backends: Optional[Sequence[str]] = None, repeats: int = 5,
          device: Optional[str] = None, dtype=torch.float32, reference_max: Tuple[int, int] = REFERENCE_MAX,
          verbose: bool = True) -> List[Dict]:
    """Time per token against sequence length (H = ``H_fixed``) and hidden size (T = ``T_fixed``).

    One row per (shape, mode, model): ``{"sweep", "mode", "model", "backend", "T", "H", "Hh", "E",
    "B", "X", "ms", "us_per_token", "tokens_per_s", "ratio_to_lstm", "device", "repeats",
    "measured": True}``; ``ms`` is the median time of one call over the whole ``[T, B, X]``
    sequence and ``us_per_token = ms * 1000 / (T * B)``. Points shared by both sweeps
    (T = ``T_fixed``, H = ``H_fixed``) are measured once and appear in both sweeps' rows
    (the ``"sweep"`` field is then ``"T,H"``). Defaults take ~15 s on 2 idle CPU cores (several
    times longer when other work shares them).
    """
    from . import HyperLSTM

    if not T_values and not H_values:
        raise ValueError("sweep needs at least one T or one H value")
    for name, vals in (("T_values", T_values), ("H_values", H_values)):
        if any((not isinstance(v, int)) or v < 1 for v in vals):
            raise ValueError(f"{name} must be positive ints, got {list(vals)!r}")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {list(modes)!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = list(backends) if backends is not None else sweep_backends(device)
    from .ops.hyper_lstm import BACKENDS

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; expected some of {BACKENDS}")

    rows: List[Dict] = []
    shapes = list(_shapes(T_values, H_values, T_fixed, H_fixed))
    shared = T_fixed in T_values and H_fixed in H_values
    for axis, T, H in shapes:
        axis_label = "T,H" if (shared and T == T_fixed and H == H_fixed) else axis
        torch.manual_seed(0)
        lstm = torch.nn.LSTM(X, H).to(device=device, dtype=dtype)
        hyper = HyperLSTM(X, H, hyper_size=Hh, embed_size=E, device=device, dtype=dtype)
        x = torch.randn(T, B, X, device=device, dtype=dtype)
        for mode in modes:
            make = forward_fn if mode == "forward" else forward_backward_fn
            fns = {"nn.LSTM": make(lstm, x)}
            for b in backends:
                if b == "reference" and (T > reference_max[0] or H > reference_max[1]):
                    continue
                m = with_backend(hyper, b)
                fns[f"HyperLSTM[{b}]"] = make(m, x)
            times = time_interleaved(fns, repeats, device)
            base = times["nn.LSTM"]
            for name, sec in times.items():
                rows.append({
                    "sweep": axis_label, "mode": mode, "model": name,
                    "backend": "nn.LSTM" if name == "nn.LSTM" else name[len("HyperLSTM["):-1],
                    "T": T, "H": H, "Hh": Hh, "E": E, "B": B, "X": X,
                    "ms": sec * 1e3, "us_per_token": sec * 1e6 / (T * B), "tokens_per_s": T * B / sec,
                    "ratio_to_lstm": sec / base, "device": str(device), "repeats": repeats, "measured": True,
                })
            if verbose:
                parts = ", ".join(f"{k} {v * 1e6 / (T * B):.2f}" for k, v in times.items())
                print(f"  sweep T={T:4d} H={H:5d} {mode:16s} us/token: {parts}", flush=True)
    return rows


def format_sweep(rows: Sequence[Dict]) -> str:
    """A plain-text table of :func:`sweep` rows (us per token; ratio to nn.LSTM at the same shape)."""
    head = f"{'sweep':5s} {'T':>5s} {'H':>5s} {'mode':17s} {'model':22s} {'ms':>9s} {'us/token':>9s} {'ratio':>6s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['sweep']:5s} {r['T']:5d} {r['H']:5d} {r['mode']:17s} {r['model']:22s} "
                     f"{r['ms']:9.2f} {r['us_per_token']:9.3f} {r['ratio_to_lstm']:6.2f}")
    return "\n".join(lines)


# --- plotting ----------------------------------------------------------------------------------

def _import_figure():
    """matplotlib's Figure class, or None. Figures are made without pyplot: no global state, no
    display, and the caller's pyplot backend is left alone."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def measured_where(result: Dict) -> str:
    """'measured on <CPU or GPU model> (<device>, ...)' from the JSON's machine description."""
    machine = result.get("machine") or {}
    device = str(result.get("device") or "cpu")
    if device.startswith("cuda"):
        where = machine.get("gpu") or "an unnamed GPU"
        extra = f"cuda; host CPU {machine['cpu']}" if machine.get("cpu") else "cuda"
    else:
        where = machine.get("cpu") or "an unnamed CPU"
        extra = device + (f", {machine['threads']} threads" if machine.get("threads") else "")
    if machine.get("torch"):
        extra += f", torch {machine['torch']}"
    return f"measured on {where} ({extra})"


def _sweep_rows(result: Dict) -> List[Dict]:
    s = result.get("sweep")
    if isinstance(s, dict):
        s = s.get("rows")
    return [r for r in (s or []) if isinstance(r, dict)]


def _static_rows(result: Dict) -> List[Dict]:
    s = result.get("static")
    if isinstance(s, dict):
        if isinstance(s.get("rows"), list):
            s = s["rows"]
        else:  # e.g. {"fwd": [rows], "fwd+bwd": [rows]}
            s = [r for v in s.values() if isinstance(v, list) for r in v]
    return [r for r in (s or []) if isinstance(r, dict) and "ms" in r and ("backend" in r or "model" in r)]


def _is_modelled(row: Dict, section: Optional[Dict] = None) -> bool:
    for src in (row, section or {}):
        if src.get("modelled") is True or src.get("measured") is False:
            return True
        kind = str(src.get("kind", src.get("source", ""))).lower()
        if kind.startswith("model") or kind.startswith("predict"):
            return True
    name = str(row.get("backend", row.get("model", ""))).lower()
    return name.startswith("model") or "predicted_us" in row


def _series_style(model: str, mode: str):
    colors = {"nn.LSTM": "tab:gray", "HyperLSTM[torch]": "tab:blue", "HyperLSTM[triton]": "tab:red",
              "HyperLSTM[reference]": "tab:green"}
    return {"color": colors.get(model, None), "linestyle": "-" if mode == "forward" else "--",
            "marker": "o" if mode == "forward" else "s"}


def _plot_sweep(ax, rows: List[Dict], axis: str, where: str) -> None:
    key = axis  # "T" or "H"
    pts = [r for r in rows if axis in str(r.get("sweep", "")).split(",")]
    if not pts:
        ax.text(0.5, 0.5, f"no {axis} sweep in this JSON", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    series: Dict[Tuple[str, str], List[Tuple[int, float]]] = {}
    for r in pts:
        series.setdefault((r["model"], r["mode"]), []).append((r[key], r["us_per_token"]))
    order = {"nn.LSTM": 0, "HyperLSTM[torch]": 1, "HyperLSTM[triton]": 2, "HyperLSTM[reference]": 3}
    for (model, mode), xy in sorted(series.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0])):
        xy.sort()
        ax.plot([p[0] for p in xy], [p[1] for p in xy], label=f"{model} {mode}", **_series_style(model, mode))
    ref = pts[0]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    xs = sorted({r[key] for r in pts})
    ax.set_xticks(xs)
    ax.set_xticklabels([str(v) for v in xs])
    fixed = f"H={ref['H']}" if axis == "T" else f"T={ref['T']}"
    ax.set_xlabel("sequence length T" if axis == "T" else "hidden size H")
    ax.set_ylabel("time per token (µs, log scale)")
    ax.set_title(f"time/token vs {'sequence length' if axis == 'T' else 'hidden size'} "
                 f"({fixed}, B={ref['B']}, X={ref['X']}, Hh={ref['Hh']}, E={ref['E']})\n{where}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _plot_static(ax, rows: List[Dict], section, where: str) -> None:
    labels, values, colors, hatches = [], [], [], []
    any_measured = any_modelled = False
    for r in rows:
        modelled = _is_modelled(r, section if isinstance(section, dict) else None)
        any_modelled |= modelled
        any_measured |= not modelled
        name = str(r.get("backend", r.get("model")))
        extra = [str(r[k]) for k in ("pass", "dtype") if r.get(k)]
        labels.append(name + (f"\n({', '.join(extra)})" if extra else "")
                      + ("\nmodelled" if modelled else "\nmeasured"))
        values.append(float(r["ms"]))
        colors.append("white" if modelled else "tab:blue")
        hatches.append("//" if modelled else "")
    bars = ax.bar(range(len(values)), values, color=colors, edgecolor="black")
    for b, h, v in zip(bars, hatches, values):
        b.set_hatch(h)
        ax.annotate(f"{v:.3g} ms", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, fontsize=7)
    if values and min(values) > 0 and max(values) / min(values) > 50:
        ax.set_yscale("log")
    ax.set_ylabel("ms per full kernel generation" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    tiles = rows[0].get("tiles")
    parts = []
    if any_measured:
        parts.append(where)
    if any_modelled:
        dev = next((r.get("device") for r in rows if _is_modelled(r) and r.get("device")), None)
        parts.append("hatched: modelled" + (f" ({dev}), not measured" if dev else ", not measured"))
    ax.set_title("static hypernetwork: kernel generation" + (f" ({tiles} tiles)" if tiles else "")
                 + "\n" + "\n".join(parts), fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)


def _plot_gpu_model(ax, fwd_rows: List[Dict], bwd_rows: List[Dict], gpu: Optional[str]) -> None:
    """Grouped bars per (shape, dtype): the modelled µs per step (hatched; CUDA-graph launches) and,
    where the JSON has them, the measured ones: graph-replayed (``measured_graph_us``, from a
    gpu-check.json) and host-launched (``measured_eager_us``, or ``measured_us`` timed by ``bench``
    itself on a GPU)."""
    keys: List[Tuple[str, str]] = []
    for r in list(fwd_rows) + list(bwd_rows):
        k = (str(r.get("shape", "?")), str(r.get("dtype", "")))
        if k not in keys:
            keys.append(k)
    by_fwd = {(str(r.get("shape", "?")), str(r.get("dtype", ""))): r for r in fwd_rows}
    by_bwd = {(str(r.get("shape", "?")), str(r.get("dtype", ""))): r for r in bwd_rows}
    col = lambda by, *names: [next((by.get(k, {}).get(n) for n in names if by.get(k, {}).get(n) is not None), None)  # noqa: E731
                              for k in keys]
    where = f"measured on {gpu}" if gpu else "measured on this GPU"
    series = [  # (label, values, style)
        ("forward, modelled (H100 SXM)", col(by_fwd, "pred_us_graph"), dict(color="white", edgecolor="tab:blue", hatch="//")),
        (f"forward, {where}, graph-replayed", col(by_fwd, "measured_graph_us"), dict(color="tab:blue", edgecolor="black")),
        (f"forward, {where}, host launches", col(by_fwd, "measured_eager_us", "measured_us"),
         dict(color="lightsteelblue", edgecolor="black")),
        ("backward, modelled (H100 SXM)", col(by_bwd, "pred_us_step"), dict(color="white", edgecolor="tab:red", hatch="\\\\")),
        (f"backward, {where}, graph-replayed", col(by_bwd, "measured_graph_us"), dict(color="tab:red", edgecolor="black")),
    ]
    series = [sr for sr in series if any(v is not None for v in sr[1])]
    n = max(len(series), 1)
    w = 0.8 / n
    xs = list(range(len(keys)))
    for i, (label, vals, style) in enumerate(series):
        ax.bar([x - 0.4 + w * (i + 0.5) for x in xs], [float(v) if v is not None else 0.0 for v in vals], w,
               label=label, **style)
    ax.set_xticks(xs)
    ax.set_xticklabels(["\n".join(textwrap.wrap(k[0], 12)) + f"\n{k[1]}" for k in keys], fontsize=7)
    ax.set_ylabel("µs per timestep (one cell)")
    measured_any = any("measured" in label for label, _, _ in series)
    ax.set_title("HyperLSTM Triton kernels per timestep\n" + (f"modelled H100 SXM (hatched) vs {where}" if measured_any
                 else "modelled for an H100 SXM — not measured (no GPU here)"), fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)


def merge_gpu_check(result: Dict, gpu_check_json: str) -> str:
    """Attach the measured µs per step of a ``gpu-check.json`` to the bench result's modelled GPU
    rows (same shape and dtype): forward = the CUDA-graph-replayed forward (the model's "graph"
    launches), backward = graph-replayed forward+backward minus forward; the eager (host-launched)
    figures ride along. Returns a line saying what was attached."""
    with open(gpu_check_json) as f:
        gc = json.load(f)
    env = gc.get("environment", {})
    timing = {(r["shape"], r["dtype"]): r for r in (gc.get("sections", {}).get("timing", {}).get("rows") or [])
              if "fwd_graph_us" in r}
    n = 0
    for rows, key in ((result.get("gpu_model") or [], "fwd"), (result.get("gpu_model_backward") or [], "bwd")):
        for r in rows:
            t = timing.get((r.get("shape"), r.get("dtype")))
            if t is None:
                continue
            if key == "fwd":
                r["measured_graph_us"], r["measured_eager_us"] = t["fwd_graph_us"], t["fwd_eager_us"]
            else:
                r["measured_graph_us"] = t["fwdbwd_graph_us"] - t["fwd_graph_us"]
            r["measured_steps"] = t.get("T")
            n += 1
    result["gpu_measured_on"] = f"{env.get('gpu')} ({env.get('date', '?')}, torch {env.get('torch')}, " \
                                f"triton {env.get('triton')})"
    return f"attached {n} measured GPU rows from {gpu_check_json}: {result['gpu_measured_on']}"


def build_figure(result: Dict, source: str = "this JSON"):
    """The matplotlib ``Figure`` of a bench result (the dict :func:`plot` reads from JSON)."""
    Figure = _import_figure()
    if Figure is None:
        raise ImportError("matplotlib is not installed (pip install -e .[plot])")
    where = measured_where(result)
    sweep_rows = _sweep_rows(result)
    static_rows = _static_rows(result)
    gpu_rows = [r for r in (result.get("gpu_model") or []) if isinstance(r, dict)]
    gpu_bwd_rows = [r for r in (result.get("gpu_model_backward") or []) if isinstance(r, dict)]

    panels = []
    if sweep_rows:
        panels += [("sweep", "T"), ("sweep", "H")]
    if static_rows:
        panels.append(("static", None))
    if gpu_rows or gpu_bwd_rows:
        panels.append(("gpu", None))
    if not panels:
        panels.append(("empty", None))
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(7.5 * ncols, 5.2 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = [a for row in axes for a in row]
    for ax, (kind, arg) in zip(flat, panels):
        if kind == "sweep":
            _plot_sweep(ax, sweep_rows, arg, where)
        elif kind == "static":
            _plot_static(ax, static_rows, result.get("static"), where)
        elif kind == "gpu":
            _plot_gpu_model(ax, gpu_rows, gpu_bwd_rows,
                            result.get("gpu_measured_on") or (result.get("machine") or {}).get("gpu"))
        else:
            ax.text(0.5, 0.5, f"{source}\nhas no sweep, static or gpu_model section",
                    ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
    for ax in flat[len(panels):]:
        fig.delaxes(ax)
    fig.suptitle("hyperkern benchmark: HyperLSTM vs torch.nn.LSTM (solid: forward, dashed: forward+backward)",
                 fontsize=11)
    fig.tight_layout()
    return fig


def plot(result_json_path: str, png_path: str) -> Optional[str]:
    """Draw the benchmark panels of a bench JSON into ``png_path``; returns the path, or None
    (with a hint printed) when matplotlib is not installed. Sections missing from the JSON are
    skipped; a JSON with none of them still produces a PNG saying so."""
    if _import_figure() is None:
        print("plot skipped: matplotlib is not installed (pip install -e .[plot], or pip install matplotlib)")
        return None
    with open(result_json_path) as f:
        result = json.load(f)
    fig = build_figure(result, source=result_json_path)
    fig.savefig(png_path, dpi=110)
    return png_path
