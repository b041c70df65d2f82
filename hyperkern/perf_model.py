"""Performance model of the Triton HyperLSTM forward (one cell, one direction), per timestep.

``rows()`` returns one row per (benchmark shape, dtype) and ``format_table(rows)`` prints them;
``python -m hyperkern bench`` shows the table. On a machine without CUDA every GPU figure is
*modelled, not measured*; with CUDA, :func:`measure` times the real kernels and the table adds
measured / predicted.

What is counted (all per timestep of the recurrence):

- **FLOPs**: the recurrent matmuls (``h @ W_hh^T``: 8·B·H²; the hyper cell's
  ``[h, ĥ] @ [W_hih,h ; W_hhh]^T``: 8·B·Hh·(H+Hh)), the embeddings (24·B·Hh·E), the scaling
  vectors (24·B·E·H), and an estimate of the elementwise work (~40 per main and per hyper unit);
  plus, amortised over T, the hoisted x-projection GEMM (8·B·X·(H+Hh)).
- **minimum HBM bytes**: what any per-step implementation must move with nothing cached across
  steps: every recurrent parameter once (W_hh, hyper_weight_ih's h-part, hyper_weight_hh, z_weight,
  d_weight, biases, layer-norm vectors), the step's x-projections (fp32), the state read and
  written once (fp32), the output written once.
- **modelled bytes**: every global load and store the two kernels issue, from their actual
  structure and the block configuration the dispatcher picks (weights once per batch tile,
  ``h_{t-1}`` re-read by every column tile, the P / G / Â scratch round trips, parameter vectors
  re-read by every row program, the extra layer-norm passes). Counted as if all of it went to HBM
  (conservative: the scratch is L2-resident in practice, and so are the weights when they fit).
- **predicted H100 time**: per kernel, ``launch + max(HBM bytes / BW_eff, L2 bytes / L2_BW_eff,
  FLOPs / peak, chain)``; ``BW_eff = min(HBM_BW, active_programs × per-SM bandwidth)`` (a kernel
  with few programs cannot pull the full bandwidth); ``chain`` = the dependent global-memory round
  trips one program makes in sequence × their latency (the cell kernel's chunk loops, pipelined two
  deep; the gates kernel's K loop is software-pipelined). Plus the hoisted GEMM amortised over T.

Assumed peaks (H100 SXM): HBM 3.35 TB/s, L2 50 MB, 132 SMs, dense tf32 495 TFLOP/s, bf16 990
TFLOP/s; a launch costs ~1 µs inside a CUDA graph and ~4 µs from the host. Further assumptions
(not vendor peaks): a dependent round trip ~0.6 µs to HBM, ~0.3 µs to L2; L2 ~5.5 TB/s; one SM
alone sustains ~55 GB/s from HBM (Little's law: ~32 KB in flight at ~0.6 µs) and ~110 GB/s from L2. For reference, cuDNN's LSTM step at H=768, B=16 is ~2 µs on an H100 (2.01 ms for
T=1024, published by FlashRNN's authors) — a plain LSTM, without the hyper cell.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from hyperkern.kernels.common import NUM_PATHS, NUM_SCALED_PATHS, cdiv

# The one table of GPU constants every model here uses (both ops).
PEAKS = {
    "device": "H100 SXM (modelled)",
    "hbm_bw": 3.35e12,  # B/s
    "l2_bytes": 50e6,
    "sms": 132,
    # dense peaks per dot precision: tensor cores for tf32 / bf16 / fp16, the CUDA cores for
    # full-precision fp32 ("ieee") and fp64
    "flops": {"tf32": 495e12, "bf16": 990e12, "fp16": 990e12, "fp32": 67e12, "fp64": 67e12},
    "launch_graph": 1e-6,  # one kernel launch inside a CUDA graph
    "launch_host": 4e-6,  # one kernel launch from the host (Triton's Python dispatch is slower still)
    "latency": 0.6e-6,  # one dependent round trip to HBM
    "latency_l2": 0.3e-6,  # one dependent round trip that hits L2
    "sm_bw": 55e9,  # HBM bandwidth one SM sustains alone
    "l2_bw": 5.5e12,  # L2 read bandwidth
    "sm_l2_bw": 110e9,  # L2 bandwidth one SM sustains alone (~64 B/clk)
    "sm_int_ops": 64 * 1.755e9,  # 32-bit integer lane-ops per second on one SM (64 INT32 lanes/clk)
    # one grid-wide sync of the persistent kernel, in dependent L2 round trips (see grid_sync_cost)
    "grid_sync_round_trips": 2.5,
}
# integer instructions per seeded-dropout mask element: 10 Philox rounds of 2 IMAD.HI + 2 IMAD +
# 2 LOP3 (+ uniform key adds), then int->float, scale, compare, select and the store's address
PHILOX_OPS = 90
DTYPE_BYTES = {"fp64": 8, "fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2}
# the HyperLSTM rows' dot precision per dtype: fp32 is modelled with TF32 dots (torch's matmul TF32
# flag on, hyperkern.ops.precision), as a user after speed runs it
MODEL_DOT = {"fp32": "tf32", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class Shape:
    name: str
    X: int
    H: int
    Hh: int
    E: int
    B: int
    T: int
    layer_norm: bool = True


SHAPES = (
    Shape("PTB (paper)", X=50, H=1000, Hh=128, E=4, B=32, T=100),
    Shape("H768 B16 (cuDNN cmp)", X=768, H=768, Hh=128, E=4, B=16, T=1024),
    Shape("small", X=32, H=256, Hh=64, E=4, B=16, T=128),
)


def launches_per_step(s: Shape, dtype: str) -> Tuple[int, int]:
    """(forward, backward) kernel launches per timestep, as the launchers make them (the launch
    tables of ``hyperkern.ops.hyper_lstm.fused_triton.configs``), inference without dropout."""
    from hyperkern.ops.hyper_lstm.fused_triton import configs

    dot = MODEL_DOT[dtype]
    return (len(configs.forward_launches(s.B, dtype, dot, s.layer_norm, 0)),
            len(configs.backward_launches(s.B, s.E, dtype, dot, s.layer_norm, 0)))


def flops_per_step(s: Shape) -> Dict[str, float]:
    B, X, H, Hh, E = s.B, s.X, s.H, s.Hh, s.E
    main = 2 * B * H * 4 * H
    hyper = 2 * B * (H + Hh) * 4 * Hh
    emb = 2 * B * Hh * NUM_PATHS * E + 2 * B * NUM_PATHS * E * H
    elementwise = 40 * B * (H + Hh)
    hoisted = 2 * B * X * 4 * (H + Hh)  # once per step of input, run before the loop
    return {"recurrent": main + hyper + emb + elementwise, "hoisted": hoisted,
            "total": main + hyper + emb + elementwise + hoisted}


def recurrent_param_elems(s: Shape) -> int:
    H, Hh, E = s.H, s.Hh, s.E
    n = 4 * H * H + 4 * Hh * H + 4 * Hh * Hh + NUM_PATHS * E * Hh + NUM_PATHS * H * E + 4 * H + 4 * Hh + NUM_SCALED_PATHS * E
    if s.layer_norm:
        n += 10 * H + 10 * Hh
    return n


def min_bytes_per_step(s: Shape, dtype: str) -> int:
    wb, B, H, Hh = DTYPE_BYTES[dtype], s.B, s.H, s.Hh
    return (recurrent_param_elems(s) * wb
            + B * 4 * (H + Hh) * 4  # the step's x-projections (fp32)
            + 2 * B * 2 * (H + Hh) * 4  # state (h, c, ĥ, ĉ) read and written, fp32
            + B * H * wb)  # output


def kernel_model(s: Shape, dtype: str, configs=None) -> Dict[str, Dict[str, float]]:
    """Per kernel: programs, FLOPs, serial round trips, and bytes — ``l2`` = every load and store
    issued, ``hbm`` = what reaches DRAM (each buffer's first touch in the step; re-reads of data
    touched earlier in the step are L2 hits; scratch is written back once). ``configs``: the
    (gates, cell) block configurations, default the per-step dispatcher's."""
    from hyperkern.ops.hyper_lstm.fused_triton import choose_configs

    wb, f4 = DTYPE_BYTES[dtype], 4
    B, H, Hh, E, ln = s.B, s.H, s.Hh, s.E, s.layer_norm
    g, c = configs if configs is not None else choose_configs(B)

    # launch 1: gates kernel -------------------------------------------------------------------
    n_bt, n_main, n_hyp = cdiv(B, g.BM), cdiv(H, g.BH), cdiv(Hh, g.BH)
    weights = (4 * H * H + 4 * Hh * H + 4 * Hh * Hh) * wb
    scratch_w1 = B * 4 * H * f4 + B * 4 * Hh * f4  # P and Â written
    gates = {
        "programs": (n_main + n_hyp) * n_bt,
        "flops": 2 * B * H * 4 * H + 2 * B * (H + Hh) * 4 * Hh,
        "l2": (n_bt * weights  # every batch tile streams all weights
               + (n_main + n_hyp) * B * H * f4 + n_hyp * B * Hh * f4  # h_{t-1} / ĥ_{t-1} per column tile
               + B * 4 * Hh * f4 + n_bt * 4 * Hh * wb + scratch_w1),
        "hbm": weights + B * (H + Hh) * f4 + B * 4 * Hh * f4 + 4 * Hh * wb + scratch_w1,
        # the K loop is software-pipelined (num_stages): a prologue and an epilogue round trip
        "chain_hbm": 2, "chain_l2": 0,
    }

    # launch 2: cell kernel (a program owns BMC rows and walks them in chunks) --------------------
    n_c = cdiv(B, c.BMC)
    ln_vecs = lambda n: (10 * n * wb if ln else 0)  # noqa: E731  per-gate LN + LN(c) weights/biases
    # hyper cell: Â read (stats, update, o-gate with LN), ĉ_prev, ĥ_prev (carry), ĉ_new (+ re-read), ĥ_new
    hyp_l2 = B * Hh * f4 * ((4 + 4 + 1) if ln else 4) + B * Hh * f4 * (5 if ln else 4) + n_c * ln_vecs(Hh)
    hyp_hbm = B * Hh * f4 * 3 + ln_vecs(Hh)  # ĉ_prev read, ĉ_new and ĥ_new written
    # embeddings: ĥ_t re-read per z chunk, z_weight/z_bias per program, z scratch written
    z_par = (NUM_PATHS * E * Hh + NUM_SCALED_PATHS * E) * wb
    emb_l2 = B * Hh * f4 * cdiv(NUM_PATHS * E, c.BZ) + n_c * z_par + B * NUM_PATHS * E * f4
    emb_hbm = z_par + B * NUM_PATHS * E * f4
    # main cell: P, XP, bias, d_weight, z (per chunk), G written; LN passes; c, h, output
    main_par = (4 * H + NUM_PATHS * H * E) * wb
    main_l2 = (2 * B * 4 * H * f4 + n_c * main_par + B * NUM_PATHS * E * f4 * cdiv(H, c.BN)
               + B * 4 * H * f4 * (2 if ln else 1) + (B * H * f4 if ln else 0)
               + B * H * f4 * (5 if ln else 4) + B * H * wb + n_c * ln_vecs(H))
    main_hbm = (B * 4 * H * f4 + main_par + B * 4 * H * f4  # XP read, parameters, G written back
                + B * H * f4 * 3 + B * H * wb + ln_vecs(H))  # c_prev read, c_new + h_new + output written
    passes = 3 if ln else 1
    pipe = max(c.num_stages, 1)
    loop = lambda n: 1 + (n - 1) / pipe  # noqa: E731  round trips of a pipelined loop of n chunks
    # dependent round trips one program makes in sequence: the first pass over the main row
    # streams XP from HBM; everything else it reads was touched earlier in the step (L2)
    chain_hbm = loop(cdiv(H, c.BN))
    chain_l2 = ((passes * loop(cdiv(Hh, c.BN))) + cdiv(NUM_PATHS * E, c.BZ) * cdiv(Hh, c.BKZ)
                + loop(cdiv(H, c.BN)) * ((passes - 1) if ln else 1)
                + cdiv(H, c.BN) * E * 0.2  # d generation: E L1-hit loads per chunk
                + (4 if ln else 2) * 0.5)  # block barriers between passes
    cell = {"programs": n_c, "flops": 2 * B * Hh * NUM_PATHS * E + 2 * B * NUM_PATHS * E * H + 40 * B * (H + Hh),
            "l2": hyp_l2 + emb_l2 + main_l2, "hbm": hyp_hbm + emb_hbm + main_hbm,
            "chain_hbm": chain_hbm, "chain_l2": chain_l2}
    return {"gates": gates, "cell": cell, "configs": {"gates": asdict(g), "cell": asdict(c)}}


