"""``python -m hyperkern gpu-check``: its dry run (the same code at tiny sizes on CPU under Triton's
interpreter) passes end to end, covers what the issue lists, and fails on a planted bug.

On a GPU the command runs the CUDA-only sections too; they are skipped here, each with its reason
in the JSON (the reasoning for why they pass on a GPU: the graph section captures exactly what
tests/test_triton_forward.py::test_time_loop_captures_in_a_cuda_graph does, the 2^31 section
reuses the launchers whose in-kernel offsets are int64 or host-side pointers, the timing section
only measures).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hyperkern import gpu_check
from hyperkern.ops import hyper_lstm as lstm_op
from hyperkern.ops.hyper_lstm import naive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path (on a GPU: run it)")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run from the command line, as CI runs it (no TRITON_INTERPRET in the environment:
    the command sets it)."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "hyperkern", "gpu-check", "--dry-run", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return res, json.loads((out / "gpu-check.json").read_text())


def test_dry_run_passes_and_writes_every_section(dry_run):
    res, result = dry_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert list(result["sections"]) == list(gpu_check.SECTIONS)
    for name, sec in result["sections"].items():
        if name in gpu_check.CUDA_ONLY:
            assert sec["skipped"] == f"dry run on CPU: {gpu_check.CUDA_ONLY[name]}"
        else:
            assert sec["skipped"] is None and sec["rows"] and sec["failed"] == 0 and not sec["not_run"], name
    assert result["failed"] == 0 and result["dry_run"] is True
    last = res.stdout.strip().splitlines()
    assert "PASS" in next(line for line in last if line.startswith("gpu-check"))
    assert last[-1].startswith("wrote ")


def test_dry_run_covers_every_kind_of_case(dry_run):
    _, result = dry_run
    rows = result["sections"]["correctness"]["rows"]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"lstm", "lstm_guarded", "static"}
    lstm = [r for r in rows if r["kind"] == "lstm"]
    assert len({r["name"] for r in lstm}) >= 30
    assert {(r["dtype"], r["dot"]) for r in rows} == set(gpu_check.dot_modes(True))
    assert all(r["ok"] for r in rows)
    persistent = [r for r in rows if r.get("backend") == "triton_persistent"]  # issue 13
    assert {r["kind"] for r in persistent} == {"lstm", "lstm_guarded"} and len(persistent) >= 4
    assert any("persistent" in r["name"] for r in result["sections"]["determinism"]["rows"])
    assert {r["name"] for r in result["sections"]["compile"]["rows"]} == {
        "HyperLSTM under torch.compile(inductor, fullgraph=True), forward and backward",
        "static generation under torch.compile(inductor, fullgraph=True), forward and backward"}


def test_random_shapes_cover_the_issue_list():
    from hyperkern.ops.hyper_lstm.fused_triton import configs

    cfgs = gpu_check.lstm_configs()
    assert len(cfgs) >= 30
    assert {c.E for c in cfgs} == set(range(1, 9))
    edges = {b for b in configs.batch_edges()[:-1]}
    assert edges | {e + 1 for e in edges} <= {c.B for c in cfgs}
    assert any(c.X == 1 for c in cfgs)
    assert {c.layer_norm for c in cfgs} == {True, False}
    assert any(c.lengths for c in cfgs) and any(c.recurrent_dropout > 0 for c in cfgs)
    assert any(c.layers == 2 and c.bidirectional for c in cfgs)
    assert all(c.H % 2 == 1 and c.Hh % 2 == 1 for c in cfgs)  # odd: nothing is a multiple of a block
    from hyperkern.ops.precision import MAX_REDUCTION, MAX_STEPS

    assert all(c.T <= MAX_STEPS and 4 * c.H <= MAX_REDUCTION for c in cfgs)  # inside the tolerance table's domain
    assert gpu_check.dot_modes(False) == [("fp32", "tf32"), ("fp32", "ieee"), ("fp16", "fp16"), ("bf16", "bf16")]


def test_a_planted_hyper_lstm_bug_fails_the_check(monkeypatch, tmp_path):
    """The reference with the forget bias ignored, handed out as the Triton backend: FAIL rows and
    a non-zero exit status."""
    from dataclasses import replace

    real = lstm_op.get_backend

    def wrong(x, state, params, cfg, lengths=None, masks=None, **options):  # options: the calling convention's keywords
        return naive.hyper_lstm_sequence(x, state, params, replace(cfg, forget_bias=cfg.forget_bias + 0.1),
                                         lengths, masks)

    monkeypatch.setattr(lstm_op, "get_backend", lambda name: wrong if name == "triton" else real(name))
    result = gpu_check.run(str(tmp_path), dry_run=True, sections=["correctness"], workers=1, max_cases=3)
    rows = result["sections"]["correctness"]["rows"]
    assert result["failed"] > 0 and any(not r["ok"] and r["kind"] == "lstm" for r in rows)
    assert json.loads((tmp_path / "gpu-check.json").read_text())["failed"] == result["failed"]


def test_a_planted_static_bug_fails_the_check(monkeypatch, tmp_path):
    """The fused kernel's output with one element changed: the static rows FAIL."""
    from hyperkern.ops.static_gen import fused_triton

    real = fused_triton.forward_flat

    def off_by_one_element(*args, **kwargs):
        flat = real(*args, **kwargs)
        flat[-1] += 1.0
        return flat

    monkeypatch.setattr(fused_triton, "forward_flat", off_by_one_element)
    specs = [s for s in gpu_check.case_specs(True) if s["kind"] == "static"][:2]
    rows = [gpu_check.run_case(s) for s in specs]
    assert all(not r["ok"] for r in rows), rows


