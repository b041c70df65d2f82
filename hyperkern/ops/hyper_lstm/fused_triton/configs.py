"""Launch configurations of the HyperLSTM Triton kernels, as data: the one table that the launcher,
the compile check (``python -m hyperkern compile-check``) and the performance model read.

A configuration depends on the batch size only (every loop over H, Hh and the embeddings runs in
chunks, so every H and Hh is covered), plus the modes a call needs:

- the parameters' dtype ("fp32", "fp16", "bf16") and, for fp32, the dot precision ("tf32" or
  "ieee", :mod:`hyperkern.ops.precision`);
- ``LAYER_NORM`` and ``DROPOUT`` (0 off, 1 given mask tensors, 2 seeded), constexprs of the cell
  kernels; an input a mode does not use is passed as ``None`` (listed in :attr:`Launch.absent`);
- the backward's ``BE``, the embedding size padded to a bucket of :data:`BE_BUCKETS`.

:func:`forward_launches` and :func:`backward_launches` are what the launcher calls;
:func:`all_launches` enumerates everything they can return (and the compile check compiles exactly
that set — ``tests/test_triton_configs.py`` checks the two are equal).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from hyperkern.ops.launches import Launch
from hyperkern.ops.precision import triton_input_precision

FWD, BWD = "hyperkern.kernels.hyper_lstm_fwd", "hyperkern.kernels.hyper_lstm_bwd"  # the kernels' modules
PERSIST = "hyperkern.kernels.hyper_lstm_persistent"
DTYPES = ("fp32", "fp16", "bf16")
DOTS = {"fp32": ("tf32", "ieee"), "fp16": ("fp16",), "bf16": ("bf16",)}  # hyperkern.ops.precision names
DROPOUT_MODES = (0, 1, 2)  # off, given mask tensors, seeded


@dataclass(frozen=True)
class GatesConfig:
    BM: int  # batch rows per program
    BH: int  # columns per gate per program (a tile covers 4 * BH gate-interleaved columns)
    BK: int  # reduction chunk
    num_warps: int
    num_stages: int  # software-pipeline depth of the K loop (tl.dot operand loads)


@dataclass(frozen=True)
class CellKernelConfig:
    BMC: int  # batch rows per program (the program owns whole rows)
    BN: int  # column chunk over H (and Hh)
    BZ: int  # z outputs per chunk
    BKZ: int  # reduction chunk of z = ĥ @ z_weight^T
    num_warps: int
    num_stages: int  # software-pipeline depth of the chunk loops (the kernel's PIPE constexpr too)


@dataclass(frozen=True)
class GatesBwdConfig:
    BM: int  # batch rows per program
    BN: int  # output columns (of dh_{t-1} or dĥ_{t-1}) per program
    BK: int  # reduction chunk (over 4H, 4Hh)
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class CellBwdConfig:
    BMC: int  # batch rows per program (owns whole rows)
    BN: int  # column chunk over H (and Hh)
    BZ: int  # reduction chunk over the 12E embeddings (dĥ += dz @ z_weight)
    num_warps: int
    num_stages: int = 1  # the chunk loops are not pipelined


@dataclass(frozen=True)
class PersistentConfig:
    """The persistent forward (one launch per sequence): its products phase tiles like the gates
    kernel, its cell phase walks row blocks like the cell kernel; one warp count for both."""
    BM: int  # products: batch rows per tile
    BH: int  # products: columns per gate per tile
    BK: int  # products: reduction chunk
    BMC: int  # cell: batch rows per row block (owns whole rows)
    BN: int  # cell: column chunk over H (and Hh)
    BZ: int  # cell: z outputs per chunk
    BKZ: int  # cell: reduction chunk of z = ĥ @ z_weight^T
    PIPE: int  # cell: software-pipeline depth of the chunk loops
    num_warps: int
    num_stages: int  # the products' K loop (tl.dot operand loads)

    def phases(self) -> Tuple["GatesConfig", "CellKernelConfig"]:
        """The two phases as the per-step kernels' configurations (what the performance model reads)."""
        return (GatesConfig(self.BM, self.BH, self.BK, self.num_warps, self.num_stages),
                CellKernelConfig(self.BMC, self.BN, self.BZ, self.BKZ, self.num_warps, self.PIPE))