def dropout_us(s: Shape, rows_per_program: int) -> float:
    """Modelled µs one cell kernel (forward or backward) adds per step with seeded recurrent
    dropout: its first pass draws ``rows_per_program × (H + Hh)`` Philox numbers on one SM's integer
    pipes and writes them to the mask scratch, which the gate passes re-read from L2. The pass is
    serial with the rest of the program, so the time adds. Only the cell kernels change."""
    n = rows_per_program * (s.H + s.Hh)
    p = PEAKS
    return (n * PHILOX_OPS / p["sm_int_ops"] + 2 * 4 * n / p["sm_l2_bw"] + p["latency_l2"]) * 1e6


def _kernel_time(k: Dict[str, float], dtype: str, launch: float) -> float:
    p = PEAKS
    active = min(k["programs"], p["sms"])
    hbm_bw = min(p["hbm_bw"], active * p["sm_bw"])
    l2_bw = min(p["l2_bw"], active * p["sm_l2_bw"])
    return launch + max(k["hbm"] / hbm_bw, k["l2"] / l2_bw, k["flops"] / p["flops"][MODEL_DOT[dtype]],
                        k["chain_hbm"] * p["latency"] + k["chain_l2"] * p["latency_l2"])


def predict(s: Shape, dtype: str) -> Dict[str, float]:
    p = PEAKS
    km = kernel_model(s, dtype)
    wb = DTYPE_BYTES[dtype]
    # hoisted GEMM (once, before the loop), amortised per step
    fl = flops_per_step(s)
    hoist_bytes = s.T * s.B * (s.X * wb + 4 * (s.H + s.Hh) * 4) + 4 * (s.H + s.Hh) * s.X * wb
    hoist = (p["launch_host"] + max(hoist_bytes / p["hbm_bw"], s.T * fl["hoisted"] / p["flops"][MODEL_DOT[dtype]])) / s.T
    out = {}
    for mode, launch in (("graph", p["launch_graph"]), ("host", p["launch_host"])):
        out[mode] = sum(_kernel_time(km[k], dtype, launch) for k in ("gates", "cell")) + hoist
    out["gates_us"] = _kernel_time(km["gates"], dtype, p["launch_graph"]) * 1e6
    out["cell_us"] = _kernel_time(km["cell"], dtype, p["launch_graph"]) * 1e6
    out["hoist_us"] = hoist * 1e6
    out["dropout_us"] = dropout_us(s, km["configs"]["cell"]["BMC"])
    return out


