"""The precision policy of the fused kernels and the one tolerance table every check reads.

**Dots.** What a kernel's ``tl.dot`` does with its operands, by input dtype:

- float32 on CUDA: TF32 (operands rounded to a 10-bit mantissa, fp32 accumulation) exactly when
  PyTorch's **matmul** TF32 flag allows it — ``torch.backends.cuda.matmul.fp32_precision == "tf32"``
  on PyTorch >= 2.9, ``torch.backends.cuda.matmul.allow_tf32`` (what
  ``torch.set_float32_matmul_precision("high")`` sets) before — otherwise full fp32 ("ieee"). The
  default is therefore full fp32, and ``torch.backends.cuda.matmul.allow_tf32 = True`` opts in.
  Why this flag and not cuDNN's (which nn.LSTM reads): part of each op's arithmetic *is* cuBLAS
  matmuls (the hoisted input projection, the post-loop weight-gradient GEMMs), which obey only
  this flag; reading it for the kernels too gives every op one precision, hence one tolerance
  (a layer whose GEMMs are fp32 and whose dots are tf32 would be as coarse as tf32 anyway). It
  is also the flag Inductor's own Triton matmuls follow. Both ops (HyperLSTM, static generation)
  read it through :func:`dot_precision`; it is read at each call (a CUDA graph keeps the value
  it was captured with).
- float16 / bfloat16: the forward's dots take 16-bit operands (the fp32 recurrent state is
  rounded to the input dtype before each dot); the backward's recurrent dots multiply fp32
  gradients by the weights upcast to fp32, on TF32 tensor cores (10 mantissa bits: finer than
  the input's); fp32 accumulation, fp32 state and statistics; outputs in the input dtype.
- float64 (interpreter test mode, static generation): float64 throughout.
- Under ``TRITON_INTERPRET=1`` every dot is computed exactly, whatever is asked ("exact").

**Tolerances** (:func:`tolerance`): the largest relative error ``max|got - want| / max|want|``
against the float64 reference (evaluated at the same inputs and parameters rounded to the dtype
under test), for outputs and final states, and for gradients. Derivation:

- ``u`` = the unit roundoff of the dots' operands: ``2**-11`` for fp16 (10 explicit mantissa
  bits, round to nearest), ``2**-8`` for bf16 (7), and ``2**-10`` for TF32: Triton hands the
  tensor cores raw fp32 registers (no ``cvt.rna.tf32`` in the PTX, checked), which keep the top
  10 mantissa bits and drop the rest, a truncation. ``n`` = operands rounded per product: 2 for
  TF32 (the fp32 state *and* the fp32 weights), 1 for fp16/bf16 (the weights are already in the
  dtype — the reference uses the same rounded weights — so only the state is rounded).
- One dot then has a relative error (to ``Σ|a_k w_k|``) of at most ``n·u``, whatever its
  reduction length K; fp32 accumulation adds about ``√K·2**-24`` (under 4e-6 for K <= 4096 —
  negligible beside ``u``, and the floor below covers it for full-precision dots).
- Through T steps of the recurrence, the layer norms and the output/state the errors add up and
  are amplified; rounding every matmul operand of the float64 reference to the dot precision
  (``tests/test_precision.py`` does exactly this) gives, at odd sizes with T <= 16 and K <= 4096,
  at most ``~10·n·u`` on outputs and ``~25·n·u`` on gradients (whose post-loop GEMMs reduce over
  ``T·B`` rows with cancellation; TF32's truncation measured lower: ~5 and ~13). Hence, with a
  factor 2 of margin:
  ``out = 20·n·u``, ``grad = 50·n·u``, rounded up to one significant digit.
- Full-precision dots (exact, ieee, fp64) have ``n = 0``: their tolerance is the floor, set by
  everything else — fp32 state and transcendental functions (a few ulps), accumulation order
  (``√K·2**-24``): fp32 ``1e-5`` / ``1e-4``; float64 ``1e-9`` (an algebra check far above rounding).

The table holds for sequences of at most :data:`MAX_STEPS` steps and reductions of at most
:data:`MAX_REDUCTION` terms at the parameter scales of :func:`hyperkern.testing.randomize_`;
longer sequences amplify rounding further (measured growth: about 2x from T = 8 to T = 32 for
TF32) and are not what the checks use.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Tuple

import torch

MAX_STEPS = 16  # longest sequence the tolerance table is derived for
MAX_REDUCTION = 4096  # longest dot / reduction (4H for H <= 1024)

# unit roundoff of a dot's operands, and how many of its two operands are rounded to it
UNIT_ROUNDOFF = {"tf32": 2.0 ** -10, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}  # tf32: truncation
ROUNDED_OPERANDS = {"tf32": 2, "fp16": 1, "bf16": 1}
FWD_ULPS, GRAD_ULPS = 20, 50  # see the module doc: ~10 / ~25 observed, times 2
# full-precision dots: what fp32 state, transcendentals and accumulation order leave
FLOOR = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-5, 1e-4)}

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FULL_PRECISION_DOTS = ("exact", "ieee", "fp64")


class Tolerance(NamedTuple):
    out: float  # outputs and final states
    grad: float  # every gradient


def tf32_enabled() -> bool:
    """PyTorch's matmul TF32 flag, read the way cuBLAS reads it (new API first, then the legacy one)."""
    mm = torch.backends.cuda.matmul
    new = getattr(mm, "fp32_precision", None)  # PyTorch >= 2.9: "tf32" | "ieee" | "none" (= the legacy flag)
    if new in ("tf32", "ieee"):
        return new == "tf32"
    return bool(mm.allow_tf32)