# (largest batch size the row applies to, config); the last row applies to every larger batch.
GATES_TABLE: Tuple[Tuple[Optional[int], GatesConfig], ...] = (
    (16, GatesConfig(BM=16, BH=16, BK=32, num_warps=4, num_stages=3)),
    # BK 16: at BK 32 ptxas caps this tile at 168 registers and spills 8-12 B with Triton 3.6
    (32, GatesConfig(BM=32, BH=16, BK=16, num_warps=4, num_stages=3)),
    (None, GatesConfig(BM=64, BH=16, BK=32, num_warps=8, num_stages=3)),
)
CELL_TABLE: Tuple[Tuple[Optional[int], CellKernelConfig], ...] = (
    (32, CellKernelConfig(BMC=1, BN=256, BZ=64, BKZ=64, num_warps=8, num_stages=2)),
    (128, CellKernelConfig(BMC=2, BN=64, BZ=64, BKZ=16, num_warps=4, num_stages=1)),  # 2 stages: ptxas spills 4-8 B on sm_90 (half)
    (None, CellKernelConfig(BMC=4, BN=32, BZ=32, BKZ=16, num_warps=4, num_stages=2)),
)
GATES_BWD_TABLE: Tuple[Tuple[Optional[int], GatesBwdConfig], ...] = (
    # BK 16: at BK 32 Triton 3.6's ptxas capped the bf16 tile at 80 registers on sm_90a and spilled 4 B
    (16, GatesBwdConfig(BM=16, BN=32, BK=16, num_warps=4, num_stages=3)),
    (32, GatesBwdConfig(BM=32, BN=64, BK=32, num_warps=4, num_stages=3)),
    (None, GatesBwdConfig(BM=64, BN=64, BK=32, num_warps=8, num_stages=3)),
)
# fp32 dots on the CUDA cores ("ieee"): narrower tiles (BN 64 spills 16-36 B on sm_90a)
GATES_BWD_TABLE_FMA: Tuple[Tuple[Optional[int], GatesBwdConfig], ...] = (
    (16, GatesBwdConfig(BM=16, BN=32, BK=32, num_warps=4, num_stages=3)),
    (32, GatesBwdConfig(BM=32, BN=32, BK=32, num_warps=4, num_stages=3)),
    (None, GatesBwdConfig(BM=64, BN=32, BK=32, num_warps=8, num_stages=3)),
)
CELL_BWD_TABLE: Tuple[Tuple[Optional[int], CellBwdConfig], ...] = (
    (32, CellBwdConfig(BMC=1, BN=128, BZ=16, num_warps=4)),
    (None, CellBwdConfig(BMC=2, BN=32, BZ=16, num_warps=4)),
)
# The persistent forward: the per-step tables' product tiles and cell row blocks (so it computes
# what the per-step kernels compute: the same helpers, blocks and order), one warp count for both
# phases (8: 255 registers x 256 threads fit one program per SM, its grid). One difference: past
# B = 32 the products take 32-row tiles, BK 16 (64 x 64 fp32 FMA tiles, at BK 32 or 16, spilled
# 12-40 B on sm_80 / sm_90a with Triton 3.6 and 3.9 as a call here). Longer cell chunks would
# shorten a step (fewer dependent passes: at 512, -0.5 us at H=768 in perf_model.predict_persistent)
# but sit at the 255-register cap and spilled 4-52 B in some modes (Triton 3.9, sm_80): not taken.
PERSISTENT_TABLE: Tuple[Tuple[Optional[int], PersistentConfig], ...] = (
    (16, PersistentConfig(BM=16, BH=16, BK=32, BMC=1, BN=256, BZ=64, BKZ=64, PIPE=2, num_warps=8, num_stages=3)),
    (32, PersistentConfig(BM=32, BH=16, BK=16, BMC=1, BN=256, BZ=64, BKZ=64, PIPE=2, num_warps=8, num_stages=3)),
    (128, PersistentConfig(BM=32, BH=16, BK=16, BMC=2, BN=64, BZ=64, BKZ=16, PIPE=1, num_warps=8, num_stages=3)),
    (None, PersistentConfig(BM=32, BH=16, BK=16, BMC=4, BN=32, BZ=32, BKZ=16, PIPE=2, num_warps=8, num_stages=3)),
)

# The backward cell kernel accumulates dz for all E embeddings of a path in registers: E padded to
# the next bucket (a power of two: tl.arange). Larger embeddings run on the torch backend.
BE_BUCKETS = (4, 16, 64)
MAX_EMBED = BE_BUCKETS[-1]

