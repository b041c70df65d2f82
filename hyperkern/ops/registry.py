"""The backend registry both ops use: what each backend supports, how ``"auto"`` chooses, and why
an explicit choice cannot run.

Each op (``hyperkern.ops.hyper_lstm``, ``hyperkern.ops.static_gen``) declares one
:class:`Registry` of :class:`Backend` records. A backend states the devices and dtypes it computes
in, whether it trains, and (as functions) what else it needs: a package that must import, the
Triton interpreter for CPU tensors, op-specific limits (an embedding or hidden size). Resolution
asks all of it:

- ``"auto"`` takes the first backend in the op's preference order that runs the call (device,
  dtype, training, sizes) in this process — e.g. float64 on CUDA goes to ``torch``;
- an explicit name that cannot run raises ``ValueError`` saying why.

The modules, ``verify``, ``bench`` and ``info`` all ask the registry; nothing else decides.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
WhyNot = Optional[str]  # None: it can; else a sentence saying why not


def _always(*_args, **_kwargs) -> WhyNot:
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str  # one line for ``info``
    fn: Callable  # the backend's entry point
    dtypes: Mapping[str, Tuple[torch.dtype, ...]]  # device type -> dtypes it computes in
    training: bool = True  # has a backward
    auto_devices: Optional[Tuple[str, ...]] = None  # device types "auto" may pick it for (None: all)
    requires: Callable[[str], WhyNot] = _always  # device type -> what is missing in this process
    limits: Callable[..., WhyNot] = _always  # op facts (keyword arguments) -> why they are out of range

    def why_not(self, device=None, dtype: Optional[torch.dtype] = None, training: Optional[bool] = None,
                **facts) -> WhyNot:
        """Why this backend cannot run the described call here (None: it can). Unknown facts
        (``device=None`` ...) are not checked; with no device, some device must work."""
        devices = [torch.device(device).type] if device is not None else list(self.dtypes)
        reasons = []
        for dev in devices:
            if dev not in self.dtypes:
                reasons.append(f"does not run on {dev} (runs on {', '.join(self.dtypes)})")
                continue
            if dtype is not None and dtype not in self.dtypes[dev]:
                names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes[dev])
                reasons.append(f"does not compute in {str(dtype).replace('torch.', '')} on {dev} (supports {names})")
                continue
            why = self.requires(dev)
            if why is not None:
                reasons.append(why)
                continue
            return self._why_not_facts(training, facts)
        return "; ".join(reasons)

    def _why_not_facts(self, training, facts) -> WhyNot:
        if training and not self.training:
            return "is forward only (no backward)"
        return self.limits(**facts)


@dataclass
class Registry:
    op: str  # what the error messages call the op
    backends: Sequence[Backend]
    auto_order: Tuple[str, ...]  # the backends ``"auto"`` tries, in order
    by_name: Dict[str, Backend] = field(init=False)

    def __post_init__(self):
        self.by_name = {b.name: b for b in self.backends}
        unknown = [n for n in self.auto_order if n not in self.by_name]
        if unknown:
            raise ValueError(f"auto_order names unknown backends {unknown}")

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self.by_name)

    def check_name(self, name: str) -> None:
        if name != "auto" and name not in self.by_name:
            raise ValueError(f"backend must be one of {self.names + ('auto',)}, got {name!r}")

    def status(self, name: str, device=None, dtype=None, training=None, **facts) -> Tuple[bool, str]:
        """(usable, why or what): can ``name`` run the described call in this process."""
        self.check_name(name)
        if name == "auto":
            return True, "picks the first usable of " + ", ".join(self.auto_order)
        b = self.by_name[name]
        why = b.why_not(device, dtype, training, **facts)
        return (why is None), (b.summary if why is None else why)

    def resolve(self, name: str, device, dtype: Optional[torch.dtype] = None, training: Optional[bool] = None,
                **facts) -> str:
        """``"auto"`` -> the first backend of :attr:`auto_order` that runs the call; an explicit
        name -> itself, or ValueError saying why it cannot run the call."""
        self.check_name(name)
        if name == "auto":
            dev = torch.device(device).type
            for cand in self.auto_order:
                b = self.by_name[cand]
                if (b.auto_devices is None or dev in b.auto_devices) and b.why_not(device, dtype, training, **facts) is None:
                    return cand
            raise ValueError(f"no {self.op} backend runs this call "
                             f"(device {device}, dtype {dtype}): " + "; ".join(
                                 f"{n}: {self.by_name[n].why_not(device, dtype, training, **facts)}"
                                 for n in self.auto_order))
        why = self.by_name[name].why_not(device, dtype, training, **facts)
        if why is not None:
            raise ValueError(f"backend {name!r} cannot run this {self.op} call: {why}")
        return name

    def get(self, name: str) -> Callable:
        """The entry point of a resolved backend name."""
        self.check_name(name)
        if name == "auto":
            raise ValueError("resolve 'auto' first (Registry.resolve)")
        return self.by_name[name].fn

    def available(self) -> Dict[str, Tuple[bool, str]]:
        """Every backend: (usable on some device here, why or what) — what ``info`` prints."""
        return {n: self.status(n) for n in self.names}


# --- what the Triton backends need -----------------------------------------------------------------

def _triton_version() -> str:
    """Triton's version, or "" when it is not installed (read from its metadata: Triton itself is
    not imported, which takes seconds)."""
    if importlib.util.find_spec("triton") is None:
        return ""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return "unknown version"


# Read once, at import: a module constant is what torch.compile can trace through without a break
# (a package does not appear or vanish while a process runs).
TRITON_VERSION = _triton_version()


def triton_requires(device_type: str) -> WhyNot:
    """Triton kernels: Triton installed; CPU tensors only under the interpreter."""
    from hyperkern.kernels.common import interpret_requested

    if not TRITON_VERSION:
        return "needs the triton package (pip install triton; CUDA builds of torch bring it)"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible"
    if device_type == "cpu" and not interpret_requested():
        return "needs CUDA tensors (CPU tensors run only in Triton's interpreter: TRITON_INTERPRET=1, slow, for tests)"
    return None