def rows(shapes: Sequence[Shape] = SHAPES, dtypes: Sequence[str] = ("fp32", "bf16"),
         measure_on_gpu: Optional[bool] = None) -> List[Dict]:
    """One row per (shape, dtype). ``measure_on_gpu``: default = CUDA available."""
    if measure_on_gpu is None:
        try:
            import torch

            measure_on_gpu = torch.cuda.is_available()
        except Exception:  # noqa: BLE001
            measure_on_gpu = False
    out = []
    for s in shapes:
        for dt in dtypes:
            km = kernel_model(s, dt)
            fl = flops_per_step(s)
            mn = min_bytes_per_step(s, dt)
            mb = km["gates"]["hbm"] + km["cell"]["hbm"]
            l2 = km["gates"]["l2"] + km["cell"]["l2"]
            pr = predict(s, dt)
            row = {"shape": s.name, "dtype": dt, **asdict(s), "flops_step": fl["total"],
                   "flops_recurrent_step": fl["recurrent"], "min_bytes_step": mn, "model_bytes_step": mb, "l2_bytes_step": l2,
                   "bytes_ratio": mb / mn, "launches_step": launches_per_step(s, dt)[0],
                   "pred_us_graph": pr["graph"] * 1e6, "pred_us_host": pr["host"] * 1e6,
                   "gates_us": pr["gates_us"], "cell_us": pr["cell_us"], "hoist_us": pr["hoist_us"],
                   "dropout_us": pr["dropout_us"],
                   "weights_fit_l2": recurrent_param_elems(s) * DTYPE_BYTES[dt] < PEAKS["l2_bytes"],
                   "configs": km["configs"], "measured_us": None}
            if measure_on_gpu:
                row["measured_us"] = measure(s, dt)
            out.append(row)
    return out


