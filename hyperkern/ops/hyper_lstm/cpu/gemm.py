"""``x @ W^T`` for a weight the time loop reuses every step, with the GEMM variant measured fastest.

Candidates: plain ``torch.mm``; MKL's packed sgemm (``torch.ops.mkl._mkl_reorder_linear_weight`` +
``_mkl_linear``); oneDNN's prepacked matmul (``torch.ops.mkldnn._reorder_linear_weight`` +
``_linear_pointwise``); and ``dot``, the C++ extension's own kernel (one dot product per output
over ``W`` as it is, nothing packed: at a batch of a few rows the product is a read of ``W``, and
this reads it at the cache's bandwidth; fp32 and fp64). Which one is fastest depends on the CPU,
not on a rule: on the AMD EPYCs oneDNN beat MKL at batched shapes and ``dot`` beat both at B=1, on
this project's Intel Xeon MKL's packed sgemm beat the library variants (docs/cpu_backend.md).

For each (M, N, K, dtype, thread count), the first use times every candidate available for that
dtype once: the cost of packing the weight (paid once per sequence call) and of one product (paid
every step), kept for the process. A product is timed WARM, as the time loop runs it: each
candidate in a block of consecutive calls after an untimed one, so that its weight sits in the
cache as it does in the loop (timed one call each in turn, the candidates' copies of a 16 MB
weight evicted each other from a 32 MB L3, and the figures were those of cold products the loop
never runs); the blocks go round-robin over the candidates, a few rounds, so that a burst of load
on a shared machine hits them alike; the figure is the median. A call that will apply the weight
``uses`` times then takes the variant with the smallest ``pack + uses · apply``. Plain ``mm`` packs nothing, so the choice is never slower than ``mm`` by
that measurement. :func:`choices` lists what was measured and chosen (``python -m hyperkern bench``
prints it).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

VARIANTS = ("mm", "mkl", "onednn", "dot")  # the C++ loop's Gemm::kind is the index in this tuple
REPEATS = 5  # timed products per block (after one untimed, warming call)
ROUNDS = 3  # blocks per variant, round-robin over the variants
timer = time.perf_counter  # the clock of the measurement (tests put a fake one here)

Key = Tuple[int, int, int, torch.dtype, int]  # (M, N, K, dtype, threads)
_measured: Dict[Key, Dict[str, Tuple[float, float]]] = {}  # key -> {variant: (pack s, apply s)}
_chosen: Dict[Tuple[Key, int], str] = {}  # (key, uses) -> variant


def available(dtype: torch.dtype) -> List[str]:
    """The variants this torch build offers for ``dtype`` on CPU (the packed ones are fp32 only;
    ``dot`` where the C++ extension runs: fp32 and fp64)."""
    out = ["mm"]
    if dtype == torch.float32:
        if torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"):
            out.append("mkl")
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            out.append("onednn")
    if dtype in (torch.float32, torch.float64) and _ext() is not None:
        out.append("dot")
    return out


def _ext():
    """The built C++ extension (building it at first use), or None."""
    from . import load

    return load()


def pack(variant: str, W: Tensor, batch: int) -> Optional[Tensor]:
    """``W [N, K]`` in the variant's own layout (None for ``mm``)."""
    if variant == "mkl":
        return torch.ops.mkl._mkl_reorder_linear_weight(W, batch)
    if variant == "onednn":
        return torch.ops.mkldnn._reorder_linear_weight(W, batch)
    if variant not in ("mm", "dot"):
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return None


def apply(variant: str, x: Tensor, W: Tensor, packed: Optional[Tensor], batch: int) -> Tensor:
    """``x @ W^T`` with the variant (``packed`` from :func:`pack`)."""
    if variant == "mkl":
        return torch.ops.mkl._mkl_linear(x, packed, W, None, batch)
    if variant == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    if variant == "dot":
        ext = _ext()
        if ext is not None:
            return ext.gemm((3, W, None, batch), x.contiguous())
        # chosen while the extension ran, and it no longer does (turned off or failed in this process)
    return torch.mm(x, W.t())


