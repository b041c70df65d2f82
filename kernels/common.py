"""What the kernels and their launchers share: the interpreter switch and integer helpers.

Standard library only, so a launcher (or the backend registry) can ask without importing Triton.
"""
from __future__ import annotations

import os

_TRUE = ("1", "true", "on", "yes", "y")  # what Triton's getenv_bool accepts (3.6 through 3.9)


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
