"""Ahead-of-time compile check of every Triton kernel for sm_80 and sm_90 (no GPU needed).

``python -m hyperkern compile-check [--filter SUBSTR] [--arch 80|90] [--json PATH] [--jobs N] [--list]``

Each op's launch table in :data:`LAUNCH_TABLES` (``hyperkern/ops/*/configs.py``) enumerates with
``all_launches()`` every :class:`~hyperkern.ops.launches.Launch` its launcher can make — the same
constexprs, warps, stages and register cap the launcher passes — and the kernel module's
``ARG_TYPES`` types the arguments (``hyperkern.kernels.common.signature``). For every (launch, arch) this compiles the
kernel with ``triton.compile`` (GPUTarget cuda 80 / 90, warp size 32), runs the wheel's ``ptxas -v``
on the PTX with Triton's own flags (``-lineinfo --regAllocOptLevel=2``, ``--gpu-name=sm_80`` or
``sm_90a``) and reports registers, spill stores/loads, stack frame and shared memory
(``metadata.shared``) against the per-block limit. The exit status is non-zero if any config fails
to compile, spills, or needs more shared memory than the architecture has.

Compilation runs in at most two fresh interpreter processes with ``TRITON_INTERPRET`` unset, so
the kernels are real ``JITFunction`` objects even when the caller (e.g. the test suite) runs the
interpreter. Triton's own on-disk cache is used as usual.

To register a launch table: add its import path to :data:`LAUNCH_TABLES`. (A module may instead
expose ``compile_configs()`` returning :class:`CompileConfig` objects: the tests compile ad-hoc
kernels that way.)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

LAUNCH_TABLES: List[str] = [
    "hyperkern.ops.static_gen.configs",
    "hyperkern.ops.hyper_lstm.fused_triton.configs",
]

ARCHS = (80, 90)
SMEM_LIMIT = {80: 166_912, 90: 232_448}  # bytes of shared memory per block (opt-in maximum)
GPU_NAME = {80: "sm_80", 90: "sm_90a"}
MAX_JOBS = 2


@dataclass
class CompileConfig:
    """One kernel specialisation to compile: the JITFunction, every argument's type, the constexprs."""

    name: str  # label of the configuration, e.g. "fp16 D64"
    fn: Any  # the @triton.jit kernel
    signature: Dict[str, str]  # every argument -> "*fp32", "i32", ..., or "constexpr"
    constexprs: Dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    maxnreg: Optional[int] = None  # Triton's ``maxnreg`` option (PTX ``.maxnreg``), as the launcher passes it
    cooperative: bool = False  # ``launch_cooperative_grid``, as the launcher passes it (a launch option)

    @property
    def kernel(self) -> str:
        return getattr(self.fn, "__name__", None) or self.fn.fn.__name__

    @property
    def full_name(self) -> str:
        return f"{self.kernel} [{self.name}]"


# --- parsing and verdicts (pure functions, unit-tested) -----------------------------------------

_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(text: str) -> Dict[str, int]:
    """Registers, stack frame and spill bytes from ``ptxas -v`` output (maximum over functions)."""
    regs = [int(m) for m in _RE_REGS.findall(text)]
    frames = [tuple(map(int, m)) for m in _RE_FRAME.findall(text)]
    if not regs:
        raise ValueError(f"no 'Used N registers' line in the ptxas log:\n{text}")
    return {
        "registers": max(regs),
        "stack_frame": max((f[0] for f in frames), default=0),
        "spill_stores": max((f[1] for f in frames), default=0),
        "spill_loads": max((f[2] for f in frames), default=0),
    }