def measure(s: Shape, dtype: str, repeats: int = 5) -> float:
    """Measured µs per step of the Triton forward on the current CUDA device (host launches: the
    eager loop, ``cuda_graphs=False``; ``gpu-check`` also times the layer's graph replays)."""
    import torch

    from hyperkern import HyperLSTMCell
    from hyperkern.ops.hyper_lstm import fused_triton
    from hyperkern.testing import randomize_

    tdt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    dev = torch.device("cuda")
    cell = HyperLSTMCell(s.X, s.H, hyper_size=s.Hh, embed_size=s.E, layer_norm=s.layer_norm, device=dev, dtype=tdt)
    randomize_(cell)
    params = {n: p.detach() for n, p in cell.params().items()}
    x = torch.randn(s.T, s.B, s.X, device=dev, dtype=tdt)
    state = tuple(torch.zeros(s.B, n, device=dev, dtype=tdt) for n in (s.H, s.H, s.Hh, s.Hh))
    with torch.no_grad():
        for _ in range(2):
            fused_triton.hyper_lstm_sequence(x, state, params, cell.cfg, cuda_graphs=False)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fused_triton.hyper_lstm_sequence(x, state, params, cell.cfg, cuda_graphs=False)
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (repeats * s.T)


# --------------------------------------------------------------------------------------------
# the persistent forward (kernels/hyper_lstm_persistent.py): one launch per sequence
# --------------------------------------------------------------------------------------------

# issue 13's modelled targets on an H100, µs per forward step: (shape name, dtype) -> target
PERSISTENT_TARGETS = {("H768 B16 (cuDNN cmp)", "bf16"): 4.0, ("PTB (paper)", "fp32"): 6.0}
# the share of L2 the recurrent weights may take and still be modelled as staying there across steps
# (the rest holds the streamed x-projections, outputs and per-step buffers): an assumption
L2_RESIDENT_SHARE = 0.5


def grid_sync_cost() -> float:
    """Seconds one grid sync of the persistent kernel adds to a step: :data:`PEAKS`'
    ``grid_sync_round_trips`` (2.5) dependent L2 round trips — the last program's release fence
    waits for its stores to be acknowledged (one round trip), its arrival travels to L2 (half),
    and a poll that reaches L2 after it returns on average one round trip later. An assumption
    built from the model's L2 latency, not a measurement: 0.75 µs. Consistent with the one published
    anchor, FlashRNN's fused LSTM (two cooperative-groups grid syncs per step, 4.76 µs per step on an
    H100 at H=768, B=16, bf16 — at most 2.4 µs per sync even if the step were all sync)."""
    return PEAKS["grid_sync_round_trips"] * PEAKS["latency_l2"]


def _bound(k: Dict[str, float], dtype: str) -> str:
    """What bounds one phase in :func:`_kernel_time`: its largest term."""
    p = PEAKS
    active = min(k["programs"], p["sms"])
    terms = {"HBM bandwidth": k["hbm"] / min(p["hbm_bw"], active * p["sm_bw"]),
             "L2 bandwidth": k["l2"] / min(p["l2_bw"], active * p["sm_l2_bw"]),
             "FLOPs": k["flops"] / p["flops"][MODEL_DOT[dtype]],
             "dependent round trips": k["chain_hbm"] * p["latency"] + k["chain_l2"] * p["latency_l2"]}
    return max(terms, key=terms.get)


def persistent_model(s: Shape, dtype: str) -> Dict[str, Dict[str, float]]:
    """The persistent kernel's two phases per step (same fields as :func:`kernel_model`), from
    its launch table (``configs.PERSISTENT_TABLE``): ``products`` = the gates kernel's tiles on
    ``min(tiles, grid)`` programs, ``cell`` = the cell kernel's row blocks, ``grid`` = programs.

    What differs from the per-step kernels' model is where the bytes come from: the recurrent
    weights, parameter vectors, state and per-step scratch are re-read every step by the same
    programs, so they stay in L2 (their reuse distance is one step) while they take at most
    :data:`L2_RESIDENT_SHARE` of it; HBM then sees only each step's x-projections (first touch)
    and its output. Inference (training also writes the kept per-step tensors)."""
    from hyperkern.ops.hyper_lstm.fused_triton import configs

    pc = configs.choose_persistent_config(s.B)
    km = kernel_model(s, dtype, pc.phases())
    f4, wb = 4, DTYPE_BYTES[dtype]
    n_tiles, n_rows = km["gates"]["programs"], km["cell"]["programs"]
    grid = min(max(n_tiles, n_rows), PEAKS["sms"])
    products, cell = dict(km["gates"], programs=min(n_tiles, grid)), dict(km["cell"])
    if recurrent_param_elems(s) * wb <= L2_RESIDENT_SHARE * PEAKS["l2_bytes"]:
        products["hbm"] = s.B * 4 * s.Hh * f4  # the hyper x-projection of the step
        cell["hbm"] = s.B * 4 * s.H * f4 + s.B * s.H * wb  # the main x-projection, the output
    return {"products": products, "cell": cell, "grid": grid, "config": asdict(pc)}


def predict_persistent(s: Shape, dtype: str) -> Dict[str, object]:
    """Modelled µs per step of the persistent forward on an H100 (inference): the products phase +
    the cell phase (each :func:`_kernel_time` without a launch) + two grid syncs per step
    (:func:`grid_sync_cost`; 2T − 1 per launch) + what each call pays once, amortised over T (the
    hoisted GEMM as in :func:`predict`, one host launch, one host read of the error flag)."""
    p = PEAKS
    m = persistent_model(s, dtype)
    products = _kernel_time(m["products"], dtype, 0.0)
    cell = _kernel_time(m["cell"], dtype, 0.0)
    syncs = (2 * s.T - 1) / s.T * grid_sync_cost()
    per_call = predict(s, dtype)["hoist_us"] * 1e-6 + 2 * p["launch_host"] / s.T
    total = products + cell + syncs + per_call
    terms = {"products": products, "cell": cell, "syncs": syncs, "per call": per_call}
    target = PERSISTENT_TARGETS.get((s.name, dtype))
    return {"grid": m["grid"], "syncs_per_step": 2, "sync_us": grid_sync_cost() * 1e6,
            "products_us": products * 1e6, "products_bound": _bound(m["products"], dtype),
            "cell_us": cell * 1e6, "cell_bound": _bound(m["cell"], dtype), "syncs_us": syncs * 1e6,
            "per_call_us": per_call * 1e6, "total_us": total * 1e6, "largest": max(terms, key=terms.get),
            "l2_bytes_step": m["products"]["l2"] + m["cell"]["l2"], "hbm_bytes_step": m["products"]["hbm"] + m["cell"]["hbm"],
            "per_step_graph_us": predict(s, dtype)["graph"] * 1e6, "target_us": target,
            "meets_target": None if target is None else total * 1e6 <= target, "config": m["config"]}


