"""Configs as data: every launch the dispatchers can make is exactly what the compile check compiles.

The launch tables (``hyperkern/ops/hyper_lstm/fused_triton/configs.py``,
``hyperkern/ops/static_gen/configs.py``) are read by the launchers and by ``python -m hyperkern
compile-check``. Here, independently of the tables' own enumeration (``all_launches``):

- every batch size up to past the last table row, every embedding size the backend takes, every
  dtype, dot precision, layer-norm and dropout mode (HyperLSTM), every hidden size, dtype, dot
  precision and bias combination (static generation) is swept through the launchers' own
  functions, and the set of launches equals the set the compile check builds (constexprs, absent
  inputs, warps, stages, register cap), computed in a process with the interpreter off;
- real launches (under the interpreter) are captured and must be in that set: the launchers do
  read the table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import cell_params, count_launches, masks_to, sequence_inputs

triton = pytest.importorskip("triton")

from hyperkern.ops.hyper_lstm.common import CellConfig  # noqa: E402
from hyperkern.ops.precision import DTYPE_NAMES  # noqa: E402
from hyperkern.ops.hyper_lstm.fused_triton import configs as lstm_configs  # noqa: E402
from hyperkern.ops.static_gen import configs as static_configs  # noqa: E402


def _key(kernel, dtype, constexprs: dict, num_warps, num_stages, maxnreg):
    return (kernel, dtype, tuple(sorted((n, repr(v)) for n, v in constexprs.items())), num_warps, num_stages, maxnreg)


def _launch_key(launch):
    cx = {**dict(launch.constexprs), **{n: None for n in launch.absent}}
    return _key(launch.kernel, launch.dtype, cx, launch.num_warps, launch.num_stages, launch.maxnreg)


@pytest.fixture(scope="module")
def compiled():
    """The compile check's configurations (without its ints=1 extras), built with the interpreter off."""
    code = ("import json\nfrom hyperkern.compile_check import LAUNCH_TABLES, _all_configs\n"
            "print(json.dumps([[c.kernel, c.name.split()[0], sorted((n, repr(v)) for n, v in c.constexprs.items()),"
            " c.num_warps, c.num_stages, c.maxnreg] for c in _all_configs(LAUNCH_TABLES) if not c.name.endswith('ints=1')]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout.splitlines()[-1])
    keys = [(k, dt, tuple(tuple(p) for p in cx), w, s, r) for k, dt, cx, w, s, r in rows]
    assert len(keys) == len(set(keys)), "the compile check builds a configuration twice"
    return set(keys)


def test_hyper_lstm_launchable_equals_compiled(compiled):
    swept = set()
    batches = list(range(1, lstm_configs.batch_edges()[-1] + 40)) + [1000, 4096]
    for dtype in lstm_configs.DTYPES:
        for dot in lstm_configs.DOTS[dtype]:
            for ln in (True, False):
                for drop in lstm_configs.DROPOUT_MODES:
                    for B in batches:
                        swept.update(_launch_key(l) for l in lstm_configs.forward_launches(B, dtype, dot, ln, drop))
                        swept.add(_launch_key(lstm_configs.persistent_launch(B, dtype, dot, ln, drop)))
                        for E in range(1, lstm_configs.MAX_EMBED + 1):
                            swept.update(_launch_key(l) for l in
                                         lstm_configs.backward_launches(B, E, dtype, dot, ln, drop))
    mine = {k for k in compiled if k[0].startswith("hyper_lstm")}
    assert swept == mine, (sorted(swept - mine)[:3], sorted(mine - swept)[:3])
    assert {k[0] for k in swept} == {"hyper_lstm_gates_kernel", "hyper_lstm_cell_kernel", "hyper_lstm_cell_bwd_kernel",
                                     "hyper_lstm_gates_bwd_kernel", "hyper_lstm_persistent_kernel"}
    stages = {k[4] for k in swept}
    assert stages == {1, 2, 3}  # every num_stages the tables use is compiled with it
    assert {dict(k[2])["BE"] for k in swept if "BE" in dict(k[2])} == {repr(b) for b in lstm_configs.BE_BUCKETS}
    with pytest.raises(ValueError, match="embed_size"):
        lstm_configs.backward_launches(4, lstm_configs.MAX_EMBED + 1, "fp32", "ieee", True, 0)


def test_static_launchable_equals_compiled(compiled):
    swept = set()
    for dtype in static_configs.DTYPES:
        for dot in static_configs.DOTS[dtype]:
            for d in range(1, static_configs.MAX_BLOCK_D + 1):
                for b_in in (True, False):
                    for b_out in (True, False):
                        for k in static_configs.KERNELS:
                            swept.add(_launch_key(static_configs.launch(k, d, dtype, dot, b_in, b_out)))
    mine = {k for k in compiled if k[0].startswith("static_gen")}
    assert swept == mine, (sorted(swept - mine)[:3], sorted(mine - swept)[:3])
    with pytest.raises(ValueError, match="hidden size"):
        static_configs.launch(static_configs.KERNELS[0], static_configs.MAX_BLOCK_D + 1, "fp32", "ieee", True)


def _captured_keys(monkeypatch, kernels):
    """Wrap each kernel's ``run`` to record the key of every real launch."""
    import inspect

    keys = []
    for fn in kernels:
        sig = inspect.signature(getattr(fn, "fn", fn))  # the Python function (JIT or interpreted)
        constexpr_names = {n for n, p in sig.parameters.items() if "constexpr" in str(p.annotation)}

        def run(*args, _orig=fn.run, _fn=fn, _cx=constexpr_names, **kw):
            assert not args, f"{_fn.__name__} launched with positional arguments"
            cx = {n: v for n, v in kw.items() if n in _cx or (v is None and n in _fn.arg_names)}
            param = next(kw[n] for n in ("w_hh_ptr", "dw_ptr", "z_ptr") if kw.get(n) is not None)
            keys.append(_key(_fn.__name__, DTYPE_NAMES[param.dtype], cx, kw["num_warps"], kw["num_stages"],
                             kw.get("maxnreg")))
            return _orig(*args, **kw)

        monkeypatch.setattr(fn, "run", run)
    return keys


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("layer_norm, dropout", [(True, "seeded"), (False, None)])
def test_real_launches_are_compiled_configurations(compiled, monkeypatch, layer_norm, dropout):
    """A training step through the launcher and a static generation: every launch (keyword
    arguments only) is one of the compiled configurations."""
    from hyperkern import static_kernel_gen
    from hyperkern.kernels import hyper_lstm_bwd as kb
    from hyperkern.kernels import hyper_lstm_fwd as kf
    from hyperkern.kernels import static_gen as ks
    from hyperkern.ops.hyper_lstm import fused_triton

    keys = _captured_keys(monkeypatch, (kf.hyper_lstm_gates_kernel, kf.hyper_lstm_cell_kernel,
                                        kb.hyper_lstm_cell_bwd_kernel, kb.hyper_lstm_gates_bwd_kernel,
                                        ks.static_gen_fwd_kernel, ks.static_gen_bwd_rows_kernel,
                                        ks.static_gen_bwd_weights_kernel))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = CellConfig(input_size=3, hidden_size=9, hyper_size=5, embed_size=3, layer_norm=layer_norm)
    x, st, masks = sequence_inputs(cfg, 2, 2, 5, dropout=0.3 if dropout else 0.0, seeded=True)
    masks = masks_to(masks, dev, torch.float32)
    p = {n: v.to(dev, torch.float32).requires_grad_() for n, v in cell_params(cfg, 6).items()}
    out, fin = fused_triton.hyper_lstm_sequence(x.to(dev, torch.float32), tuple(s.to(dev, torch.float32) for s in st),
                                                p, cfg, None, masks)
    torch.autograd.grad(out.sum() + fin[1].sum(), list(p.values()))
    g = torch.Generator().manual_seed(7)
    z, w_in, w_out = (torch.randn(*s, generator=g).to(dev).requires_grad_() for s in ((2, 3), (2, 5, 3), (4 * 4, 5)))
    static_kernel_gen(z, w_in, None, w_out, None, kernel_size=2, backend="triton").sum().backward()
    assert len(keys) == 2 * 2 + 2 * 2 + 3
    missing = [k for k in keys if k not in compiled]
    assert not missing, missing


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("layer_norm, dropout, B", [(True, "seeded", 2), (False, None, 40)])
def test_persistent_launches_are_compiled_configurations(compiled, monkeypatch, layer_norm, dropout, B):
    """A training step through the persistent backend: its one forward launch (cooperative, keyword
    arguments only) and the backward's launches are all compiled configurations."""
    from hyperkern.kernels import hyper_lstm_bwd as kb
    from hyperkern.kernels import hyper_lstm_persistent as kp
    from hyperkern.ops.hyper_lstm.fused_triton import persistent

    keys = _captured_keys(monkeypatch, (kp.hyper_lstm_persistent_kernel, kb.hyper_lstm_cell_bwd_kernel,
                                        kb.hyper_lstm_gates_bwd_kernel))
    coop = []
    real = kp.hyper_lstm_persistent_kernel.run
    monkeypatch.setattr(kp.hyper_lstm_persistent_kernel, "run",
                        lambda *a, **kw: coop.append(kw["launch_cooperative_grid"]) or real(*a, **kw))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = CellConfig(input_size=3, hidden_size=9, hyper_size=5, embed_size=3, layer_norm=layer_norm)
    x, st, masks = sequence_inputs(cfg, 2, B, 5, dropout=0.3 if dropout else 0.0, seeded=True)
    masks = masks_to(masks, dev, torch.float32)
    p = {n: v.to(dev, torch.float32).requires_grad_() for n, v in cell_params(cfg, 6).items()}
    out, fin = persistent.hyper_lstm_sequence(x.to(dev, torch.float32), tuple(s.to(dev, torch.float32) for s in st),
                                              p, cfg, None, masks)
    torch.autograd.grad(out.sum() + fin[1].sum(), list(p.values()))
    assert coop == [True] and len(keys) == 1 + 2 * 2
    assert [k[0] for k in keys][0] == "hyper_lstm_persistent_kernel"
    missing = [k for k in keys if k not in compiled]
    assert not missing, missing


def test_launch_counter_sees_keyword_launches(monkeypatch):
    """conftest's launch counter (used by the launch-per-step tests) still sees every launch."""
    from hyperkern.kernels import hyper_lstm_fwd as kf
    from hyperkern.ops.hyper_lstm import fused_triton

    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    counts = count_launches(monkeypatch, (kf.hyper_lstm_gates_kernel, kf.hyper_lstm_cell_kernel))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = CellConfig(input_size=2, hidden_size=5, hyper_size=3, embed_size=1)
    x, st, _ = sequence_inputs(cfg, 3, 1, 8)
    f32 = lambda t: t.to(dev, torch.float32)  # noqa: E731
    with torch.no_grad():
        fused_triton.hyper_lstm_sequence(f32(x), tuple(map(f32, st)), {n: f32(v) for n, v in cell_params(cfg, 9).items()},
                                         cfg)
    assert counts == ["hyper_lstm_gates_kernel", "hyper_lstm_cell_kernel"] * 3