def problems(row: Dict[str, Any]) -> List[str]:
    """Why a result row fails the check (empty list: it passes)."""
    if row.get("error"):
        return [f"compile error: {row['error'].splitlines()[0] if row['error'] else ''}"]
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    if row["shared"] > SMEM_LIMIT[row["arch"]]:
        out.append(f"shared memory {row['shared']} B > {SMEM_LIMIT[row['arch']]} B")
    return out


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    head = ("kernel", "config", "arch", "warps", "regs", "spill st/ld B", "stack B", "smem B", "smem limit", "status")
    lines = []
    for r in rows:
        bad = problems(r)
        if r.get("error"):
            vals = (r["kernel"], r["config"], GPU_NAME[r["arch"]], str(r["num_warps"]), "-", "-", "-", "-",
                    str(SMEM_LIMIT[r["arch"]]), "FAIL: " + "; ".join(bad))
        else:
            vals = (r["kernel"], r["config"], GPU_NAME[r["arch"]], str(r["num_warps"]), str(r["registers"]),
                    f"{r['spill_stores']}/{r['spill_loads']}", str(r["stack_frame"]), str(r["shared"]),
                    str(SMEM_LIMIT[r["arch"]]), "ok" if not bad else "FAIL: " + "; ".join(bad))
        lines.append(vals)
    widths = [max(len(h), *(len(v[c]) for v in lines)) if lines else len(h) for c, h in enumerate(head)]
    fmt = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(v) for v in lines])


# --- the worker: runs in a fresh interpreter without TRITON_INTERPRET ------------------------------

def compile_config(launch, unit_ints: Sequence[str] = ()) -> CompileConfig:
    """The :class:`CompileConfig` of a :class:`~hyperkern.ops.launches.Launch`; ``unit_ints``: integer
    arguments set to 1 (Triton's JIT turns an integer argument equal to 1 into a constexpr, so a
    launch with B = 1 or E = 1 compiles that specialisation)."""
    import importlib

    from hyperkern.kernels.common import signature

    fn = launch.kernel_fn()
    cx = {**dict(launch.constexprs), **{n: None for n in launch.absent}, **{n: 1 for n in unit_ints}}
    sig = signature(fn, launch.dtype, cx, **importlib.import_module(launch.module).ARG_TYPES)
    return CompileConfig(name=launch.label + (" ints=1" if unit_ints else ""), fn=fn, signature=sig, constexprs=cx,
                         num_warps=launch.num_warps, num_stages=launch.num_stages, maxnreg=launch.maxnreg,
                         cooperative=launch.cooperative)


def _all_configs(modules: Sequence[str]) -> List[CompileConfig]:
    """Every launch of every table, then the ints=1 specialisation of each kernel's first launch."""
    import importlib

    configs = []
    for mod_name in modules:
        mod = importlib.import_module(mod_name)
        if hasattr(mod, "compile_configs"):
            configs.extend(mod.compile_configs())
            continue
        launches = mod.all_launches()
        configs.extend(compile_config(launch) for launch in launches)
        for kernel, ones in getattr(mod, "UNIT_INTS", {}).items():
            configs.append(compile_config(next(l for l in launches if l.kernel == kernel), ones))
    return configs


def _matches(cfg: CompileConfig, filters: Optional[Sequence[str]]) -> bool:
    return not filters or any(f.lower() in cfg.full_name.lower() for f in filters)


def _jobs(configs: Sequence[CompileConfig], filters, archs) -> List[tuple]:
    return [(ci, arch) for ci, cfg in enumerate(configs) if _matches(cfg, filters) for arch in archs]


def _ptxas_path(arch: int) -> str:
    from triton.backends.nvidia import compiler as nv

    try:
        return nv.get_ptxas(arch).path
    except TypeError:  # older signature: get_ptxas() without the architecture
        return nv.get_ptxas().path


def _compile_one(cfg: CompileConfig, arch: int) -> Dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row: Dict[str, Any] = {"kernel": cfg.kernel, "config": cfg.name, "arch": arch, "num_warps": cfg.num_warps,
                           "num_stages": cfg.num_stages}
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=cfg.fn, signature=dict(cfg.signature), constexprs=dict(cfg.constexprs))
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        if cfg.maxnreg is not None:
            options["maxnreg"] = cfg.maxnreg
        if cfg.cooperative:
            options["launch_cooperative_grid"] = True
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = compiled.asm["ptx"]
        with tempfile.TemporaryDirectory() as tmp:
            ptx_path = os.path.join(tmp, "kernel.ptx")
            with open(ptx_path, "w") as f:
                f.write(ptx)
            cmd = [_ptxas_path(arch), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={GPU_NAME[arch]}",
                   ptx_path, "-o", os.path.join(tmp, "kernel.cubin")]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"ptxas failed ({res.returncode}): {res.stderr.strip()}")
        row.update(parse_ptxas_log(res.stdout + res.stderr))
        row["shared"] = int(compiled.metadata.shared)
        row["error"] = None
    except Exception as e:  # noqa: BLE001  (reported as a failing row)
        row["error"] = f"{type(e).__name__}: {e}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _worker_main(argv: Sequence[str]) -> int:
    """``--shard K/N``: compile every N-th configuration starting at K (all its architectures);
    one JSON line per job on stdout."""
    p = argparse.ArgumentParser()
    p.add_argument("--shard", required=True)
    p.add_argument("--filter", action="append")
    p.add_argument("--arch", type=int, action="append")
    p.add_argument("--module", action="append")
    a = p.parse_args(argv)
    k, n = map(int, a.shard.split("/"))
    configs = _all_configs(a.module)
    for idx, (ci, arch) in enumerate(_jobs(configs, a.filter, a.arch)):
        if ci % n != k:  # whole configurations per shard: a shard of one architecture only would run longer
            continue
        row = _compile_one(configs[ci], arch)
        row["index"] = idx
        print(json.dumps(row), flush=True)
    return 0


