"""``python -m hyperkern verify``: every available backend against the float64 reference.

For each backend (all available ones but ``"reference"``, or the requested ones) and each random
configuration (odd sizes, non-initial parameters, with and without layer norm, forget_bias != 1,
multi-layer, bidirectional, variable length, packed input, recurrent dropout in train mode), in
every dtype the backend registry says the backend computes in on its device (float64, float32,
float16; bfloat16 on CUDA), held to hyperkern.ops.precision's tolerance for that device, dtype and
dot precision (the table the test suite uses):

- build a float64 reference ``HyperLSTM`` with :func:`hyperkern.testing.randomize_` parameters,
  rounded to the dtype under test (so the comparison measures the backend's arithmetic only);
- run both on the same input and initial state, with a random upstream gradient on the output
  and on all four final-state tensors;
- compare outputs, final states and every gradient (input, initial state, each parameter) by
  max relative error: ``max |got - want| / max |want|``.

A backend that refuses gradients ("does not support training" / forward-only) is checked forward
only and its rows say ``fwd only``. One row per (backend, config, dtype); exit status 1 on any FAIL.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch.nn.utils.rnn import pack_padded_sequence

from .modules import HyperLSTM
from .ops import hyper_lstm as op
from .ops import precision
from .ops.hyper_lstm.dropout import DropoutSeed
from .testing import randomize_

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPES = (F64, F32, F16, BF16)  # each backend runs those the registry says it computes in on its device
_DT_NAME = precision.DTYPE_NAMES
_NO_TRAINING = re.compile(r"(forward[- ]only|(does not|doesn't|not|no) support\w* (for )?(training|backward|grad))",
                          re.IGNORECASE)


@dataclass(frozen=True)
class Config:
    name: str
    X: int
    H: int
    Hh: int
    E: int
    T: int
    B: int
    layers: int = 1
    bidirectional: bool = False
    layer_norm: bool = True
    forget_bias: float = 1.0
    ln_eps: float = 1e-3
    lengths: Optional[Sequence[int]] = None
    packed: bool = False
    recurrent_dropout: float = 0.0  # > 0: run in train mode with identically seeded masks
    dropout: float = 0.0
    batch_first: bool = False


CONFIGS: List[Config] = [
    Config("ln", 7, 33, 10, 3, 5, 3),
    Config("no_ln fb=0.3", 7, 33, 10, 3, 5, 3, layer_norm=False, forget_bias=0.3),
    Config("ln fb=-0.5 eps=0.02", 7, 33, 10, 3, 5, 3, forget_bias=-0.5, ln_eps=0.02),
    Config("2 layers", 7, 33, 10, 3, 5, 3, layers=2),
    Config("bidirectional", 7, 33, 10, 3, 5, 3, bidirectional=True),
    Config("2L bidir lengths fb=0.6", 5, 17, 9, 5, 6, 4, layers=2, bidirectional=True, forget_bias=0.6,
           lengths=(6, 2, 4, 1)),
    Config("no_ln lengths", 7, 33, 10, 3, 5, 3, layer_norm=False, lengths=(3, 5, 2)),
    Config("packed bidir", 6, 21, 7, 2, 5, 3, bidirectional=True, packed=True, lengths=(2, 5, 4)),
    Config("rdrop train 2L", 7, 33, 10, 3, 5, 3, layers=2, recurrent_dropout=0.25, dropout=0.2),
    Config("batch_first T1 B1", 7, 33, 10, 3, 1, 1, batch_first=True),
    Config("wider", 13, 65, 17, 5, 9, 5),
]
# The Triton interpreter runs every kernel launch in Python: keep its configurations tiny.
TINY_CONFIGS: List[Config] = [
    Config("tiny ln", 3, 5, 3, 2, 3, 2),
    Config("tiny no_ln fb=0.3", 3, 5, 3, 2, 3, 2, layer_norm=False, forget_bias=0.3),
    Config("tiny 2L bidir lengths", 3, 5, 3, 2, 3, 3, layers=2, bidirectional=True, lengths=(3, 1, 2)),
    Config("tiny packed fb=0.6", 3, 5, 3, 2, 4, 3, forget_bias=0.6, packed=True, lengths=(2, 4, 1)),
    Config("tiny rdrop train", 3, 5, 3, 2, 3, 2, recurrent_dropout=0.3),
]


@dataclass
class Row:
    backend: str
    config: str
    dtype: str
    out: float = math.nan
    state: float = math.nan
    grads: Optional[float] = None  # None: not checked (forward-only backend)
    worst: str = ""  # the tensor with the largest error relative to its tolerance
    status: str = "FAIL"
    note: str = ""


def _rel_err(got, want) -> float:
    """max |got - want| / max(max |want|, tiny), in float64 (the tests' ``rel_err``)."""
    got, want = got.detach().to("cpu", F64), want.detach().to("cpu", F64)
    if got.shape != want.shape:
        return math.inf
    if got.numel() == 0:
        return 0.0
    scale = want.abs().max().clamp_min(1e-30)
    return float((got - want).abs().max() / scale)


def _device_for(backend: str) -> torch.device:
    if backend != "reference" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _interpreted(backend: str, device: torch.device) -> bool:
    return backend in op.TRITON_BACKENDS and device.type == "cpu"


def tolerance(backend: str, dtype, device: torch.device) -> precision.Tolerance:
    """The check's tolerance: hyperkern.ops.precision's table for this device, dtype and the dot
    precision the backend computes with here (the same table the test suite reads)."""
    return precision.tolerance_for(device, dtype, interpreted=_interpreted(backend, device))


def _build(cfg: Config, backend: str, dtype, device, seed: int, ref_device):
    """Reference (float64) and backend models with identical parameters, plus the inputs."""
    gen = torch.Generator().manual_seed(seed)
    ref = HyperLSTM(cfg.X, cfg.H, hyper_size=cfg.Hh, embed_size=cfg.E, num_layers=cfg.layers, bidirectional=cfg.bidirectional,
                    layer_norm=cfg.layer_norm, forget_bias=cfg.forget_bias, ln_eps=cfg.ln_eps,
                    recurrent_dropout=cfg.recurrent_dropout, dropout=cfg.dropout, batch_first=cfg.batch_first,
                    backend="reference", dtype=F64)
    randomize_(ref, gen)
    with torch.no_grad():  # round to the dtype under test: the comparison measures arithmetic only
        for p in ref.parameters():
            p.copy_(p.to(dtype).to(F64))
    model = copy.deepcopy(ref).to(device=device, dtype=dtype)
    model.backend = backend
    ref = ref.to(ref_device)
    train = cfg.recurrent_dropout > 0 or cfg.dropout > 0
    ref.train(train)
    model.train(train)
    ref.seeded_dropout = model.seeded_dropout = backend in op.TRITON_BACKENDS  # draw dropout as the backend does

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=F64)).to(dtype).to(F64)

    L, D = cfg.layers * (2 if cfg.bidirectional else 1), 2 if cfg.bidirectional else 1
    x = rnd(*((cfg.B, cfg.T, cfg.X) if cfg.batch_first else (cfg.T, cfg.B, cfg.X)))
    state = tuple(rnd(L, cfg.B, n, scale=0.5) for n in (cfg.H, cfg.H, cfg.Hh, cfg.Hh))
    rows = sum(cfg.lengths) if cfg.packed else None
    out_shape = (rows, D * cfg.H) if cfg.packed else (*x.shape[:2], D * cfg.H)
    g_out = rnd(*out_shape)
    g_state = tuple(rnd(*s.shape) for s in state)
    return ref, model, x, state, g_out, g_state


