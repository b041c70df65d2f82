"""Compile check of the HyperLSTM forward kernels on a representative subset (no GPU needed).

``python -m hyperkern compile-check`` compiles every configuration the dispatcher can choose for
sm_80 and sm_90 (54 compiles, ~75 s on 2 cores); this runs the same command on the heaviest
configurations of each kernel (largest tiles, most registers) and checks its verdicts.
"""
from __future__ import annotations

import pytest

from conftest import run_compile_check

pytest.importorskip("triton")


def _subset():
    """The heaviest configurations of each kernel, named from the dispatcher's own tables."""
    from hyperkern.ops.hyper_lstm.fused_triton import all_kernel_configs

    gates, cells = all_kernel_configs()
    g_big, g_mid, c_row, c_big = gates[-1], gates[len(gates) // 2], cells[0], cells[-1]
    return (
        f"hyper_lstm_gates_kernel [fp32 BM{g_big.BM} BH{g_big.BH} BK{g_big.BK}]",  # largest fp32 tile
        f"hyper_lstm_gates_kernel [bf16 BM{g_mid.BM} BH{g_mid.BH} BK{g_mid.BK}]",  # most registers (sm_90)
        f"hyper_lstm_cell_kernel [fp32 BMC{c_row.BMC} BN{c_row.BN} LN]",  # longest rows per program
        f"hyper_lstm_cell_kernel [bf16 BMC{c_big.BMC} BN{c_big.BN} noLN]",
    )


def test_compile_check_subset(tmp_path):
    SUBSET = _subset()
    rows, stdout = run_compile_check(SUBSET, tmp_path)
    assert len(rows) == 2 * len(SUBSET)  # each filter matches exactly one config, for sm_80 and sm_90
    assert {r["arch"] for r in rows} == {80, 90}
    for r in rows:
        assert r["error"] is None
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255
        assert r["shared"] <= {80: 166_912, 90: 232_448}[r["arch"]]
    assert "hyper_lstm_cell_kernel" in stdout and "0 failed" in stdout