def _list_configs(modules, filters, archs) -> int:
    env = _worker_env()
    code = ("import json, sys\nfrom hyperkern.compile_check import _all_configs, _jobs\n"
            "c = _all_configs(sys.argv[1].split(','))\n"
            "print(json.dumps([c[i].full_name + ' @ sm_' + str(a) for i, a in _jobs(c, json.loads(sys.argv[2]), "
            "json.loads(sys.argv[3]))]))")
    out = subprocess.run([sys.executable, "-c", code, ",".join(modules), json.dumps(filters), json.dumps(archs)],
                         env=env, capture_output=True, text=True, check=True)
    for name in json.loads(out.stdout):
        print(name)
    return 0


def _worker_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def run(filters: Optional[Sequence[str]] = None, archs: Sequence[int] = ARCHS, jobs: int = MAX_JOBS,
        modules: Sequence[str] = tuple(LAUNCH_TABLES)) -> List[Dict[str, Any]]:
    """Compile the selected configs in ``jobs`` (<= 2) worker processes; the result rows in order."""
    jobs = max(1, min(int(jobs), MAX_JOBS))
    base = [sys.executable, "-c", "import sys; from hyperkern.compile_check import _worker_main; "
                                  "sys.exit(_worker_main(sys.argv[1:]))"]
    opts = [x for m in modules for x in ("--module", m)]
    opts += [x for f in (filters or ()) for x in ("--filter", f)]
    opts += [x for a in archs for x in ("--arch", str(a))]
    procs = [subprocess.Popen(base + ["--shard", f"{k}/{jobs}"] + opts, env=_worker_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(jobs)]
    rows = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"compile-check worker failed (exit {proc.returncode}):\n{err[-4000:]}")
        rows.extend(json.loads(line) for line in out.splitlines() if line.startswith("{"))
    return sorted(rows, key=lambda r: r["index"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hyperkern compile-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--filter", action="append", metavar="SUBSTR",
                   help="only configs whose 'kernel [config]' contains SUBSTR (case-insensitive; repeatable)")
    p.add_argument("--arch", type=int, action="append", choices=ARCHS, help="80 or 90 (repeatable; default both)")
    p.add_argument("--json", metavar="PATH", help="also write the result rows as JSON")
    p.add_argument("--jobs", type=int, default=MAX_JOBS, help=f"worker processes (at most {MAX_JOBS})")
    p.add_argument("--list", action="store_true", help="list the selected configs without compiling")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `python -m hyperkern compile-check -- --filter X` (argparse REMAINDER quirk)
        argv = argv[1:]
    a = p.parse_args(argv)
    archs = sorted(set(a.arch or ARCHS))
    if a.list:
        return _list_configs(LAUNCH_TABLES, a.filter, archs)
    t0 = time.perf_counter()
    rows = run(a.filter, archs, a.jobs)
    if not rows:
        print(f"compile-check: no config matches {a.filter!r}", file=sys.stderr)
        return 2
    print(format_table(rows))
    failed = [r for r in rows if problems(r)]
    print(f"\n{len(rows)} compiled in {time.perf_counter() - t0:.1f} s: "
          f"{len(rows) - len(failed)} ok, {len(failed)} failed")
    for r in failed:
        if r.get("error"):
            print(f"\n{r['kernel']} [{r['config']}] sm_{r['arch']}:\n{r['error']}", file=sys.stderr)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