def predict_persistent_bwd(s: Shape, dtype: str) -> Dict[str, float]:
    """A persistent BACKWARD, modelled only (not built; design in docs/persistent.md): today's two
    backward kernels as the two phases of one launch — the cell-backward's row blocks, a grid sync,
    the gates-backward's tiles (``dh_{t-1} = (d_h ⊙ dG) @ W_hh``, ``dĥ_{t-1}``), a grid sync — with
    the weights and per-step buffers in L2 as in :func:`persistent_model`, and the post-loop
    weight-gradient GEMMs as today. µs per step, beside today's backward (CUDA graph)."""
    p = PEAKS
    km = kernel_model_bwd(s, dtype)
    cell, gates = km["cell_bwd"], dict(km["gates_bwd"])
    gates["programs"] = min(gates["programs"], p["sms"])
    if recurrent_param_elems(s) * DTYPE_BYTES[dtype] <= L2_RESIDENT_SHARE * p["l2_bytes"]:
        gates["hbm"] = 0.0  # the weights and the carried gradients stay in L2 (the cell-backward's
        # first touches — each step's saved tensors read, its gradient buffers written — remain)
    pb = predict_bwd(s, dtype)
    loop = _kernel_time(cell, dtype, 0.0) + _kernel_time(gates, dtype, 0.0) + (2 * s.T - 1) / s.T * grid_sync_cost()
    return {"loop_us": loop * 1e6, "post_us": pb["post_us"], "total_us": loop * 1e6 + pb["post_us"],
            "per_step_total_us": pb["total_us"]}


def persistent_shapes() -> List[Shape]:
    """The model's shapes, plus the two target shapes without layer norm (FlashRNN's published
    kernel is a plain LSTM)."""
    from dataclasses import replace

    extra = [replace(s, name=s.name + " noLN", layer_norm=False) for s in SHAPES
             if any(name == s.name for name, _ in PERSISTENT_TARGETS)]
    return list(SHAPES) + extra


def rows_persistent(shapes: Optional[Sequence[Shape]] = None, dtypes: Sequence[str] = ("fp32", "bf16")) -> List[Dict]:
    out = []
    for s in (persistent_shapes() if shapes is None else shapes):
        for dt in dtypes:
            pr = predict_persistent(s, dt)
            target = PERSISTENT_TARGETS.get((s.name.replace(" noLN", ""), dt))
            pr.update(target_us=target, meets_target=None if target is None else pr["total_us"] <= target)
            out.append({"shape": s.name, "dtype": dt, **asdict(s), **pr})
    return out


def format_table_persistent(rs: Sequence[Dict]) -> str:
    head = ["shape", "dtype", "B", "grid", "syncs/step", "products µs", "bound", "cell µs", "bound", "syncs µs",
            "per call µs", "pred µs/step", "per-step kernels µs (graph)", "target µs"]
    lines = [[r["shape"], r["dtype"] + (" (tf32)" if r["dtype"] == "fp32" else ""), str(r["B"]), str(r["grid"]),
              str(r["syncs_per_step"]), f"{r['products_us']:.2f}", r["products_bound"], f"{r['cell_us']:.2f}",
              r["cell_bound"], f"{r['syncs_us']:.2f}", f"{r['per_call_us']:.2f}", f"{r['total_us']:.1f}",
              f"{r['per_step_graph_us']:.1f}",
              "-" if r["target_us"] is None else f"{r['target_us']:.0f} ({'met' if r['meets_target'] else 'missed'})"]
             for r in rs]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda vals: "  ".join(x.rjust(w) for x, w in zip(vals, widths))  # noqa: E731
    return "\n".join(
        ["HyperLSTM Triton persistent forward (backend triton_persistent), per timestep of one cell (modelled, not "
         "measured; same assumed H100 peaks; inference)",
         f"assumed: one grid sync = {PEAKS['grid_sync_round_trips']} dependent L2 round trips = "
         f"{grid_sync_cost() * 1e6:.2f} µs (release fence, arrival, detecting poll; FlashRNN's 4.76 µs/step with two "
         "grid syncs bounds it above by 2.4 µs); recurrent weights, state and scratch stay in L2 across steps when the "
         f"weights take at most {L2_RESIDENT_SHARE:.0%} of it", fmt(head), fmt(["-" * w for w in widths])]
        + [fmt(l) for l in lines]
        + ["products = the per-step gates kernel's tiles, cell = its cell kernel's row blocks (the same helpers and "
           "block sizes), per call = the hoisted GEMM, one launch and one read of the error flag, amortised over T; "
           "bound = the phase's largest term (its dependent round trips, L2 or HBM bandwidth, FLOPs)."])


# --------------------------------------------------------------------------------------------
# backward (BPTT): kernels/hyper_lstm_bwd.py, two launches per step (four in recompute mode)
# --------------------------------------------------------------------------------------------

def flops_per_step_bwd(s: Shape) -> Dict[str, float]:
    """Backward FLOPs per step: the reverse loop (gates-backward GEMMs, d regeneration, dz, the
    dĥ += dz @ z_weight product, elementwise) and the post-loop weight-gradient GEMMs (amortised)."""
    B, X, H, Hh, E = s.B, s.X, s.H, s.Hh, s.E
    gates = 2 * B * 4 * H * H + 2 * B * 4 * Hh * (H + Hh)  # dh_{t-1}, dĥ_{t-1}
    cell = 16 * B * H * E + 24 * B * H * E + 2 * B * NUM_PATHS * E * Hh + 60 * B * (H + Hh)
    post = (2 * 2 * B * X * 4 * (H + Hh)  # dx, d[weight_ih ; hyper_weight_ih[:, :X]]
            + 2 * B * 4 * Hh * (H + Hh) + 2 * B * 4 * H * H  # d hyper recurrent weights, d weight_hh
            + 2 * B * NUM_PATHS * E * Hh + 2 * B * NUM_PATHS * H * E + 10 * B * (H + Hh))  # z_weight, d_weight, LN, biases
    return {"loop": gates + cell, "post": post, "total": gates + cell + post}