def test_case_errors_are_rows_not_crashes():
    row = gpu_check.run_case(dict(kind="static", shape=dict(name="bad"), dtype="fp32", dot="exact", seed=0))
    assert row["ok"] is False and "KeyError" in row["note"] and row["name"] == "bad"


def test_needs_cuda_or_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "hyperkern", "gpu-check", "--out", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--dry-run" in res.stderr


def test_persistent_cases_on_a_gpu():
    """On a GPU the persistent backend is checked at every other fuzz shape in fp32 (TF32) and bf16,
    and in two guarded runs; gpu-check's budgets still add up to its total."""
    specs = gpu_check.case_specs(False)
    p = [s_ for s_ in specs if s_.get("backend") == "triton_persistent"]
    assert len([s_ for s_ in p if s_["kind"] == "lstm"]) == gpu_check.N_LSTM_SHAPES
    assert {s_["dtype"] for s_ in p} == {"fp32", "bf16"} and sum(s_["kind"] == "lstm_guarded" for s_ in p) == 2
    assert sum(gpu_check.BUDGET_S.values()) <= gpu_check.TOTAL_BUDGET_S - 15


def test_summary_prints_the_timing_table():
    row = dict(shape="PTB (paper)", dtype="fp32", fwd_eager_us=30.0, fwd_graph_us=15.0, pred_fwd_graph_us=14.0,
               fwd_graph_over_pred=15 / 14, fwdbwd_eager_us=90.0, fwdbwd_graph_us=60.0, pred_fwdbwd_graph_us=58.0,
               fwdbwd_graph_over_pred=60 / 58, lstm_fwd_us=3.0, lstm_fwdbwd_us=9.0, ok=True,
               fwd_eager_host_us=29.0, fwd_graph_host_us=0.4, fwdbwd_eager_host_us=88.0, fwdbwd_graph_host_us=0.9,
               fwd_eager_jit_host_us=41.5, persist_fwd_host_us=0.6, persist_fwd_us=12.5, persist_fwdbwd_us=70.0,
               pred_persist_us=11.6, persist_over_pred=12.5 / 11.6, persist_fell_back=False)
    result = {"environment": {"gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6.0"}, "dry_run": False,
              "seconds": 300, "failed": 0,
              "sections": {"timing": {"rows": [row], "not_run": [], "budget_s": 70, "seconds": 20, "skipped": None}}}
    text = gpu_check.format_summary(result)
    assert "NVIDIA H200" in text and "PASS" in text and "PTB (paper)" in text and " 1.07 " in text
    assert " 29/30 " in text and " 0/15 " in text and " 88/90 " in text and " 41.5 " in text  # host / device
    assert "persistent forward" in text and " 1/12 " in text and " 11.6 " in text


def test_seed_tape_replays_the_models_draws_on_another_device():
    """verify's seed tape: the seeds a model draws (on its device) are replayed, in order, to the
    reference on another device (gpu-check's CPU reference for a CUDA model)."""
    from hyperkern.ops.hyper_lstm.dropout import DropoutSeed
    from hyperkern.verify import _SeedTape

    tape = _SeedTape()
    with tape.record():
        drawn = [DropoutSeed.draw(0.3, "cpu").seed for _ in range(3)]
    with tape.replay():
        again = [DropoutSeed.draw(0.3, "cpu").seed for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(drawn, again))
    assert len({int(s) for s in drawn}) == 3
    fresh = DropoutSeed.draw(0.3, "cpu").seed  # the real draw is back
    assert not any(torch.equal(fresh, s) for s in drawn)