def _interleaved_medians(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median seconds per call of each fn, timed round-robin one call at a time (so a burst of
    load on a shared machine hits every candidate alike), after one warm-up call each. For the
    packing (paid once per call, cold: as the loop pays it)."""
    for fn in fns.values():
        fn()  # lazy initialisation, first-touch page faults
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = timer()
            fn()
            samples[k].append(timer() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def _warm_medians(fns: Dict[str, Callable[[], object]], repeats: int, rounds: int) -> Dict[str, float]:
    """Median seconds per call of each fn timed warm: ``rounds`` rounds, round-robin over the fns,
    each a block of one untimed call (it brings the fn's own weight back into the cache after the
    others' evicted it) and ``repeats`` timed ones, as the time loop runs a product step after step."""
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            fn()
            for _ in range(repeats):
                t0 = timer()
                fn()
                samples[k].append(timer() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def measure(M: int, N: int, K: int, dtype: torch.dtype) -> Dict[str, Tuple[float, float]]:
    """{variant: (pack seconds, apply seconds)} at this shape, measured once per process.

    A variant that fails here, or disagrees with ``mm`` beyond rounding, is left out."""
    key = (M, N, K, dtype, torch.get_num_threads())
    if key in _measured:
        return _measured[key]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g, dtype=dtype)
    W = torch.randn(N, K, generator=g, dtype=dtype)
    want = torch.mm(x, W.t())
    packed = {}
    for v in available(dtype):
        try:
            p = pack(v, W, M)
            if torch.allclose(apply(v, x, W, p, M), want, rtol=1e-4, atol=1e-3 * K ** 0.5):
                packed[v] = p
        except (RuntimeError, AttributeError):  # not in this torch build / not for this shape
            continue
    t_apply = _warm_medians({v: (lambda v=v: apply(v, x, W, packed[v], M)) for v in packed}, REPEATS, ROUNDS)
    t_pack = _interleaved_medians({v: (lambda v=v: pack(v, W, M)) for v in packed if v not in ("mm", "dot")}, 3)
    res = {v: (t_pack.get(v, 0.0), t_apply[v]) for v in packed}
    _measured[key] = res
    return res


def choose(M: int, N: int, K: int, dtype: torch.dtype, uses: int) -> str:
    """The variant with the smallest ``pack + uses · apply`` (ties and failures: ``mm``)."""
    if uses < 1:
        raise ValueError(f"uses must be >= 1, got {uses}")
    times = measure(M, N, K, dtype)
    best = min(times, key=lambda v: (times[v][0] + uses * times[v][1], v != "mm"), default="mm")
    _chosen[((M, N, K, dtype, torch.get_num_threads()), uses)] = best
    return best


class Linear:
    """``x @ W^T`` for ``x`` of up to ``batch`` rows, applied about ``uses`` times (one sequence
    call). Packs ``W`` once if the chosen variant packs; :meth:`arg` hands it to the C++ loop."""

    def __init__(self, W: Tensor, batch: int, uses: int):
        if not isinstance(W, Tensor) or W.dim() != 2:
            raise TypeError("W must be a 2-D tensor [out, in]")
        self.W, self.batch = W, batch
        on_cpu = W.device.type == "cpu"
        self.variant = choose(batch, W.shape[0], W.shape[1], W.dtype, uses) if on_cpu else "mm"
        self.packed = pack(self.variant, W, batch)

    def __call__(self, x: Tensor) -> Tensor:
        return apply(self.variant, x, self.W, self.packed, self.batch)

    def arg(self):
        """(kind, W, packed, batch): the C++ loop's ``Gemm``."""
        return VARIANTS.index(self.variant), self.W, self.packed, self.batch


def choices() -> List[dict]:
    """Every choice made in this process, with the measured times (µs) of every candidate."""
    rows = []
    for (key, uses), v in sorted(_chosen.items(), key=lambda kv: (str(kv[0][0][3]), kv[0][0][:3], kv[0][1])):
        M, N, K, dtype, threads = key
        rows.append({"M": M, "N": N, "K": K, "dtype": str(dtype).replace("torch.", ""), "threads": threads,
                     "uses": uses, "chosen": v,
                     "us": {c: {"pack": p * 1e6, "apply": a * 1e6} for c, (p, a) in _measured[key].items()}})
    return rows


def format_choices(rows: Optional[List[dict]] = None) -> str:
    """One line per choice: the shape, each candidate's apply (and pack) time, and the winner."""
    rows = choices() if rows is None else rows
    if not rows:
        return "GEMM choices: none made yet in this process"
    lines = ["GEMM choices (x[M,K] @ W[N,K]^T, µs per product timed warm as the loop runs it "
             "(+ packing once per call), measured here:"]
    for r in rows:
        cands = ", ".join(f"{c} {t['apply']:.0f}" + (f" (+{t['pack']:.0f})" if c not in ("mm", "dot") else "")
                          for c, t in r["us"].items())
        lines.append(f"  M={r['M']:<3d} K={r['K']:<5d} N={r['N']:<5d} {r['dtype']} {r['threads']} threads, "
                     f"{r['uses']} uses: {cands} -> {r['chosen']}")
    return "\n".join(lines)