def saved_bytes_per_step(s: Shape, mode: str = "full") -> int:
    """Bytes kept between forward and backward per step (all samples): ``full`` = the states
    (h, c, ĥ, ĉ), P, G, Â, z and XP (fp32); ``states`` (recompute mode) = the states only."""
    B, H, Hh, E = s.B, s.H, s.Hh, s.E
    states = (2 * H + 2 * Hh) * 4
    per_sample = states if mode == "states" else states + (4 * H + 4 * H + 4 * Hh + NUM_PATHS * E + 4 * H + 4 * Hh) * 4
    return B * per_sample


def kernel_model_bwd(s: Shape, dtype: str) -> Dict[str, Dict[str, float]]:
    """Per backward kernel: programs, FLOPs, bytes issued (``l2``), first-touch bytes (``hbm``)
    and the dependent round trips of one program (same conventions as :func:`kernel_model`)."""
    from hyperkern.ops.hyper_lstm.fused_triton import choose_bwd_configs

    wb, f4 = DTYPE_BYTES[dtype], 4
    B, H, Hh, E, ln = s.B, s.H, s.Hh, s.E, s.layer_norm
    g, c = choose_bwd_configs(B)
    # launch 1: cell-backward (row-owning) -------------------------------------------------------
    n_c = cdiv(B, c.BMC)
    ln_vecs = lambda n: (10 * n * wb if ln else 0)  # noqa: E731
    reads = lambda n: (3 if ln else 1)  # noqa: E731  passes over the pre-gates (stats, B, C)
    main_in = B * (4 * H * f4 * (reads(H) + 1) + 2 * 4 * H * f4 + 3 * H * f4 * (3 if ln else 1) + 2 * H * f4)
    main_out = B * (4 * H * f4 * 3 + H * f4 + (4 * H * f4 + H * f4 if ln else 0))  # DA, DXP, DWH, dc; DG, DCN
    hyp_in = B * (4 * Hh * f4 * (reads(Hh) + 0) + 3 * Hh * f4 * (3 if ln else 1) + 2 * Hh * f4)
    hyp_out = B * (4 * Hh * f4 + Hh * f4 + (4 * Hh * f4 + Hh * f4 if ln else 0) + Hh * f4)  # dÂ, dĉ; DG, DCN; dĥ scratch
    par = (NUM_PATHS * H * E + NUM_PATHS * E * Hh) * wb + ln_vecs(H) + ln_vecs(Hh)
    cell = {
        "programs": n_c,
        "flops": 16 * B * H * E + 24 * B * H * E + 2 * B * NUM_PATHS * E * Hh + 60 * B * (H + Hh),
        "l2": main_in + main_out + hyp_in + hyp_out + n_c * par + B * NUM_PATHS * E * f4 * (2 + cdiv(Hh, c.BN)),
        "hbm": B * (4 * H * f4 * 3 + 2 * H * f4 + 2 * H * f4 + NUM_PATHS * E * f4 + 4 * Hh * f4 + 4 * Hh * f4)  # G,P,XP,c's,dh/dc,z,Â,..
               + main_out + hyp_out + par,
        "chain_hbm": cdiv(H, c.BN),
        "chain_l2": ((5 if ln else 2) * cdiv(H, c.BN) + (5 if ln else 1) * cdiv(Hh, c.BN)
                     + cdiv(Hh, c.BN) * cdiv(NUM_PATHS * E, c.BZ) + cdiv(H, c.BN) * E * 0.2 + 4 * 0.5),
    }
    # launch 2: gates-backward (tiled GEMM) --------------------------------------------------------
    n_bt, n_cols = cdiv(B, g.BM), cdiv(H, g.BN) + cdiv(Hh, g.BN)
    weights = (4 * H * H + 4 * Hh * H + 4 * Hh * Hh) * wb
    gates = {
        "programs": n_cols * n_bt,
        "flops": 2 * B * 4 * H * H + 2 * B * 4 * Hh * (H + Hh),
        "l2": n_bt * weights + cdiv(H, g.BN) * B * 4 * (H + Hh) * f4 + cdiv(Hh, g.BN) * B * 4 * Hh * f4
              + 2 * B * (H + Hh) * f4,
        "hbm": weights + 2 * B * (H + Hh) * f4,
        "chain_hbm": 2, "chain_l2": 0,
    }
    return {"cell_bwd": cell, "gates_bwd": gates, "configs": {"cell_bwd": asdict(c), "gates_bwd": asdict(g)}}


def predict_bwd(s: Shape, dtype: str) -> Dict[str, float]:
    """Predicted backward µs per step (CUDA graph launches): the reverse loop, the post-loop GEMMs
    amortised over T, and the recompute mode (the forward kernels once more per step)."""
    p = PEAKS
    km = kernel_model_bwd(s, dtype)
    fl = flops_per_step_bwd(s)
    loop = sum(_kernel_time(km[k], dtype, p["launch_graph"]) for k in ("cell_bwd", "gates_bwd"))
    B, H, Hh, E, T = s.B, s.H, s.Hh, s.E, s.T
    post_bytes = T * B * (4 * (4 * H + 4 * Hh) * 3 + 4 * 4 * H * 4 + NUM_PATHS * E * 4 + (2 * H + 2 * Hh) * 4 * 2)
    post = (8 * p["launch_host"] + max(post_bytes / p["hbm_bw"], T * fl["post"] / p["flops"][MODEL_DOT[dtype]])) / T
    fwd = kernel_model(s, dtype)
    re = sum(_kernel_time(fwd[k], dtype, p["launch_graph"]) for k in ("gates", "cell"))
    return {"loop_us": loop * 1e6, "post_us": post * 1e6, "total_us": (loop + post) * 1e6,
            "dropout_us": dropout_us(s, km["configs"]["cell_bwd"]["BMC"]),
            "recompute_total_us": (loop + post + re) * 1e6,
            "cell_bwd_us": _kernel_time(km["cell_bwd"], dtype, p["launch_graph"]) * 1e6,
            "gates_bwd_us": _kernel_time(km["gates_bwd"], dtype, p["launch_graph"]) * 1e6}


