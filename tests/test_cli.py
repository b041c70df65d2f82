"""The command line (``python -m hyperkern info|verify``) and ``hyperkern.verify`` itself: it passes
a correct backend, and it FAILS (non-zero exit) on a backend that is wrong in any one way."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from hyperkern import verify
from hyperkern.ops import hyper_lstm as op
from hyperkern.ops.hyper_lstm import naive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = torch.float64


def _cli(*args, timeout=180):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as a user would run it
    return subprocess.run([sys.executable, "-m", "hyperkern", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_info():
    r = _cli("info")
    assert r.returncode == 0, r.stderr
    assert "hyperkern" in r.stdout and "torch" in r.stdout
    assert "HyperLSTM backends (auto: first usable of triton, torch):" in r.stdout
    assert "static generation backends (auto: first usable of triton, torch):" in r.stdout
    assert "fp32 dots on CUDA: ieee" in r.stdout  # PyTorch's default matmul flag: full-precision fp32
    for name in op.BACKENDS:
        assert f"  {name} " in r.stdout


def test_cli_verify_torch_backend_passes_and_prints_table():
    r = _cli("verify", "--backend", "torch")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("backend"))
    for col in ("config", "dtype", "out", "state", "grads", "result"):
        assert col in lines[header]
    rows = [l for l in lines[header + 2:] if l.startswith("torch ")]
    # every configuration in every dtype the registry gives the torch backend, each a PASS with
    # gradients checked, against the table's tolerance (printed in the header)
    assert len(rows) == 4 * len(verify.CONFIGS), r.stdout
    assert "cpu bf16 bf16 8e-02/2e-01" in r.stdout and "cpu fp32 ieee 1e-05/1e-04" in r.stdout
    for dt in ("fp64", "fp32", "fp16", "bf16"):
        assert sum(f" {dt} " in l for l in rows) == len(verify.CONFIGS)
    assert all(l.rstrip().endswith("PASS") for l in rows), r.stdout
    assert "FAIL" not in r.stdout
    assert "fwd only" not in r.stdout


def test_cli_verify_unknown_backend_is_an_error():
    r = _cli("verify", "--backend", "nope", timeout=60)
    assert r.returncode != 0
    assert "nope" in r.stderr


# --- verify must FAIL on a wrong backend ------------------------------------------------------

def _cells(line):
    """A table row's columns (columns are separated by 2+ spaces; config names by single ones)."""
    return re.split(r"\s{2,}", line.strip())


def _broken(kind):
    """A "torch" backend that is the reference with exactly one thing wrong."""
    def fn(x, state, params, cfg, lengths=None, masks=None, **options):  # options: the calling convention's keywords
        if kind == "ignores_forget_bias":
            cfg = replace(cfg, forget_bias=1.0)
        if kind == "ignores_lengths":
            lengths = None
        if kind == "ignores_masks":
            masks = None
        if kind == "ln_eps_off_by_1pct" and cfg.layer_norm:
            cfg = replace(cfg, ln_eps=cfg.ln_eps * 1.01)
        if kind == "drops_h0_grad":  # the initial h's gradient is silently lost
            state = (state[0].detach(), *state[1:])
        out, st = naive.hyper_lstm_sequence(x, state, params, cfg, lengths, masks)
        if kind == "output_off_by_1e-7":
            out = out * (1 + 1e-7)
        if kind == "final_c_hat_off":
            st = (*st[:3], st[3] * (1 + 1e-6))
        if kind == "grads_scaled":  # forward bit-identical, every gradient through out 1.00001x
            out = out + (out - out.detach()) * 1e-5
        return out, st
    return fn


@pytest.fixture
def patch_torch_backend(monkeypatch):
    real = op.get_backend

    def install(fn):
        monkeypatch.setattr(op, "get_backend", lambda name: fn if name == "torch" else real(name))
    return install


# kind -> configs (by name) that must FAIL; every other config must still PASS
BROKEN = {
    "output_off_by_1e-7": None,  # all
    "final_c_hat_off": None,
    "grads_scaled": None,
    "ignores_forget_bias": {"no_ln fb=0.3", "ln fb=-0.5 eps=0.02", "2L bidir lengths fb=0.6"},
    "ignores_lengths": {"2L bidir lengths fb=0.6", "no_ln lengths", "packed bidir"},
    "ignores_masks": {"rdrop train 2L"},
    "ln_eps_off_by_1pct": {c.name for c in verify.CONFIGS if c.layer_norm},
    "drops_h0_grad": None,
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_verify_fails_on_a_broken_backend(kind, patch_torch_backend, capsys):
    patch_torch_backend(_broken(kind))
    rc = verify.main(backends=["torch"], dtypes=[F64])
    out = capsys.readouterr().out
    assert rc == 1, out
    rows = {_cells(l)[1]: l for l in out.splitlines() if l.startswith("torch ")}
    assert set(rows) == {c.name for c in verify.CONFIGS}
    must_fail = BROKEN[kind] or set(rows)
    for name, line in rows.items():
        if name in must_fail:
            assert "FAIL" in line, f"{kind}: config {name!r} should FAIL\n{out}"
        else:
            assert line.rstrip().endswith("PASS"), f"{kind}: config {name!r} should PASS\n{out}"


def test_verify_grad_only_bug_is_reported_on_gradients(patch_torch_backend, capsys):
    patch_torch_backend(_broken("grads_scaled"))
    verify.main(backends=["torch"], dtypes=[F64], configs=verify.CONFIGS[:1])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("torch "))
    cells = _cells(line)
    # out and state errors tiny (forward is exact), the grads column shows the 1e-5 error
    assert float(cells[3]) <= 1e-12 and float(cells[4]) <= 1e-12 and float(cells[5]) > 1e-6, line
    assert "grad" in line and "FAIL" in line


def test_verify_forward_only_backend_is_checked_forward_only(patch_torch_backend, capsys):
    def forward_only(x, state, params, cfg, lengths=None, masks=None, **options):  # options: the calling convention's keywords
        if torch.is_grad_enabled() and any(p.requires_grad for p in params.values()):
            raise NotImplementedError("this backend does not support training (forward only)")
        return naive.hyper_lstm_sequence(x, state, params, cfg, lengths, masks)

    patch_torch_backend(forward_only)
    rc = verify.main(backends=["torch"], dtypes=[F64], configs=verify.CONFIGS[:3])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [l for l in out.splitlines() if l.startswith("torch ")]
    assert len(rows) == 3 and all("PASS (fwd only)" in l for l in rows), out


def test_verify_crashing_backend_is_a_fail_not_a_crash(patch_torch_backend, capsys):
    def crashing(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    patch_torch_backend(crashing)
    rc = verify.main(backends=["torch"], dtypes=[F64], configs=verify.CONFIGS[:2])
    out = capsys.readouterr().out
    assert rc == 1
    assert out.count("FAIL") >= 2 and "kernel exploded" in out


def test_verify_triton_backend_in_process(capsys):
    ok, why = op.backend_status("triton") if "triton" in op.BACKENDS else (False, "no triton backend")
    if not ok:
        pytest.skip(f"triton backend not available: {why}")
    rc = verify.main(backends=["triton"], dtypes=[torch.float32], configs=verify.TINY_CONFIGS[:2])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "triton" in out
