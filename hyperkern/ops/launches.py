"""One kernel launch's configuration as data (:class:`Launch`), shared by both ops' config tables.

A launcher asks its op's ``configs`` module for the :class:`Launch` of a call and launches with
:meth:`Launch.kwargs` (keyword arguments only: a swapped pair of same-typed arguments cannot pass
silently); ``python -m hyperkern compile-check`` compiles every :class:`Launch` the tables can
produce (``all_launches()``) with the same constexprs, warps, stages and register cap.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Dict, Optional, Tuple


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