def rows_bwd(shapes: Sequence[Shape] = SHAPES, dtypes: Sequence[str] = ("fp32", "bf16")) -> List[Dict]:
    """One backward row per (shape, dtype): FLOPs, bytes, launches, saved bytes, predicted time."""
    out = []
    for s in shapes:
        for dt in dtypes:
            km = kernel_model_bwd(s, dt)
            fl = flops_per_step_bwd(s)
            pr = predict_bwd(s, dt)
            out.append({"shape": s.name, "dtype": dt, **asdict(s), "flops_step": fl["total"],
                        "flops_loop_step": fl["loop"],
                        "model_bytes_step": km["cell_bwd"]["hbm"] + km["gates_bwd"]["hbm"],
                        "l2_bytes_step": km["cell_bwd"]["l2"] + km["gates_bwd"]["l2"],
                        "launches_step": launches_per_step(s, dt)[1],
                        "launches_step_recompute": sum(launches_per_step(s, dt)),
                        "saved_bytes_step": saved_bytes_per_step(s, "full"),
                        "saved_bytes_step_recompute": saved_bytes_per_step(s, "states"),
                        "pred_us_step": pr["total_us"], "pred_us_step_recompute": pr["recompute_total_us"],
                        "cell_bwd_us": pr["cell_bwd_us"], "gates_bwd_us": pr["gates_bwd_us"],
                        "post_us": pr["post_us"], "dropout_us": pr["dropout_us"], "configs": km["configs"]})
    return out


def format_table_bwd(rs: Sequence[Dict]) -> str:
    head = ["shape", "dtype", "B", "GFLOP/step", "model MB/step", "L2 MB/step", "launch/step", "saved KB/step",
            "saved KB/step (recompute)", "pred µs/step", "pred µs/step (recompute)", "cell_bwd µs", "gates_bwd µs",
            "post-loop µs", "+ seeded dropout µs"]
    lines = [[r["shape"], r["dtype"], str(r["B"]), f"{r['flops_step'] / 1e9:.3f}", f"{r['model_bytes_step'] / 1e6:.2f}",
              f"{r['l2_bytes_step'] / 1e6:.2f}", f"{r['launches_step']} ({r['launches_step_recompute']})",
              f"{r['saved_bytes_step'] / 1e3:.1f}", f"{r['saved_bytes_step_recompute'] / 1e3:.1f}",
              f"{r['pred_us_step']:.1f}", f"{r['pred_us_step_recompute']:.1f}", f"{r['cell_bwd_us']:.1f}",
              f"{r['gates_bwd_us']:.1f}", f"{r['post_us']:.1f}", f"{r['dropout_us']:.1f}"] for r in rs]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda vals: "  ".join(x.rjust(w) for x, w in zip(vals, widths))  # noqa: E731
    return "\n".join(["HyperLSTM Triton backward (BPTT), per timestep of one cell (modelled, not measured; "
                       "same assumed H100 peaks; CUDA-graph launches)", fmt(head), fmt(["-" * w for w in widths])]
                     + [fmt(l) for l in lines]
                     + ["saved = bytes kept from forward to backward for all B samples (fp32); post-loop = the "
                        "weight-gradient GEMMs amortised over T; recompute adds the two forward kernels per step; "
                        "seeded dropout: the cell-backward kernel draws the step's masks again (recompute: twice)."])


