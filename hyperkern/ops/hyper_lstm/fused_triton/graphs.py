"""Whole-call CUDA graphs of the Triton backend: what ``HyperLSTM`` runs on a GPU by default.

Eagerly, a call's time loop costs the host one Python-level launch per kernel per step (2 per
forward step, 2 per reverse step, 4 when recomputing): tens of microseconds of host time per step
against a device time per step of ~10 µs at small sizes (``perf_model``; measured by ``gpu-check``).
A CUDA graph replays the whole call with one host call.

What is captured: one whole forward call (:func:`.launch.run_sequence`: the x-projection GEMM, the
2T launches of the time loop, the final-state casts) or one whole backward call
(:func:`.launch.run_backward`: the loop's launches and every GEMM after it), over static input
buffers, into a ``torch.cuda.CUDAGraph`` with its own memory pool.

- **Key**: everything a graph bakes in (:func:`graph_key`): the op and its scalar arguments
  (sizes, layer norm, forget bias, eps, save mode, dropout p), every input's shape and dtype and
  whether it is present, the device, the dot precision, PyTorch's TF32 flag (the library GEMMs'
  precision), and every parameter's address, shape, strides and dtype. Parameters are read in place: an optimizer's in-place update is seen by the
  next replay; a new parameter tensor is a new key.
- **Per call**: the first time a key is seen the call runs eagerly (a key seen once, e.g. one
  sequence length among many, costs nothing more); the second time its graph is captured (after
  one warm-up run on the static buffers, on the capture stream) and replayed; later calls replay.
  A replay copies the call's tensors into the static inputs (x, the initial state, lengths, the
  dropout seed or masks; in the backward the saved tensors and the incoming gradients), replays,
  and copies the outputs out, so a call's results are its own as in eager mode: bitwise the eager
  results (the same kernels on the same values). The dropout seed is an input, never baked in.
  A replay waits for the previous replay of the same graph to have copied its outputs out (it
  may have run on another stream). Captures are thread-local (``capture_error_mode``); a capture
  that fails anyway (out of memory, ...) warns once and leaves that key on the eager loop.
- **Skipped** (the eager loop runs): ``cuda_graphs=False``; a device that is not CUDA; inside an
  outer graph capture (the user's own ``torch.cuda.graph``, ``torch.compile(mode="reduce-overhead")``);
  while ``torch.compile`` traces; a graph bigger than the cache's byte budget on its own; limits
  of 0 entries or 0 bytes.
- **Bounded**: at most :data:`DEFAULT_MAX_ENTRIES` graphs holding at most
  :data:`DEFAULT_MEMORY_FRACTION` of the device's memory (an entry holds its static inputs and its
  pool: one call's outputs, saved tensors and scratch, measured at capture), least recently used
  evicted first. An evicted key is captured again where it fits without evicting another, or
  after :data:`RECAPTURE_AFTER` eager calls (so a working set larger than the cache recaptures a
  key at most once per that many of its calls, and a phase that fits gets its graphs back).
  Eager calls run outside the cache's lock. :func:`set_cuda_graph_cache`, :func:`cuda_graph_cache_info`,
  :func:`clear_cuda_graph_cache` (also ``hyperkern.*``); a deleted model's graphs stay until
  evicted or cleared.

The capture itself is :class:`CudaGraphCapture`; tests on a machine without a GPU swap in a stub
(``CACHE.capturer``) to check the keys, the eviction, the skip conditions and the data flow.
"""
from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...precision import tf32_enabled

DEFAULT_MAX_ENTRIES = 32
DEFAULT_MEMORY_FRACTION = 0.125  # of the device's memory, over all cached graphs (unless max_bytes is set)
_SEEN_PER_ENTRY = 4  # keys remembered (seen once, too big, evicted, failed): up to 4x max_entries
# An evicted key that finds no room runs eagerly; after this many such calls it is captured again
# anyway (evicting the least recently used): a working set larger than the cache then recaptures
# at most once per RECAPTURE_AFTER calls of a key, and a phase that fits (eval after training)
# gets its graphs back.
RECAPTURE_AFTER = 8

Inputs = Sequence[Optional[Tensor]]


@dataclass
class Captured:
    """One captured call: ``replay()`` rewrites ``outputs`` from ``static_inputs``."""

    static_inputs: List[Optional[Tensor]]
    outputs: List[Tensor]
    replay: Callable[[], None]
    nbytes: int  # device memory it holds (static inputs + the graph's pool)
    done: Optional["torch.cuda.Event"] = None  # CUDA: the last replay's outputs copied out (any stream)


