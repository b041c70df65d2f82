"""One kernel launch's configuration as data (:class:`Launch`), shared by both ops' config tables,
a time loop's launches bound once per call (:class:`StepLaunch`), and the device guard every op
enters before it launches (:func:`device_guard`).

A launcher asks its op's ``configs`` module for the :class:`Launch` of a call and launches with
:meth:`Launch.kwargs` (keyword arguments only: a swapped pair of same-typed arguments cannot pass
silently); ``python -m hyperkern compile-check`` compiles every :class:`Launch` the tables can
produce (``all_launches()``) with the same constexprs, warps, stages and register cap.
"""
from __future__ import annotations

import contextlib
import importlib
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch


@dataclass(frozen=True)
class Launch:
    """Everything about a launch but its tensors, sizes and grid."""

    kernel: str  # the @triton.jit function's name ...
    module: str  # ... in this module
    dtype: str  # the inputs' dtype: "fp32", "fp16", "bf16", "fp64"
    constexprs: Tuple[Tuple[str, object], ...]
    num_warps: int
    num_stages: int
    maxnreg: Optional[int] = None
    absent: Tuple[str, ...] = ()  # optional inputs this launch does not use: passed as None
    cooperative: bool = False  # Triton's ``launch_cooperative_grid``: a grid that cannot be resident at once errors

    def kernel_fn(self):
        """The kernel object (imports its module, hence Triton)."""
        return getattr(importlib.import_module(self.module), self.kernel)

    def constexpr(self, name: str):
        return dict(self.constexprs)[name]

    def kwargs(self, args: Dict[str, object]) -> Dict[str, object]:
        """The keyword arguments of the launch: ``args`` (tensors, sizes, strides), the absent
        inputs as None, the constexprs and the launch options."""
        kw = dict(args)
        kw.update({n: None for n in self.absent})
        kw.update(self.constexprs)
        kw.update(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.maxnreg is not None:
            kw["maxnreg"] = self.maxnreg
        if self.cooperative:
            kw["launch_cooperative_grid"] = True
        return kw

    @property
    def label(self) -> str:
        """A short name of the configuration, unique per kernel (the compile check's "config")."""
        parts = [self.dtype]
        for n, v in self.constexprs:
            if n in ("DOT_PRECISION", "DOT_PREC", "ACC"):
                continue
            parts.append((n if v else f"no{n}") if isinstance(v, bool) else f"{n}{v}")
        dot = dict(self.constexprs).get("DOT_PRECISION", dict(self.constexprs).get("DOT_PREC"))
        if dot is not None and self.dtype == "fp32":
            parts.append(dot)
        return " ".join(parts) + f" w{self.num_warps} s{self.num_stages}"


def device_guard(*tensors):
    """The op boundary's device guard (flash-linear-attention's ``input_guard``, Liger-Kernel's
    device context): ``torch.cuda.device`` of the first CUDA tensor among ``tensors`` entered, so
    that every Triton launch inside runs on the tensors' device and that device's current stream
    (Triton's JIT launches on the *current* device's current stream), whichever device the caller
    had current: a model on ``cuda:1`` while ``cuda:0`` is current. A no-op context for CPU
    tensors (the interpreter). Every op entry and launcher of the Triton backends enters it, looked
    up as ``launches.device_guard`` at each call (the tests count its entries by patching it)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# After a StepLaunch's first launch (through Triton's JIT), call the compiled kernel's launcher
# directly for the later steps. False: every step goes through the JIT (gpu-check compares both).
BIND_COMPILED = True


class StepLaunch:
    """One kernel's launches over a time loop, bound once per call: all but the step index.

    The per-step kernels address step ``t``'s slices from base pointers (in int64), so every step
    launches with the same arguments but ``t``. The first call goes through Triton's JIT
    (``kernel[grid](**kwargs)``: binds the arguments, computes the specialisation key, finds or
    compiles the kernel, asks the driver about every tensor pointer); on a GPU the later calls
    then hand the compiled kernel's launcher a prebuilt argument list with the pointers as
    integers (:func:`bind_compiled`). In the interpreter, with :data:`BIND_COMPILED` off, or
    while a Triton launch hook is installed (a profiler's), every call goes through the JIT.
    ``kwargs`` holds the launch's keyword arguments (it keeps the tensors alive)."""

    def __init__(self, launch: Launch, grid, args: Dict[str, object], step: str = "t"):
        self.launch, self.kernel = launch, launch.kernel_fn()
        self.grid = tuple(grid)
        self.kwargs = launch.kwargs(args)
        self.step = step
        self._bound: Optional[Callable[[int], None]] = None
        self._tried = False

    def __call__(self, t: int) -> None:
        if self._bound is not None:
            self._bound(t)
            return
        self.kwargs[self.step] = t
        compiled = self.kernel[self.grid](**self.kwargs)
        if not self._tried:
            self._tried = True
            if BIND_COMPILED and compiled is not None and bound_launches_verified():
                self._bound = bind_compiled(self.kernel, compiled, self.grid, self.kwargs, self.step)


def bind_compiled(kernel, compiled, grid, kwargs: Dict[str, object], step: str) -> Optional[Callable[[int], None]]:
    """``launch(t)``: the compiled kernel's launcher called as Triton's JIT calls it (Triton 3.6
    through 3.9: ``run(grid x, y, z, stream, function, packed metadata, launch metadata, enter
    hook, exit hook, *every parameter in signature order)``, constexprs included and skipped by
    the launcher), on the current stream, the tensors' pointers bound as integers, no launch
    metadata and no hooks (the JIT passes empty hook chains), on the current stream of the device
    the tensors live on. None where that is not possible (a compiled kernel without these
    attributes, a launch hook installed): the caller keeps the JIT. :class:`StepLaunch` binds only
    on the Triton versions this argument order was checked against
    (:func:`bound_launches_verified`)."""
    try:
        from triton import knobs

        if _hook_installed(knobs.runtime.launch_enter_hook) or _hook_installed(knobs.runtime.launch_exit_hook):
            return None
        run = compiled.run  # (loads the module: ``function`` is set from here on)
        function, metadata = compiled.function, compiled.packed_metadata
        names = list(kernel.arg_names)
        args = [kwargs[n] for n in names]
        index = names.index(step)
        stream = _current_stream(_cuda_index(args))
    except (AttributeError, ImportError, KeyError, ValueError):
        return None
    args = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    g0, g1, g2 = (tuple(grid) + (1, 1))[:3]

    def launch(t: int) -> None:
        args[index] = t
        run(g0, g1, g2, stream, function, metadata, None, None, None, *args)

    return launch


def _cuda_index(args) -> Optional[int]:
    """The CUDA device index of the first CUDA tensor among ``args`` (None: no CUDA tensor)."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.device.type == "cuda":
            return a.device.index if a.device.index is not None else torch.cuda.current_device()
    return None


def _current_stream(device: Optional[int] = None):
    """The current stream of CUDA device ``device`` (the tensors' device; None: the current
    device), as Triton's JIT takes it for its launches."""
    from triton.runtime import driver

    return driver.active.get_current_stream(driver.active.get_current_device() if device is None else device)


# The Triton versions (major, minor), inclusive, whose CompiledKernel.run takes the positional
# arguments bind_compiled passes: read from Triton 3.6's and 3.9's sources (3.7, 3.8 between them).
# Outside this range every step launches through the JIT (:func:`bound_launches_verified`).
BOUND_TRITON_VERSIONS = ((3, 6), (3, 9))
_bound_verdicts: Dict[str, Optional[str]] = {}


def triton_version() -> str:
    """The installed Triton's version (``hyperkern.ops.registry.TRITON_VERSION``, read once from
    the package metadata; "" when not installed)."""
    from .registry import TRITON_VERSION

    return TRITON_VERSION


def bound_launch_refusal(version: str) -> Optional[str]:
    """Why launches are not bound on Triton ``version`` (None: they are)."""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    (lo_ma, lo_mi), (hi_ma, hi_mi) = BOUND_TRITON_VERSIONS
    if m is None:
        return f"the Triton version {version!r} cannot be read"
    if not (lo_ma, lo_mi) <= (int(m.group(1)), int(m.group(2))) <= (hi_ma, hi_mi):
        return (f"Triton {version} is outside {lo_ma}.{lo_mi}-{hi_ma}.{hi_mi}, the versions whose compiled-kernel "
                "launcher (CompiledKernel.run, a private API) the bound launches call positionally")
    return None


def bound_launches_verified() -> bool:
    """Whether :class:`StepLaunch` may bind the compiled kernel's launcher on this Triton. Outside
    :data:`BOUND_TRITON_VERSIONS` it warns once per version and every step goes through the JIT
    (the same kernels and results; more host time per launch) instead of risking a launch with
    its arguments in the wrong order."""
    version = triton_version()
    if version not in _bound_verdicts:
        why = bound_launch_refusal(version)
        _bound_verdicts[version] = why
        if why is not None:
            warnings.warn(f"hyperkern: {why}; every step launches through Triton's JIT instead (same results, "
                          "more host time per launch)", RuntimeWarning, stacklevel=3)
    return _bound_verdicts[version] is None


def _hook_installed(hook) -> bool:
    """A Triton launch hook that would run: a function, or a non-empty ``HookChain`` (Triton 3.6+
    keeps an empty chain by default)."""
    return hook is not None and bool(getattr(hook, "calls", True))