def format_table(rs: Sequence[Dict]) -> str:
    measured = any(r.get("measured_us") is not None for r in rs)
    head = ["shape", "dtype", "X", "H", "Hh", "E", "B", "GFLOP/step", "min MB/step", "model MB/step", "ratio",
            "L2 MB/step",
            "launch/step", "pred µs/step graph", "pred µs/step host", "gates µs", "cell µs", "+ seeded dropout µs"]
    if measured:
        head += ["measured µs/step", "measured/pred(host)"]
    lines = []
    for r in rs:
        v = [r["shape"], r["dtype"] + (" (tf32)" if r["dtype"] == "fp32" else ""), str(r["X"]), str(r["H"]),
             str(r["Hh"]), str(r["E"]), str(r["B"]), f"{r['flops_step'] / 1e9:.3f}",
             f"{r['min_bytes_step'] / 1e6:.2f}", f"{r['model_bytes_step'] / 1e6:.2f}", f"{r['bytes_ratio']:.2f}",
             f"{r['l2_bytes_step'] / 1e6:.2f}",
             str(r["launches_step"]), f"{r['pred_us_graph']:.1f}", f"{r['pred_us_host']:.1f}",
             f"{r['gates_us']:.1f}", f"{r['cell_us']:.1f}", f"{r['dropout_us']:.1f}"]
        if measured:
            m = r.get("measured_us")
            v += ["-" if m is None else f"{m:.1f}", "-" if m is None else f"{m / r['pred_us_host']:.2f}"]
        lines.append(v)
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda vals: "  ".join(x.rjust(w) for x, w in zip(vals, widths))  # noqa: E731
    p = PEAKS
    note = ("measured on this machine's GPU; predictions assume an H100 SXM" if measured else
            "modelled, not measured: no CUDA device here, every GPU figure below is a prediction")
    out = [f"HyperLSTM Triton forward, per timestep of one cell ({note})",
           f"assumed peaks: HBM {p['hbm_bw'] / 1e12:.2f} TB/s, L2 {p['l2_bytes'] / 1e6:.0f} MB, {p['sms']} SMs, "
           f"tf32 {p['flops']['tf32'] / 1e12:.0f} / bf16 {p['flops']['bf16'] / 1e12:.0f} TFLOP/s dense, launch "
           f"{p['launch_graph'] * 1e6:.0f} µs (CUDA graph) / {p['launch_host'] * 1e6:.0f} µs (host), "
           f"round trip {p['latency'] * 1e6:.1f} µs HBM / {p['latency_l2'] * 1e6:.1f} µs L2, per SM "
           f"{p['sm_bw'] / 1e9:.0f} GB/s HBM / {p['sm_l2_bw'] / 1e9:.0f} GB/s L2, L2 {p['l2_bw'] / 1e12:.1f} TB/s",
           fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines]
    out.append("min MB = compulsory HBM traffic (recurrent weights once, the step's x-projections, state in/out, "
               "output); model MB = HBM traffic of the two kernels (the excess is the P/G/Â/z scratch written back "
               "once); L2 MB = every load and store issued. Weights are counted from HBM every step although they "
               "fit in L2 for every row here (a lower real figure is possible).")
    out.append("+ seeded dropout = what the cell kernel's Philox pass adds per step when recurrent dropout is on "
               f"(training; {PHILOX_OPS} integer ops per mask element on one SM per program, plus the mask scratch "
               "round trip through L2); inference never pays it.")
    out.append("reference: cuDNN's plain LSTM (no hyper cell) at H=768, B=16 runs ~2.0 µs/step on an H100 "
               "(2.01 ms for T=1024, published by FlashRNN's authors).")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# static generation (hyperkern.ops.static_gen): one launch forward, a few backward
# --------------------------------------------------------------------------------------------

def static_generation(layer_shapes: Sequence[Tuple[int, int]], z_dim: int = 64, hidden: int = 64,
                      block: Tuple[int, int] = (16, 16), kernel_size: int = 3, precision: str = "fp32",
                      bias: bool = True, layer_list: bool = True) -> Dict[str, float]:
    """FLOPs, bytes and predicted H100 time of one full generation, forward and backward.

    ``precision``: "fp32" (ieee dots, the default for fp32 inputs), "tf32", "fp16", "bf16", "fp64".
    Forward: FLOPs = 2 per multiply-add of the embedding GEMM (``E x Nz -> N_in*d``) and the output
    GEMM (``E*N_in x d -> N_out*k*k``); minimum bytes = every generated weight written once + every
    input read once, which is also what the kernel moves (the weights are read from L2 by each
    program). Backward (this implementation): the flat gradient is read twice (dA, then dw_out),
    A and dA go through ``[E, N_in, d]`` scratch (written and read once each), and the gradients
    are written once; minimum = gradient read once + inputs read + gradients written. Launches:
    the two backward kernels and the two fixed-order sums of the dw_out/db_out split partials (and
    their casts for 16-bit inputs), plus,
    for a layer list, autograd's one concatenation of the layers' gradients (``layer_list``: the
    gradient written and read once more).
    Predicted time = max(bytes / HBM bandwidth, FLOPs / peak) + launches x a host launch
    (:data:`PEAKS`): at these sizes every roofline term is a few microseconds, so the launch
    latency dominates.
    """
    from hyperkern.ops.static_gen.common import count_tiles

    n_out, n_in = block
    kk = kernel_size * kernel_size
    n_cols = n_out * kk
    E = count_tiles(layer_shapes, block)
    W = E * n_out * n_in * kk  # generated weights
    rows = E * n_in
    gemm_in, gemm_out = 2 * rows * hidden * z_dim, 2 * rows * hidden * n_cols
    inputs = E * z_dim + n_in * hidden * z_dim + n_cols * hidden + ((n_in * hidden + n_cols) if bias else 0)
    b = DTYPE_BYTES[precision]
    peak = PEAKS["flops"][precision]
    fwd_flops, fwd_bytes = gemm_in + gemm_out, (W + inputs) * b
    bwd_flops = 3 * gemm_in + 2 * gemm_out  # A recomputed, dz, dw_in; dA, dw_out
    bwd_min_bytes = (W + 2 * inputs) * b
    bwd_bytes = (2 * W + 4 * rows * hidden + 2 * inputs + (2 * W if layer_list else 0)) * b
    bwd_launches = 4 + (2 if b == 2 else 0) + (1 if layer_list else 0)  # 16-bit: the summed partials are cast
    hbm, launch = PEAKS["hbm_bw"], PEAKS["launch_host"]
    t = lambda flops, nbytes, launches: max(nbytes / hbm, flops / peak) + launches * launch  # noqa: E731
    return {
        "tiles": E, "generated_weights": W, "precision": precision,
        "fwd_flops": fwd_flops, "fwd_min_bytes": fwd_bytes, "fwd_launches": 1,
        "fwd_t_mem_us": fwd_bytes / hbm * 1e6, "fwd_t_flop_us": fwd_flops / peak * 1e6,
        "fwd_predicted_us": t(fwd_flops, fwd_bytes, 1) * 1e6,
        "bwd_flops": bwd_flops, "bwd_min_bytes": bwd_min_bytes, "bwd_bytes": bwd_bytes, "bwd_launches": bwd_launches,
        "bwd_t_mem_us": bwd_bytes / hbm * 1e6, "bwd_t_flop_us": bwd_flops / peak * 1e6,
        "bwd_predicted_us": t(bwd_flops, bwd_bytes, bwd_launches) * 1e6,
    }



def main() -> int:
    print(format_table(rows()))
    print()
    print(format_table_persistent(rows_persistent()))
    print()
    print(format_table_bwd(rows_bwd()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