class tf32_matmuls:
    """``with tf32_matmuls(True):`` — PyTorch's matmul TF32 flag set for the block (through the new
    API where PyTorch has it, else the legacy flag), restored after. For checks and benchmarks
    that run both fp32 dot precisions in one process; users set the flag itself."""

    def __init__(self, enabled: bool):
        self.enabled = bool(enabled)
        mm = torch.backends.cuda.matmul
        self.name = "fp32_precision" if hasattr(mm, "fp32_precision") else "allow_tf32"

    def __enter__(self):
        mm = torch.backends.cuda.matmul
        self.prev = getattr(mm, self.name)
        setattr(mm, self.name, ("tf32" if self.enabled else "ieee") if self.name == "fp32_precision" else self.enabled)
        return self

    def __exit__(self, *exc):
        setattr(torch.backends.cuda.matmul, self.name, self.prev)
        return False


def dot_precision(dtype: torch.dtype, interpreted: bool = False, device_type: str = "cuda") -> str:
    """How the dots treat operands of ``dtype``: "exact" (the interpreter), "tf32" or "ieee"
    (float32 on CUDA, by :func:`tf32_enabled`; always "ieee" on CPU), "fp16", "bf16", "fp64"."""
    if interpreted:
        return "exact"
    if dtype == torch.float32:
        return "tf32" if device_type == "cuda" and tf32_enabled() else "ieee"
    if dtype not in DTYPE_NAMES:
        raise TypeError(f"no dot precision for dtype {dtype}")
    return DTYPE_NAMES[dtype]


def triton_input_precision(dot: str) -> str:
    """``tl.dot``'s ``input_precision`` for a dot precision ("tf32" or "ieee"; 16-bit and fp64
    operands ignore it, and the interpreter computes exactly whatever it says)."""
    return "tf32" if dot == "tf32" else "ieee"


def _round_up_1sig(x: float) -> float:
    """x rounded up to one significant digit (1.95e-2 -> 2e-2)."""
    e = math.floor(math.log10(x))
    return math.ceil(round(x / 10 ** e, 9)) * 10 ** e


