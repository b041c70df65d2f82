"""The torch backend's compiled CPU time loop (``hyper_lstm.cpp``): built at first use, optional.

Nothing compiles at install. The first fp32/fp64 CPU call of the torch backend builds the C++
extension with ``torch.utils.cpp_extension.load`` (~30-60 s once) for the vector ISA torch itself
dispatches to on this machine (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, or
plain C++), and torch's extension cache (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) keeps the build for later processes. It needs a C++ compiler and
ninja: ``ninja`` is an install requirement of hyperkern, and the build uses the one pip installed
beside this Python (found whether or not its virtual environment is activated; torch itself only
looks on ``PATH``), else a working ``ninja`` on ``PATH``. One line on stderr says, before the build
starts, what is built, why, roughly how long it takes and where it is cached. If it cannot build,
one warning says what failed and what to install, and the backend runs its eager Python loop (same
maths, same buffers, 2-5x slower); :func:`status` (and ``python -m hyperkern info``) says which
runs and why. ``HYPERKERN_CPU_EXTENSION=0`` turns the extension off.

Why a C++ time loop rather than a compiled step: every step of the loop is small (at B=16, H=256
the whole nn.LSTM step is ~40 µs), so a per-step call into compiled code (an inductor graph costs
~14 µs per call) or ~30 eager ops of a few µs each leave the per-step overhead in place; the loop
itself has to be compiled. See docs/cpu_backend.md for the measurements.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch

SOURCE = Path(__file__).with_name("hyper_lstm.cpp")

# torch's CPU capability -> (compiler flags, the ATen macro that selects Vectorized<T>'s width);
# the same flags torch's inductor uses for its generated C++ on these ISAs
_ISA_FLAGS = {
    "AVX512": (["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"], "CPU_CAPABILITY_AVX512"),
    "AVX2": (["-mavx2", "-mfma", "-mf16c"], "CPU_CAPABILITY_AVX2"),
}

_state = {"module": None, "tried": False, "why": "not built yet: it builds at the first fp32/fp64 CPU call"}
_lock = threading.Lock()  # one build per process, whichever thread calls first


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


def _runs(exe: str) -> bool:
    try:
        subprocess.run([exe, "--version"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def find_ninja() -> Optional[str]:
    """The folder of a ninja that runs: the one pip installed (the ``ninja`` package, beside this
    Python whether or not its venv is activated), else the first on ``PATH``; None if neither runs."""
    candidates = []
    try:
        import ninja  # the PyPI package: its binary lives in ninja.BIN_DIR

        candidates.append(Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    candidates.append(Path(sys.executable).parent)  # pip's console scripts, e.g. .venv/bin
    on_path = shutil.which("ninja")
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        exe = folder / "ninja"
        if exe.is_file() and _runs(str(exe)):
            return str(folder)
    return None


def _compiler() -> Optional[str]:
    """The C++ compiler torch's build would call (``$CXX`` or ``c++``), if it is on ``PATH``."""
    return shutil.which(os.environ.get("CXX", "c++"))


@contextlib.contextmanager
def _ninja_first_on_path(folder: str) -> Iterator[None]:
    """torch finds ninja on ``PATH`` only: put ``folder`` first for the build, restore after."""
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = folder + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _cannot_build(why: str) -> None:
    """Record why the loop does not run and warn once (the caller holds the lock; tried once)."""
    _state["why"] = f"did not build ({why}); the eager loop runs"
    warnings.warn(f"hyperkern: the torch backend's C++ CPU time loop did not build ({why}). The eager Python loop "
                  "runs instead (same results, 2-5x slower on CPU). To get the fast path install a C++ compiler "
                  "(e.g. g++) and ninja (pip install ninja) and start a new process; HYPERKERN_CPU_EXTENSION=0 "
                  "turns the loop off (and this warning)", RuntimeWarning, stacklevel=4)


def load():
    """The built extension module, or None (then :func:`status` says why). Tried once per process."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if not _state["tried"]:
            _state["module"] = _build()
            _state["tried"] = True
    return _state["module"]


def _build():
    if os.environ.get("HYPERKERN_CPU_EXTENSION", "1") == "0":
        _state["why"] = "turned off (HYPERKERN_CPU_EXTENSION=0): the eager loop runs"
        return None
    try:
        from torch.utils import cpp_extension

        name, cflags = _build_args()
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        built = (build_dir / f"{name}.so").exists()
        ninja_dir = find_ninja()
        if not built:
            if _compiler() is None:
                return _cannot_build(f"no C++ compiler: {os.environ.get('CXX', 'c++')!r} is not on PATH")
            if ninja_dir is None:
                return _cannot_build("ninja was not found: not pip-installed beside this Python, none that runs on PATH")
            print(f"hyperkern: building the torch backend's C++ CPU time loop ({isa()}) once, for the fast CPU "
                  f"path; ~30-60 s, cached in {build_dir}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with _ninja_first_on_path(ninja_dir) if ninja_dir else contextlib.nullcontext():
            module = cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=cflags,
                                        extra_ldflags=["-fopenmp"], verbose=False)
        if not built:
            print(f"hyperkern: built the C++ CPU time loop in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    except Exception as e:  # noqa: BLE001  (a failed build or load: the eager loop runs)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "error" in ln.lower() and ln is not lines[0]), lines[0] if lines else "")
        return _cannot_build(f"{type(e).__name__}: {first[:300]}")
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
