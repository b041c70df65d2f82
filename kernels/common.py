"""What the kernels and their launchers share: the interpreter switch and integer helpers.

Standard library only, so a launcher (or the backend registry) can ask without importing Triton.
"""
from __future__ import annotations

import os

_TRUE = ("1", "true", "on", "yes", "y")  # what Triton's getenv_bool accepts (3.6 through 3.9)

# The HyperLSTM's fixed counts (SPEC §1), for the kernels, the launchers and everything above
# (``hyperkern.ops.hyper_lstm.common`` re-exports them).
NUM_PATHS = 12  # z / d paths: x-path (i, f, g, o), h-path (i, f, g, o), bias-path (i, f, g, o)
NUM_SCALED_PATHS = 8  # the x- and h-paths: they scale a matmul's output, and only they have a z bias
H_PATH, BIAS_PATH = 4, 8  # the first path of the h-path and of the bias path (the x-path's is 0)


def interpret_requested() -> bool:
    """``TRITON_INTERPRET``, read now and parsed as Triton parses it.

    Triton reads the variable when ``@triton.jit`` decorates a kernel, i.e. when a kernel module
    is first imported; kernels built earlier keep their mode, which :func:`interpreted` tells."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def interpreted(kernel) -> bool:
    """Whether an imported kernel runs in Triton's interpreter (the truth for a built kernel)."""
    fn = getattr(kernel, "fn", kernel)  # unwrap @triton.heuristics / autotune wrappers
    return type(kernel).__name__ == "InterpretedFunction" or type(fn).__name__ == "InterpretedFunction"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def signature(kernel, dtype: str, constexprs: dict, pointers: dict, default_pointer: str, scalars: dict) -> dict:
    """Every argument of ``kernel`` typed for ``triton.compile`` (the compile check): the arguments
    in ``constexprs`` (None pointers too) are ``"constexpr"``; a ``*_ptr`` argument points to
    ``pointers[name]`` or else ``default_pointer`` (``"param"``: the inputs' ``dtype``; ``"acc"``:
    the accumulator's, fp32 or fp64 for fp64 inputs); any other argument is ``scalars[name]`` or
    else ``"i32"``. Each kernel module states its ``ARG_TYPES`` (``pointers``, ``default_pointer``,
    ``scalars``) as data."""
    def elem(t):
        return {"param": dtype, "acc": "fp64" if dtype == "fp64" else "fp32"}.get(t, t)

    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + elem(pointers.get(name, default_pointer))
        else:
            sig[name] = scalars.get(name, "i32")
    return sig