def _run(model, cfg: Config, x, state, g_out, g_state, dtype, device, seed, with_grad: bool):
    """Forward (and backward if ``with_grad``). Returns (out, state, {name: grad} or None)."""
    x = x.detach().to(device=device, dtype=dtype).clone().requires_grad_(with_grad)
    state = tuple(s.detach().to(device=device, dtype=dtype).clone().requires_grad_(with_grad) for s in state)
    lengths = list(cfg.lengths) if cfg.lengths is not None else None
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if cfg.packed else x
    torch.manual_seed(seed)  # recurrent dropout: the same draws (seed or masks) for the reference and the backend
    with torch.set_grad_enabled(with_grad):
        if cfg.packed:
            out, st = model(inp, state)
            out = out.data
        else:
            out, st = model(inp, state, lengths=lengths)
    if not with_grad:
        return out.detach(), tuple(s.detach() for s in st), None
    named = {"input": x, **dict(zip(("h0", "c0", "h_hat0", "c_hat0"), state)), **dict(model.named_parameters())}
    loss = (out * g_out.to(out)).sum() + sum((s * g.to(s)).sum() for s, g in zip(st, g_state))
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return out.detach(), tuple(s.detach() for s in st), dict(zip(named, grads))


class _SeedTape:
    """Recurrent dropout drawn on one device, replayed on another: ``record()`` keeps every seed the
    model draws (``DropoutSeed.draw``), ``replay()`` hands the same seeds, in the same order, to the
    reference running elsewhere (a CUDA generator and the CPU one draw different numbers)."""

    def __init__(self):
        self.seeds: List[torch.Tensor] = []

    @contextlib.contextmanager
    def _patched(self, draw):
        real = DropoutSeed.__dict__["draw"]
        DropoutSeed.draw = staticmethod(draw)
        try:
            yield self
        finally:
            DropoutSeed.draw = real

    def record(self):
        self.seeds.clear()
        real = DropoutSeed.draw

        def draw(p, device, generator=None):
            d = real(p, device, generator)
            self.seeds.append(d.seed.detach().clone())
            return d
        return self._patched(draw)

    def replay(self):
        seeds = list(self.seeds)
        return self._patched(lambda p, device, generator=None: DropoutSeed(seeds.pop(0).to(device), float(p)))