def _derive(dtype: torch.dtype, dot: str) -> Tolerance:
    if dot in FULL_PRECISION_DOTS:
        if dtype not in FLOOR:
            raise ValueError(f"a {dot} dot on {dtype} inputs does not exist")
        return Tolerance(*FLOOR[dtype])
    n, u = ROUNDED_OPERANDS[dot], UNIT_ROUNDOFF[dot]
    out, grad = (_round_up_1sig(k * n * u) for k in (FWD_ULPS, GRAD_ULPS))
    floor = FLOOR.get(dtype, (0.0, 0.0))
    return Tolerance(max(out, floor[0]), max(grad, floor[1]))


# (device type, dtype, dot precision) -> Tolerance: every combination a check can meet
TOLERANCES: Dict[Tuple[str, torch.dtype, str], Tolerance] = {}
for _dev, _dt, _dot in (
    ("cpu", torch.float64, "fp64"), ("cpu", torch.float32, "ieee"), ("cpu", torch.float16, "fp16"),
    ("cpu", torch.bfloat16, "bf16"),  # the PyTorch backends on CPU
    ("cpu", torch.float64, "exact"), ("cpu", torch.float32, "exact"), ("cpu", torch.float16, "exact"),  # interpreter
    ("cuda", torch.float64, "fp64"), ("cuda", torch.float32, "ieee"), ("cuda", torch.float32, "tf32"),
    ("cuda", torch.float16, "fp16"), ("cuda", torch.bfloat16, "bf16"),
):
    # the interpreter's dots are exact, but its fp16 inputs, state casts and outputs are not
    _TOL_DOT = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(_dt, _dot)
    TOLERANCES[(_dev, _dt, _dot)] = _derive(_dt, _TOL_DOT)


def tolerance(device, dtype: torch.dtype, dot: str) -> Tolerance:
    """The tolerance of a check on ``device`` (a device or its type) in ``dtype`` with ``dot``
    precision (see :func:`dot_precision`); ValueError for a combination that cannot occur."""
    dev = torch.device(device).type
    try:
        return TOLERANCES[(dev, dtype, dot)]
    except KeyError:
        raise ValueError(f"no tolerance for device {dev!r}, dtype {dtype}, dot {dot!r}") from None


def tolerance_for(device, dtype: torch.dtype, interpreted: bool = False) -> Tolerance:
    """The tolerance of a check run now on ``device`` in ``dtype``, under the current dot policy."""
    dev = torch.device(device).type
    return tolerance(dev, dtype, dot_precision(dtype, interpreted, dev))


def format_table() -> str:
    """The table as text (``verify`` prints it; docs quote it)."""
    lines = [f"{'device':6s} {'dtype':5s} {'dots':5s} {'out/state':>9s} {'grads':>7s}"]
    for (dev, dt, dot), tol in TOLERANCES.items():
        lines.append(f"{dev:6s} {DTYPE_NAMES[dt]:5s} {dot:5s} {tol.out:9.0e} {tol.grad:7.0e}")
    return "\n".join(lines)


# --- autocast: the dtype a HyperLSTM call computes in ------------------------------------------

def autocast_dtype(device_type: str, param_dtype: torch.dtype):
    """The dtype a HyperLSTM call computes in when ``torch.autocast`` is on for ``device_type``,
    else None (then inputs must have the parameters' dtype). As ``nn.LSTM`` does there:

    - CUDA: the autocast dtype (``torch.get_autocast_dtype("cuda")``, fp16 or bf16): x, the
      state and the parameters are cast to it, so the Triton kernels run their 16-bit path (16-bit
      operands, fp32 accumulation and state); outputs in that dtype. float64 parameters are left
      alone, as autocast leaves float64 ops (the call then computes in float64).
    - CPU: the parameters' dtype, whatever dtype the input arrives in, so the C++ time loop runs
      (it computes in fp32/fp64); outputs in the parameters' dtype.

    One policy for every backend: the custom ops' autocast rules and the reference's wrapper read
    it (``hyperkern.ops.hyper_lstm``), and the module resolves the backend with it."""
    if not torch.is_autocast_enabled(device_type):
        return None
    if device_type == "cuda" and param_dtype != torch.float64:
        return torch.get_autocast_dtype("cuda")
    return param_dtype
