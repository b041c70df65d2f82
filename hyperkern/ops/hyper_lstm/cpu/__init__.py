"""The torch backend's compiled CPU time loop (``hyper_lstm.cpp``): built at first use, optional.

Nothing compiles at install. The first fp32/fp64 CPU call of the torch backend builds the C++
extension with ``torch.utils.cpp_extension.load`` (needs a C++ compiler and ``ninja``; ~30-60 s
once, one line on stderr says how long), for the vector ISA torch itself dispatches to on this
machine (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, or plain C++), and torch's
extension cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) keeps the build
for later processes. If it cannot build, the backend runs its eager Python loop (same maths, same
buffers) and :func:`status` says why; ``HYPERKERN_CPU_EXTENSION=0`` turns the extension off.

Why a C++ time loop rather than a compiled step: every step of the loop is small (at B=16, H=256
the whole nn.LSTM step is ~40 µs), so a per-step call into compiled code (an inductor graph costs
~14 µs per call) or ~30 eager ops of a few µs each leave the per-step overhead in place; the loop
itself has to be compiled. See docs/cpu_backend.md for the measurements.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

import torch

SOURCE = Path(__file__).with_name("hyper_lstm.cpp")

# torch's CPU capability -> (compiler flags, the ATen macro that selects Vectorized<T>'s width);
# the same flags torch's inductor uses for its generated C++ on these ISAs
_ISA_FLAGS = {
    "AVX512": (["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"], "CPU_CAPABILITY_AVX512"),
    "AVX2": (["-mavx2", "-mfma", "-mf16c"], "CPU_CAPABILITY_AVX2"),
}

_state = {"module": None, "tried": False, "why": "not built yet: it builds at the first fp32/fp64 CPU call"}


def isa() -> str:
    """The vector ISA the extension is (or would be) built for."""
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _ISA_FLAGS else "DEFAULT"


def _build_args() -> Tuple[str, list]:
    """(extension name, compiler flags). The name carries the ISA and a hash of the source and the
    flags, so every version has its own cached build: two checkouts never rebuild each other's."""
    flags, macro = _ISA_FLAGS.get(isa(), ([], None))
    # no implicit FMA contraction: a - b·c must round b·c as written (an LN over one feature then
    # gives exactly 0, as the reference does, and the two loops agree with the eager one)
    # -fopenmp: at::parallel_for is a header template, parallel only where OpenMP is on (torch's
    # own libgomp serves it at run time)
    cflags = ["-O3", "-ffp-contract=off", "-fopenmp", *flags] + ([f"-D{macro}"] if macro else [])
    digest = hashlib.sha1(SOURCE.read_bytes() + " ".join(cflags).encode()).hexdigest()[:10]
    return f"hyperkern_hyper_lstm_cpu_{isa().lower()}_{digest}", cflags


def load():
    """The built extension module, or None (then :func:`status` says why). Tried once per process."""
    if _state["tried"]:
        return _state["module"]
    _state["tried"] = True
    if os.environ.get("HYPERKERN_CPU_EXTENSION", "1") == "0":
        _state["why"] = "turned off (HYPERKERN_CPU_EXTENSION=0): the eager loop runs"
        return None
    try:
        from torch.utils import cpp_extension

        name, cflags = _build_args()
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        built = (build_dir / f"{name}.so").exists()
        t0 = time.perf_counter()
        module = cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=cflags,
                                    extra_ldflags=["-fopenmp"], verbose=False)
        if not built:
            print(f"hyperkern: built the C++ CPU time loop ({isa()}) in {time.perf_counter() - t0:.0f} s, "
                  f"cached in {build_dir}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001  (no compiler, no ninja, a failed build: all mean "eager")
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "error" in ln.lower() and ln is not lines[0]), lines[0] if lines else "")
        _state["why"] = f"did not build ({type(e).__name__}: {first[:300]}); the eager loop runs"
        return None
    _state["module"] = module
    _state["why"] = f"built for {isa()} ({build_dir})"
    return module


def status(build: bool = False) -> Tuple[bool, str]:
    """(usable, why): whether the compiled loop runs here. ``build=True`` builds it if needed."""
    if build:
        load()
    return _state["module"] is not None, _state["why"]


def applies(x: torch.Tensor) -> Optional[str]:
    """Why the compiled loop does NOT run for ``x`` (None: it does, once built)."""
    if x.device.type != "cpu":
        return f"{x.device.type} tensors"
    if x.dtype not in (torch.float32, torch.float64):
        return f"{x.dtype}"
    return None