def _is_no_training_error(e: BaseException) -> bool:
    return isinstance(e, (NotImplementedError, RuntimeError)) and bool(_NO_TRAINING.search(str(e)))


def check(backend: str, cfg: Config, dtype, seed: int = 0, ref_device=None) -> Row:
    """One row: ``backend`` vs the float64 reference on ``cfg`` in ``dtype``; the reference runs
    on ``ref_device`` (default: the backend's device; ``gpu-check`` runs it on the CPU)."""
    row = Row(backend, cfg.name, _DT_NAME.get(dtype, str(dtype)))
    device = _device_for(backend)
    tol_out, tol_grad = tolerance(backend, dtype, device)
    try:
        ref_device = torch.device(ref_device) if ref_device is not None else device
        ref, model, x, state, g_out, g_state = _build(cfg, backend, dtype, device, seed, ref_device)
        # the same dropout seeds on both sides: the same generator (one device), or replayed
        tape = _SeedTape() if ref_device != device else None
        fwd_only = False
        try:
            with tape.record() if tape else contextlib.nullcontext():
                got = _run(model, cfg, x, state, g_out, g_state, dtype, device, seed, True)
        except Exception as e:  # noqa: BLE001
            if not _is_no_training_error(e):
                raise
            fwd_only = True
            row.note = "backend does not support training"
            with tape.record() if tape else contextlib.nullcontext():
                got = _run(model, cfg, x, state, g_out, g_state, dtype, device, seed, False)
        with tape.replay() if tape else contextlib.nullcontext():
            want = _run(ref, cfg, x, state, g_out, g_state, F64, ref_device, seed, True)
    except Exception as e:  # noqa: BLE001
        row.note = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        return row

    errs: Dict[str, tuple] = {"output": (_rel_err(got[0], want[0]), tol_out)}
    for fld, a, b in zip(("h", "c", "h_hat", "c_hat"), got[1], want[1]):
        errs[f"state.{fld}"] = (_rel_err(a, b), tol_out)
    row.out = errs["output"][0]
    row.state = max(errs[f"state.{f}"][0] for f in ("h", "c", "h_hat", "c_hat"))
    if not fwd_only:
        for name, w in want[2].items():
            g = got[2].get(name)
            errs[f"grad {name}"] = ((math.inf if g is None else _rel_err(g, w)), tol_grad)
        row.grads = max(e for k, (e, _) in errs.items() if k.startswith("grad "))

    def ratio(item):
        e, t = item[1]
        return math.inf if math.isnan(e) else e / t

    worst_name, (worst_err, worst_tol) = max(errs.items(), key=ratio)
    row.worst = worst_name
    ok = all(e <= t for e, t in errs.values())  # NaN compares False: a FAIL
    row.status = ("PASS" if ok else "FAIL") + (" (fwd only)" if fwd_only else "")
    return row


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.1e}" if not math.isnan(v) else "nan"