class CudaGraphCapture:
    """Captures a call with ``torch.cuda.CUDAGraph`` on one side stream per device."""

    def __init__(self):
        self._streams: Dict[int, "torch.cuda.Stream"] = {}

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def device_memory(self, device: torch.device) -> Optional[int]:
        return torch.cuda.get_device_properties(device).total_memory

    def capture(self, fn: Callable[..., List[Tensor]], inputs: Inputs) -> Captured:
        device = next(t.device for t in inputs if t is not None)
        with torch.cuda.device(device):
            if device.index not in self._streams:
                self._streams[device.index] = torch.cuda.Stream(device)
            stream = self._streams[device.index]
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # what the graph holds is measured as reserved memory
            before = torch.cuda.memory_reserved()
            static = [None if t is None else t.clone(memory_format=torch.contiguous_format) for t in inputs]
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up on the static buffers: compiles, inits cuBLAS
                fn(*static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA work of other threads (a DataLoader's pinned-memory thread, NCCL's
            # watchdog) must not invalidate the capture (the backward is captured on autograd's thread)
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                outputs = list(fn(*static))
            nbytes = torch.cuda.memory_reserved() - before
        return Captured(static, outputs, graph.replay, nbytes)


@dataclass
class CacheInfo:
    entries: int
    nbytes: int
    max_entries: int
    max_bytes: Optional[int]  # None before the first capture (then DEFAULT_MEMORY_FRACTION of its device's memory)
    counts: Dict[str, int] = field(default_factory=dict)
    # eager_first, captured, replayed, evicted, too_big, no_room, capture_failed, skipped_<reason>


class GraphCache:
    """Captured calls by key, least recently used first out (see the module docstring)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: Optional[int] = None, capturer=None):
        self.max_entries = max_entries
        self.max_bytes = max_bytes  # None until the first capture: DEFAULT_MEMORY_FRACTION of its device's memory
        self.capturer = capturer if capturer is not None else CudaGraphCapture()
        self._entries: "OrderedDict[Hashable, Captured]" = OrderedDict()
        # keys not cached: "once" (seen once), "too_big" (alone over the budget), or "evicted" (with its bytes)
        self._seen: "OrderedDict[Hashable, Tuple[str, int, int]]" = OrderedDict()  # (what, bytes, no_room calls)
        self._lock = threading.RLock()
        self.counts: Dict[str, int] = {}

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def skip_reason(self, enabled: bool, device: torch.device) -> Optional[str]:
        """Why a call runs eagerly, or None when it may use a graph."""
        if not enabled or self.max_entries == 0 or self.max_bytes == 0:
            return "disabled"
        if not self.capturer.supports(device):
            return "device"
        if torch.compiler.is_compiling():
            return "compiling"
        if _outer_capture():
            return "outer_capture"
        return None

    def run(self, key: Hashable, fn: Callable[..., List[Tensor]], inputs: Inputs, *, enabled: bool = True
            ) -> List[Tensor]:
        """``fn(*inputs)``, replayed from a graph when the key allows (``inputs``: the call's
        tensors that change between calls, None for an absent optional input)."""
        device = next(t.device for t in inputs if t is not None)
        reason = self.skip_reason(enabled, device)
        if reason is not None:
            self._count("skipped_" + reason)
            return list(fn(*inputs))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._count("replayed")
                return _replay(entry, inputs)
            eager = self._eager_reason(key, device)
            if eager is None:
                return self._capture(key, fn, inputs)
            self._count(eager)
        return list(fn(*inputs))  # eagerly, outside the lock: other threads' calls go on meanwhile

    def _eager_reason(self, key: Hashable, device: torch.device) -> Optional[str]:
        """Why this uncached key runs eagerly now (what it counts as), or None: capture it."""
        seen, nbytes, no_room = self._seen.get(key, (None, 0, 0))
        if seen is None:
            self._remember(key, "once")
            return "eager_first"
        if seen in ("too_big", "capture_failed"):
            self._remember(key, seen)
            return seen
        if self.max_bytes is None:
            self.max_bytes = _fraction(self.capturer.device_memory(device))
        if seen == "evicted" and not self._room(nbytes) and no_room + 1 < RECAPTURE_AFTER:
            self._remember(key, "evicted", nbytes, no_room + 1)
            return "no_room"
        return None

    def _capture(self, key: Hashable, fn: Callable[..., List[Tensor]], inputs: Inputs) -> List[Tensor]:
        try:
            entry = self.capturer.capture(fn, inputs)
        except Exception as e:  # noqa: BLE001  (out of memory, an illegal call during capture, ...)
            self._remember(key, "capture_failed")  # this key runs eagerly from now on
            self._count("capture_failed")
            _warn_capture_failed(e)
            return list(fn(*inputs))
        self._count("captured")
        if self.max_bytes is not None and entry.nbytes > self.max_bytes:
            self._remember(key, "too_big")  # alone over the budget: replay once, keep nothing
            return _replay(entry, inputs)
        self._seen.pop(key, None)
        self._entries[key] = entry
        self._evict()
        self._count("replayed")
        return _replay(entry, inputs)

    def _room(self, nbytes: int) -> bool:
        """Whether an entry of ``nbytes`` fits beside the cached ones without an eviction."""
        return len(self._entries) < self.max_entries and (
            self.max_bytes is None or self.nbytes() + nbytes <= self.max_bytes)

    def _remember(self, key: Hashable, what: str, nbytes: int = 0, no_room: int = 0) -> None:
        self._seen[key] = (what, nbytes, no_room)
        self._seen.move_to_end(key)
        while len(self._seen) > _SEEN_PER_ENTRY * max(self.max_entries, 1):
            self._seen.popitem(last=False)

    def _evict(self) -> None:
        while self._entries and (len(self._entries) > self.max_entries
                                 or (self.max_bytes is not None and self.nbytes() > self.max_bytes)):
            key, entry = self._entries.popitem(last=False)
            self._remember(key, "evicted", entry.nbytes)
            self._count("evicted")

    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(len(self._entries), self.nbytes(), self.max_entries, self.max_bytes, dict(self.counts))

    def set_limits(self, max_entries: Optional[int] = None, max_bytes: Optional[int] = None) -> None:
        for name, v in (("max_entries", max_entries), ("max_bytes", max_bytes)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        with self._lock:
            if max_entries is not None:
                self.max_entries = max_entries
            if max_bytes is not None:
                self.max_bytes = max_bytes
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._seen.clear()
            self.counts.clear()


def _replay(entry: Captured, inputs: Inputs) -> List[Tensor]:
    """Copy the call's inputs in, replay, copy the outputs out. On CUDA a replay first waits for
    the previous one's copies out (it may have run on another stream): the static buffers are shared."""
    statics = [s for s, t in zip(entry.static_inputs, inputs) if t is not None]
    cuda = statics[0].is_cuda
    if cuda and entry.done is not None:
        torch.cuda.current_stream(statics[0].device).wait_event(entry.done)
    torch._foreach_copy_(statics, [t for t in inputs if t is not None])
    entry.replay()
    outs = [torch.empty_like(o) for o in entry.outputs]
    torch._foreach_copy_(outs, entry.outputs)
    if cuda:
        entry.done = torch.cuda.Event()
        entry.done.record(torch.cuda.current_stream(statics[0].device))
    return outs


_warned = False


def _warn_capture_failed(e: Exception) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"hyperkern: capturing a HyperLSTM call in a CUDA graph failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:160] if str(e) else ''}); such calls run the eager loop "
                      "(cuda_graph_cache_info().counts['capture_failed'] counts them)", RuntimeWarning, stacklevel=5)


def _fraction(memory: Optional[int]) -> Optional[int]:
    return None if memory is None else int(memory * DEFAULT_MEMORY_FRACTION)


def _outer_capture() -> bool:
    """Whether the current CUDA stream is being captured (False on a build without CUDA)."""
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except (RuntimeError, AssertionError):
        return False


def tensor_key(t: Optional[Tensor]) -> Optional[Tuple]:
    """An input's part of a key: its shape and dtype (its values are copied in at each replay)."""
    return None if t is None else (tuple(t.shape), t.dtype)


def param_key(p: Tensor) -> Tuple:
    """A parameter's part of a key: a graph reads it in place, so its address, shape and strides."""
    return (p.data_ptr(), tuple(p.shape), p.stride(), p.dtype)


def graph_key(op: str, scalars: Tuple, inputs: Inputs, params: Sequence[Tensor], device: torch.device,
              dot: str) -> Tuple:
    """The key of a captured call: the op, its scalar arguments, its inputs (:func:`tensor_key`),
    its parameters (:func:`param_key`), the device, the kernels' dot precision and PyTorch's TF32
    flag (it also sets the precision of the library GEMMs a graph bakes in, whatever the dtype)."""
    return (op, scalars, tuple(tensor_key(t) for t in inputs), tuple(param_key(p) for p in params),
            str(device), dot, tf32_enabled())


CACHE = GraphCache()


def set_cuda_graph_cache(max_entries: Optional[int] = None, max_bytes: Optional[int] = None) -> None:
    """Bound the Triton backend's cache of captured calls (evicts at once if over it): at most
    ``max_entries`` graphs (default 32) holding at most ``max_bytes`` of device memory (default:
    an eighth of the device's memory); either 0: nothing is captured."""
    CACHE.set_limits(max_entries, max_bytes)


def cuda_graph_cache_info() -> CacheInfo:
    """Entries, bytes held, limits, and counts of what calls did (eager_first, captured, replayed,
    evicted, too_big, no_room, capture_failed, skipped_<reason>)."""
    return CACHE.info()


def clear_cuda_graph_cache() -> None:
    """Drop every captured graph (their memory returns to PyTorch's caching allocator)."""
    CACHE.clear()