# Triton's JIT turns an integer argument equal to 1 into a constexpr: the compile check also builds
# each kernel with these set to 1 (B = 1, Hh = 1, E = 1, one column tile ...).
UNIT_INTS = {
    "hyper_lstm_gates_kernel": ("B", "H", "Hh", "n_main"),
    "hyper_lstm_cell_kernel": ("B", "H", "Hh", "E"),
    "hyper_lstm_cell_bwd_kernel": ("B", "H", "Hh", "E"),
    "hyper_lstm_gates_bwd_kernel": ("B", "H", "Hh", "n_main"),
    "hyper_lstm_persistent_kernel": ("B", "H", "Hh", "E"),
}

# Register budget of both cell kernels and the persistent forward (Triton's ``maxnreg``). Left alone,
# ptxas on sm_90 picks 96 registers for some cell configurations and spills 4-28 B to stay there (an
# occupancy heuristic).
# The cell kernels launch cdiv(B, BMC) programs: at most an H100's 132 SMs up to B = 528 (forward)
# / 264 (backward), where occupancy cannot matter; beyond, the 4-warp configurations used there
# still fit 2 blocks per SM at 255 registers (an SM has 64K). The persistent forward's 8 warps at 255
# registers (65,280) fit one program per SM, which is the grid it is launched with. Not tuned on a GPU.
CELL_MAXNREG = 255

# inputs each mode leaves out (passed as None)
_LN_PARAMS = ("ln_w_ptr", "ln_b_ptr", "lnc_w_ptr", "lnc_b_ptr", "hln_w_ptr", "hln_b_ptr", "hlnc_w_ptr", "hlnc_b_ptr")
_LN_BWD_OUT = ("dg_ptr", "dcn_ptr", "hdg_ptr", "hdcn_ptr")


def _pick_row(table, B: int):
    if B < 1:
        raise ValueError(f"batch size must be positive, got {B}")
    for max_b, conf in table:
        if max_b is None or B <= max_b:
            return conf
    raise AssertionError("unreachable: the last table row has no bound")


def choose_configs(B: int) -> Tuple[GatesConfig, CellKernelConfig]:
    """The forward dispatcher: block configurations of both kernels for a batch of B."""
    return _pick_row(GATES_TABLE, B), _pick_row(CELL_TABLE, B)


def choose_persistent_config(B: int) -> PersistentConfig:
    """The persistent forward's block configuration for a batch of B."""
    return _pick_row(PERSISTENT_TABLE, B)


def backward_dot(dtype: str, dot: str) -> str:
    """The gates-backward kernel's dot: fp32 gradients times the weights upcast to fp32, so fp32
    follows the policy and 16-bit inputs use TF32 (finer than their own 7-10 bits)."""
    return dot if dtype in ("fp32", "fp64") else "tf32"


def choose_bwd_configs(B: int, dot: str = "tf32") -> Tuple[GatesBwdConfig, CellBwdConfig]:
    """The backward dispatcher (batch size, and whether the gates-backward dots are fp32 FMAs)."""
    table = GATES_BWD_TABLE_FMA if triton_input_precision(dot) == "ieee" else GATES_BWD_TABLE
    return _pick_row(table, B), _pick_row(CELL_BWD_TABLE, B)


def embed_bucket(E: int) -> int:
    """BE for embedding size E (ValueError past :data:`MAX_EMBED`)."""
    for be in BE_BUCKETS:
        if E <= be:
            return be
    raise ValueError(f"embed_size must be at most {MAX_EMBED} on the triton backend, got {E}")


def _dropout_absent(dropout: int, names: Tuple[str, ...]) -> Tuple[str, ...]:
    if dropout not in DROPOUT_MODES:
        raise ValueError(f"dropout mode must be one of {DROPOUT_MODES}, got {dropout!r}")
    return (names if dropout == 0 else ()) + (("seed_ptr",) if dropout != 2 else ())


def forward_launches(B: int, dtype: str, dot: str, layer_norm: bool, dropout: int) -> Tuple[Launch, Launch]:
    """(gates kernel, cell kernel) launches of a forward step for a batch of B."""
    g, c = choose_configs(B)
    gates = Launch("hyper_lstm_gates_kernel", FWD, dtype,
                   (("BM", g.BM), ("BH", g.BH), ("BK", g.BK), ("DOT_PRECISION", triton_input_precision(dot))),
                   g.num_warps, g.num_stages)
    absent = (() if layer_norm else _LN_PARAMS) + _dropout_absent(dropout, ("m_ptr", "mh_ptr"))
    cell = Launch("hyper_lstm_cell_kernel", FWD, dtype,
                  (("LAYER_NORM", bool(layer_norm)), ("DROPOUT", dropout), ("BMC", c.BMC), ("BN", c.BN),
                   ("BZ", c.BZ), ("BKZ", c.BKZ), ("PIPE", c.num_stages)),
                  c.num_warps, c.num_stages, CELL_MAXNREG, absent)
    return gates, cell