def test_dry_run_runs_the_mechanisms_and_the_autocast_step(dry_run):
    """Issue 18: every mechanism that runs on the CPU is run and bitwise the eager loop
    (``make_graphed_callables`` needs CUDA: said so), the verdict row is there (undecided in a
    dry run), and the autocast training step passes in bf16 and fp16 (with GradScaler)."""
    _, result = dry_run
    rows = result["sections"]["mechanisms"]["rows"]
    shape = next(r for r in rows if "mechanisms" in r)
    ms = shape["mechanisms"]
    assert list(ms) == list(gpu_check.MECHANISMS)
    for name in ("eager_jit", "eager_bound", "graph_cache", "compile_reduce_overhead"):
        assert ms[name]["bitwise"] is True and ms[name]["fwd_host_us"] > 0 and ms[name]["fwdbwd_host_us"] > 0, name
    assert ms["graph_cache"]["replayed"] > 0
    assert "needs CUDA" in ms["graphed_callables"]["note"] and "bitwise" not in ms["graphed_callables"]
    verdict = rows[-1]
    assert verdict["verdict"] == "not decided" and verdict["name"] == "graph cache: not decided"
    auto = result["sections"]["autocast"]["rows"]
    assert [r["dtype"] for r in auto] == ["bf16", "fp16"] and all(r["ok"] for r in auto)
    assert all(r["out_dtype"] == "float32" for r in auto)  # the CPU policy: the parameters' dtype
    assert "GradScaler" in auto[1]["name"]


def _mech(fwd, fwdbwd, host=1.0, bitwise=True, **extra):
    return dict(fwd_us=fwd, fwd_host_us=host, fwdbwd_us=fwdbwd, fwdbwd_host_us=host, bitwise=bitwise, **extra)


def _shape_row(name, cache, graphed, compiled):
    return dict(name=name, mechanisms={"eager_bound": _mech(50, 150), "graph_cache": dict(cache, replayed=6),
                                       "graphed_callables": graphed, "compile_reduce_overhead": compiled})


@pytest.mark.parametrize("case, verdict", [
    ("wins_everywhere", "make default"), ("loses_everywhere", "remove"), ("mixed", "keep opt-in"),
    ("not_bitwise", "remove"), ("shape_not_run", "keep opt-in"), ("pytorch_failed", "keep opt-in")])
def test_the_graph_cache_verdict_follows_the_measurements(case, verdict):
    """make default: faster than both PyTorch mechanisms (by the margin) at every shape, forward
    and forward+backward, bitwise; remove: never faster, or not bitwise; keep opt-in otherwise,
    including incomplete evidence."""
    fast, slow = _mech(10, 30), _mech(20, 60)
    rows = {
        "wins_everywhere": [_shape_row("a", fast, slow, slow), _shape_row("b", fast, slow, slow)],
        "loses_everywhere": [_shape_row("a", slow, fast, slow), _shape_row("b", _mech(10, 30), _mech(9.8, 29), slow)],
        "mixed": [_shape_row("a", fast, slow, slow), _shape_row("b", slow, fast, fast)],
        "not_bitwise": [_shape_row("a", dict(fast, bitwise=False), slow, slow)],
        "shape_not_run": [_shape_row("a", fast, slow, slow), dict(name="b fp32", not_run=True, ok=True)],
        "pytorch_failed": [_shape_row("a", fast, dict(error="RuntimeError: capture"), slow)],
    }[case]
    v = gpu_check.graph_cache_verdict(rows)
    assert v["verdict"] == verdict and v["name"] == f"graph cache: {verdict}" and v["ok"] is True, v
    assert "person" in v["note"]
    # the host side counts: a cache whose host time per step is over both mechanisms' does not win
    if case == "wins_everywhere":
        hosty = [_shape_row("a", _mech(10, 30, host=80.0), slow, slow)]
        assert gpu_check.graph_cache_verdict(hosty)["verdict"] == "remove"


def test_summary_prints_the_mechanisms_table_and_the_verdict():
    rows = [_shape_row("PTB (paper) fp32", _mech(10, 30, host=0.5), _mech(12, 35), _mech(11, 33))]
    rows[0].update(shape="PTB (paper)")
    rows.append(gpu_check.graph_cache_verdict(rows))
    result = {"environment": {"gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6.0"}, "dry_run": False,
              "seconds": 300, "failed": 0,
              "sections": {"mechanisms": {"rows": rows, "not_run": [], "budget_s": 60, "seconds": 20, "skipped": None}}}
    text = gpu_check.format_summary(result)
    assert "graph_cache" in text and "compile_reduce_overhead" in text and " 0.5/10.0 " in text
    assert "graph cache: make default" in text