def print_table(rows: List[Row], file=None) -> None:
    file = file or sys.stdout
    head = ("backend", "config", "dtype", "out", "state", "grads", "worst tensor", "result")
    data = [(r.backend, r.config, r.dtype, _fmt(r.out), _fmt(r.state), _fmt(r.grads),
             r.worst, r.status + (f"  {r.note}" if r.note and not r.status.startswith("PASS (fwd") else ""))
            for r in rows]
    widths = [max(len(h), *(len(d[i]) for d in data)) if data else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()
    print(line, file=file)
    print("-" * len(line), file=file)
    for d in data:
        print("  ".join(c.ljust(w) for c, w in zip(d, widths)).rstrip(), file=file)


def main(backends=None, seed: int = 0, *, dtypes=None, configs=None) -> int:
    """Verify ``backends`` (default: every available one but the reference). Returns the exit code:
    0 all PASS, 1 any FAIL, 2 nothing to verify (unknown or unavailable backend requested).

    Without CUDA the Triton backend runs in Triton's interpreter: ``TRITON_INTERPRET=1`` is set
    here (not at import) unless the variable is set already; it must precede the kernels' import."""
    t0 = time.perf_counter()
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    status = op.available_backends()
    if backends:
        names = list(dict.fromkeys(backends))
        unknown = [n for n in names if n not in status]
        if unknown:
            print(f"unknown backend(s) {unknown}; known: {list(status)}", file=sys.stderr)
            return 2
    else:
        names = [n for n in status if n != "reference"]
    run_names = []
    for n in names:
        ok, why = status[n]
        if not ok:
            print(f"skipping backend {n!r}: not available here ({why})")
        else:
            run_names.append(n)
    if not run_names:
        print("no backend to verify", file=sys.stderr)
        return 2

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes; avoids an oversubscribed OpenMP pool on shared machines
    rows: List[Row] = []
    used: Dict[tuple, precision.Tolerance] = {}
    try:
        for b in run_names:
            device = _device_for(b)
            cfgs = configs if configs is not None else (TINY_CONFIGS if _interpreted(b, device) else CONFIGS)
            for dt in (dtypes or DTYPES):
                ok, why = op.backend_status(b, device, dt, True)
                if not ok:
                    print(f"backend {b!r} on {device.type} in {_DT_NAME[dt]}: skipped ({why})")
                    continue
                dot = precision.dot_precision(dt, _interpreted(b, device), device.type)
                used[(device.type, _DT_NAME[dt], dot)] = tolerance(b, dt, device)
                for i, cfg in enumerate(cfgs):
                    rows.append(check(b, cfg, dt, seed=seed * 1000 + i))
    finally:
        torch.set_num_threads(n_threads)
    print(f"hyperkern verify: max relative error vs the float64 reference (seed {seed}); tolerances from "
          "hyperkern.ops.precision (device dtype dots: out,state / grads): "
          + ", ".join(f"{d} {n} {dot} {t.out:.0e}/{t.grad:.0e}" for (d, n, dot), t in used.items()))
    print_table(rows)
    fails = [r for r in rows if r.status.startswith("FAIL")]
    print(f"{len(rows) - len(fails)}/{len(rows)} passed in {time.perf_counter() - t0:.1f} s"
          + (f"; {len(fails)} FAILED" if fails else ""))
    return 1 if fails else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