def persistent_launch(B: int, dtype: str, dot: str, layer_norm: bool, dropout: int) -> Launch:
    """The one launch of a persistent forward over a whole sequence (a cooperative launch: the
    driver refuses a grid that cannot be resident at once instead of letting it deadlock)."""
    c = choose_persistent_config(B)
    absent = (() if layer_norm else _LN_PARAMS) + _dropout_absent(dropout, ("m_ptr", "mh_ptr"))
    return Launch("hyper_lstm_persistent_kernel", PERSIST, dtype,
                  (("LAYER_NORM", bool(layer_norm)), ("DROPOUT", dropout),
                   ("BM", c.BM), ("BH", c.BH), ("BK", c.BK), ("DOT_PRECISION", triton_input_precision(dot)),
                   ("BMC", c.BMC), ("BN", c.BN), ("BZ", c.BZ), ("BKZ", c.BKZ), ("PIPE", c.PIPE)),
                  c.num_warps, c.num_stages, CELL_MAXNREG, absent, cooperative=True)


def backward_launches(B: int, E: int, dtype: str, dot: str, layer_norm: bool,
                      dropout: int) -> Tuple[Launch, Launch]:
    """(cell-backward kernel, gates-backward kernel) launches of a reverse step."""
    dot = backward_dot(dtype, dot)
    g, c = choose_bwd_configs(B, dot)
    absent = (() if layer_norm else _LN_PARAMS + _LN_BWD_OUT) + _dropout_absent(dropout, ("m_ptr", "mh_ptr"))
    cell = Launch("hyper_lstm_cell_bwd_kernel", BWD, dtype,
                  (("LAYER_NORM", bool(layer_norm)), ("DROPOUT", dropout), ("BMC", c.BMC), ("BN", c.BN),
                   ("BE", embed_bucket(E)), ("BZ", c.BZ)),
                  c.num_warps, c.num_stages, CELL_MAXNREG, absent)
    gates = Launch("hyper_lstm_gates_bwd_kernel", BWD, dtype,
                   (("BM", g.BM), ("BN", g.BN), ("BK", g.BK), ("DOT_PRECISION", triton_input_precision(dot))),
                   g.num_warps, g.num_stages)
    return cell, gates


def batch_edges() -> List[int]:
    """One batch size per row of every table (its bound, and one past the last bound)."""
    tables = (GATES_TABLE, CELL_TABLE, GATES_BWD_TABLE, GATES_BWD_TABLE_FMA, CELL_BWD_TABLE, PERSISTENT_TABLE)
    bounds = {b for table in tables for b, _ in table if b}
    return sorted(bounds | {max(bounds) + 1})


def all_launches() -> List[Launch]:
    """Every launch :func:`forward_launches`, :func:`backward_launches` and :func:`persistent_launch`
    can return (each once)."""
    seen: Dict[Launch, None] = {}
    for dtype in DTYPES:
        for dot in DOTS[dtype]:
            for ln in (True, False):
                for drop in DROPOUT_MODES:
                    for B in batch_edges():
                        for launch in forward_launches(B, dtype, dot, ln, drop):
                            seen.setdefault(launch)
                        seen.setdefault(persistent_launch(B, dtype, dot, ln, drop))
                        for E in BE_BUCKETS:
                            for launch in backward_launches(B, E, dtype, dot, ln, drop):
                                seen.setdefault(launch)
    return list(seen)


def all_kernel_configs() -> Tuple[List[GatesConfig], List[CellKernelConfig]]:
    """Every forward block configuration (the tables' rows)."""
    return [c for _, c in GATES_TABLE], [c for _, c in CELL_TABLE]


def all_bwd_kernel_configs() -> Tuple[List[GatesBwdConfig], List[CellBwdConfig]]:
    return [c for t in (GATES_BWD_TABLE, GATES_BWD_TABLE_FMA) for _, c in t], [c for _, c in CELL_BWD_TABLE]


__all__ = ["Launch", "forward_launches", "backward_launches", "persistent_launch", "all_launches", "choose_configs",
           "choose_bwd_configs", "choose_persistent_config",
           "embed_bucket", "batch_edges", "MAX_EMBED", "CELL_MAXNREG"]
