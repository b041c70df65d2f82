"""The precision policy and the tolerance table (hyperkern.ops.precision), checked without a GPU.

The GPU's dot arithmetic is emulated on the float64 reference: every matmul operand (forward and
backward: a dispatch mode sees autograd's matmuls too) is rounded to the dot format's mantissa —
truncated for TF32 (what the tensor cores do with the raw fp32 registers Triton hands them),
rounded to nearest for fp16/bf16, whose inputs, parameters and outputs are rounded too. The
emulated error must sit inside the table's tolerance at the checks' shapes (so a GPU run cannot
fail on tolerance alone), and four mantissa bits fewer must not (the tolerance still tells a
coarser arithmetic from the intended one).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hyperkern import HyperLSTM
from hyperkern.ops import precision
from hyperkern.testing import randomize_

aten = torch.ops.aten
F64 = torch.float64


def _to_mantissa(x: torch.Tensor, bits: int, truncate: bool) -> torch.Tensor:
    """float64 ``x`` with ``bits`` explicit mantissa bits (rounded to nearest, or truncated)."""
    m, e = torch.frexp(x)
    scale = 2.0 ** (bits + 1)
    m = torch.trunc(m * scale) if truncate else torch.round(m * scale)
    return torch.ldexp(m / scale, e)


class _DotFormat(TorchDispatchMode):
    """Round both operands of every matmul to the dot format."""

    def __init__(self, bits: int, truncate: bool):
        super().__init__()
        self.bits, self.truncate = bits, truncate

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        r = lambda t: _to_mantissa(t, self.bits, self.truncate)  # noqa: E731
        if func in (aten.mm.default, aten.bmm.default):
            return func(r(args[0]), r(args[1]))
        if func is aten.addmm.default:
            return func(args[0], r(args[1]), r(args[2]), **kwargs)
        return func(*args, **kwargs)


# the arithmetic of each CUDA entry: (dot mantissa bits, truncated, mantissa bits of inputs/outputs)
FORMATS = {"tf32": (10, True, 52), "fp16": (10, False, 10), "bf16": (7, False, 7)}
DTYPE_OF = {"tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# odd sizes at the scales the checks use (verify, gpu-check): T <= MAX_STEPS, 4H <= MAX_REDUCTION
SHAPES = [dict(X=7, H=33, Hh=10, E=3, T=8, B=3), dict(X=13, H=65, Hh=17, E=5, T=16, B=2),
          dict(X=5, H=17, Hh=9, E=2, T=6, B=4, layers=2, bidirectional=True)]


def _emulated_error(fmt, bits, truncate, io_bits, X, H, Hh, E, T, B, layers=1, bidirectional=False, seed=0):
    """(outputs and final state, gradients): max relative error of the emulated arithmetic."""
    g = torch.Generator().manual_seed(seed)
    rnn = HyperLSTM(X, H, hyper_size=Hh, embed_size=E, num_layers=layers, bidirectional=bidirectional, backend="reference", dtype=F64)
    randomize_(rnn, g)
    io = lambda t: _to_mantissa(t, io_bits, False)  # noqa: E731
    with torch.no_grad():
        for p in rnn.parameters():
            p.copy_(io(p))
    L = layers * (2 if bidirectional else 1)
    x = io(torch.randn(T, B, X, generator=g, dtype=F64))
    st = tuple(io(0.5 * torch.randn(L, B, n, generator=g, dtype=F64)) for n in (H, H, Hh, Hh))
    up = torch.randn(T, B, H * (2 if bidirectional else 1), generator=g, dtype=F64)

    def run(mode):
        leaves = [x.clone().requires_grad_(), *(s.clone().requires_grad_() for s in st)]
        with mode or contextlib.nullcontext():
            out, fin = rnn(leaves[0], tuple(leaves[1:]))
            loss = (out * up).sum() + sum(f.sum() for f in fin)
            grads = torch.autograd.grad(loss, leaves + list(rnn.parameters()))
        return [io(out.detach())] + [io(f.detach()) for f in fin], [io(gr) for gr in grads]

    (want_o, want_g), (got_o, got_g) = run(None), run(_DotFormat(bits, truncate))
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))  # noqa: E731
    return max(rel(a, b) for a, b in zip(got_o, want_o)), max(rel(a, b) for a, b in zip(got_g, want_g))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_emulated_gpu_arithmetic_is_inside_the_tolerance(fmt, one_thread):
    bits, truncate, io_bits = FORMATS[fmt]
    tol = precision.tolerance("cuda", DTYPE_OF[fmt], fmt)
    worst = [0.0, 0.0]
    for shape in SHAPES:
        for seed in range(2):
            e_out, e_grad = _emulated_error(fmt, bits, truncate, io_bits, **shape, seed=seed)
            worst = [max(worst[0], e_out), max(worst[1], e_grad)]
    assert worst[0] <= tol.out and worst[1] <= tol.grad, (fmt, worst, tol)
    # and not absurdly loose: the emulated error is within two orders of magnitude of the bound
    assert worst[0] > tol.out / 100 and worst[1] > tol.grad / 100, (fmt, worst, tol)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_four_bits_coarser_fails_the_tolerance(fmt, one_thread):
    bits, truncate, io_bits = FORMATS[fmt]
    tol = precision.tolerance("cuda", DTYPE_OF[fmt], fmt)
    errs = [_emulated_error(fmt, bits - 4, truncate, io_bits, **shape) for shape in SHAPES]
    assert max(e for e, _ in errs) > tol.out, (fmt, errs, tol)


def test_table_reproduces_the_stated_figures_and_covers_every_check():
    T = precision.tolerance
    assert T("cpu", F64, "fp64") == (1e-9, 1e-9)
    assert T("cpu", torch.float32, "ieee") == (1e-5, 1e-4) == T("cuda", torch.float32, "ieee")
    assert T("cpu", torch.float32, "exact") == (1e-5, 1e-4)
    assert T("cpu", torch.float16, "exact") == (1e-2, 3e-2) == T("cuda", torch.float16, "fp16")
    assert T("cuda", torch.float32, "tf32") == (4e-2, 1e-1)
    assert T("cuda", torch.bfloat16, "bf16") == (8e-2, 2e-1)
    with pytest.raises(ValueError, match="no tolerance"):
        T("cuda", torch.float64, "tf32")
    text = precision.format_table()
    assert "tf32" in text and "bf16" in text


def test_dot_precision_follows_the_matmul_tf32_flag():
    mm = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(mm, "fp32_precision") else "allow_tf32"  # PyTorch >= 2.9: the new API
    on, off = ("tf32", "ieee") if name == "fp32_precision" else (True, False)
    prev = getattr(mm, name)
    try:
        setattr(mm, name, on)
        assert precision.dot_precision(torch.float32) == "tf32"
        setattr(mm, name, off)
        assert precision.dot_precision(torch.float32) == "ieee"
    finally:
        setattr(mm, name, prev)
    assert precision.dot_precision(torch.float32, device_type="cpu") == "ieee"
    assert precision.dot_precision(torch.float32, interpreted=True) == "exact"
    assert precision.dot_precision(torch.bfloat16) == "bf16"
    assert precision.triton_input_precision("tf32") == "tf32"
    assert precision.triton_input_precision("exact") == "ieee"


def test_legacy_flag_when_the_new_api_says_none(monkeypatch):
    """torch.set_float32_matmul_precision("high") sets the legacy flag; the new API then reads
    "tf32" too on recent PyTorch. Either way the policy says tf32 (and back to ieee)."""
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert precision.tf32_enabled()
        torch.set_float32_matmul_precision("highest")
        assert not precision.tf32_enabled()
    finally:
        torch.set_float32_matmul_precision(prev)
