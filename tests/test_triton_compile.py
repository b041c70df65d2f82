"""Compile check of the HyperLSTM forward kernels on a representative subset (no GPU needed).

``python -m hyperkern compile-check`` compiles every launch the dispatcher can make for sm_80 and
sm_90; this runs the same command on the heaviest configurations of each kernel (largest tiles,
most registers) and checks its verdicts.
"""
from __future__ import annotations

import pytest

from conftest import run_compile_check

pytest.importorskip("triton")


def _subset():
    """The heaviest forward configurations of each kernel, named from the dispatcher's own table."""
    from hyperkern.ops.hyper_lstm.fused_triton import configs

    edges = configs.batch_edges()
    picks = (
        (edges[-1], "fp32", "tf32", True, 0, 0),   # gates: largest fp32 tile
        (edges[1], "fp32", "ieee", True, 0, 0),    # gates: fp32 on the CUDA cores
        (edges[1], "bf16", "bf16", True, 0, 0),    # gates: most registers (sm_90)
        (1, "fp32", "ieee", True, 2, 1),           # cell: longest rows per program, seeded dropout
        (edges[-1], "bf16", "bf16", False, 1, 1),  # cell: most rows per program, mask tensors
    )
    return tuple(f"{l.kernel} [{l.label}]" for l in
                 (configs.forward_launches(B, dt, dot, ln, drop)[which] for B, dt, dot, ln, drop, which in picks))


def test_compile_check_subset(tmp_path):
    SUBSET = _subset()
    rows, stdout = run_compile_check(SUBSET, tmp_path)
    assert len(rows) == 2 * len(SUBSET)  # each filter matches exactly one config, for sm_80 and sm_90
    assert {(r["kernel"], r["config"]) for r in rows} == {tuple(f[:-1].split(" [")) for f in SUBSET}
    assert {r["arch"] for r in rows} == {80, 90}
    for r in rows:
        assert r["error"] is None
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255
        assert r["shared"] <= {80: 166_912, 90: 232_448}[r["arch"]]
    assert "hyper_lstm_cell_kernel" in stdout and "0 failed" in stdout
