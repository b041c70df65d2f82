"""The generic compile-check runner (hyperkern.compile_check) and the static-generation kernels' configs.

``python -m hyperkern compile-check`` compiles every launch of the registered tables for sm_80 and
sm_90; here: the parsing and verdict logic on known ptxas output, a deliberately spilling kernel
(the check must fail it), the static kernels' heaviest configurations (must pass), and that every
table types every argument (tests/test_triton_configs.py: the launchable set equals the compiled one).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import run_compile_check
from hyperkern import compile_check as cc

pytest.importorskip("triton")

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'static_gen_fwd_kernel' for 'sm_80'
ptxas info    : Function properties for static_gen_fwd_kernel
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 436 bytes cmem[0]
"""


def test_parse_ptxas_log_and_verdicts():
    info = cc.parse_ptxas_log(PTXAS_LOG)
    assert info == {"registers": 255, "stack_frame": 16, "spill_stores": 8, "spill_loads": 12}
    row = {"kernel": "k", "config": "c", "arch": 80, "num_warps": 4, "error": None, "shared": 1024, **info}
    assert cc.problems(row) == ["spills 8 B stores / 12 B loads"]
    clean = {**row, "spill_stores": 0, "spill_loads": 0, "stack_frame": 0}
    assert cc.problems(clean) == []
    assert cc.problems({**clean, "shared": 166_913}) == ["shared memory 166913 B > 166912 B"]
    assert cc.problems({**clean, "arch": 90, "shared": 166_913}) == []  # fits sm_90's 232,448 B
    assert cc.problems({**clean, "error": "CompilationError: boom"})[0].startswith("compile error")
    table = cc.format_table([row, clean])
    assert "FAIL: spills" in table and table.splitlines()[0].split()[:5] == ["kernel", "config", "arch", "warps", "regs"]
    with pytest.raises(ValueError, match="registers"):
        cc.parse_ptxas_log("ptxas fatal: nothing here")


SPILL_MODULE = '''
import triton
import triton.language as tl


@triton.jit
def spill_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)  # BLOCK / 32 = 512 values per thread on one warp, all live across the sum
    tl.store(y_ptr + offs, x * tl.sum(x, axis=0))


def compile_configs():
    from hyperkern.compile_check import CompileConfig

    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"}
    return [CompileConfig("fp32 B16384 1 warp", spill_kernel, sig, {"BLOCK": 16384}, num_warps=1, num_stages=1)]
'''


def test_a_spilling_kernel_fails_the_check(tmp_path, monkeypatch):
    (tmp_path / "cc_spill_mod.py").write_text(SPILL_MODULE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    rows = cc.run(archs=(80,), jobs=1, modules=["cc_spill_mod"])
    assert len(rows) == 1 and rows[0]["error"] is None, rows
    assert rows[0]["spill_stores"] > 0 and cc.problems(rows[0])


def _static_subset():
    """The heaviest static-generation launches, named from the launch table."""
    from hyperkern.ops.static_gen import configs

    return tuple(f"{l.kernel} [{l.label}]" for l in (
        configs.launch("static_gen_fwd_kernel", 64, "fp32", "ieee", True, True),  # the paper's WRN (Nz = d = 64)
        configs.launch("static_gen_bwd_rows_kernel", 128, "fp64", "fp64", True),  # most registers
        configs.launch("static_gen_bwd_weights_kernel", 128, "bf16", "bf16", False),  # largest tensor-core tile
    ))


def test_static_kernels_compile_without_spills(tmp_path):
    """The CLI on the heaviest static-generation configs, for sm_80 and sm_90."""
    subset = _static_subset()
    rows, stdout = run_compile_check(subset, tmp_path)
    assert sorted((r["kernel"], r["config"], r["arch"]) for r in rows) == sorted(
        (f.split(" [")[0], f.split(" [")[1].rstrip("]"), arch) for f in subset for arch in (80, 90))
    for r in rows:
        assert r["error"] is None and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255 and 0 < r["shared"] <= cc.SMEM_LIMIT[r["arch"]]
    assert "0 failed" in stdout


def test_no_matching_config_is_an_error():
    assert cc.main(["--filter", "no such kernel anywhere", "--arch", "80", "--jobs", "1"]) == 2


def test_every_registered_table_types_every_argument():
    """Every compile configuration of every launch table types every kernel argument, and every
    constexpr (absent inputs too) is typed "constexpr"."""
    code = textwrap.dedent("""
        from hyperkern.compile_check import LAUNCH_TABLES, _all_configs
        for m in LAUNCH_TABLES:
            cfgs = _all_configs([m])
            assert cfgs and all(set(c.signature) == set(c.fn.arg_names) for c in cfgs), m
            assert all(c.signature[n] == "constexpr" for c in cfgs for n in c.constexprs), m
        print("ok", len(LAUNCH_TABLES))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr
