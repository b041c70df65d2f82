"""Command line: ``python -m hyperkern {info,verify,bench,compile-check,gpu-check}``."""
from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    import platform

    import torch

    import hyperkern
    from hyperkern.kernels.common import interpret_requested
    from hyperkern.ops import hyper_lstm, precision, static_gen
    from hyperkern.ops.registry import TRITON_VERSION

    print(f"hyperkern {hyperkern.__version__}")
    print(f"python    {platform.python_version()} ({platform.machine()})")
    print(f"torch     {torch.__version__} (threads: {torch.get_num_threads()})")
    print(f"triton    {TRITON_VERSION or 'not installed'}"
          + (" (TRITON_INTERPRET=1: kernels run in the interpreter on CPU tensors)" if interpret_requested() else ""))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"device    cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB)")
    else:
        print("device    cpu only (no CUDA device visible)")
    print(f"fp32 dots on CUDA: {precision.dot_precision(torch.float32)} (torch.backends.cuda.matmul TF32 flag; "
          "hyperkern.ops.precision)")
    for op_name, op in (("HyperLSTM", hyper_lstm), ("static generation", static_gen)):
        print(f"{op_name} backends (auto: first usable of {', '.join(op.REGISTRY.auto_order)}):")
        for name, (ok, why) in op.available_backends().items():
            print(f"  {name:10s} {'yes' if ok else 'no '}  {why}")
    from hyperkern.ops.hyper_lstm import cpu

    ok, why = cpu.status(build=True)  # builds it on first use (~30 s once), else says why not
    print(f"torch backend on CPU (fp32/fp64), vector ISA {cpu.isa()}:")
    print(f"  C++ loop   {'yes' if ok else 'no '}  {why}")
    print("  GEMMs      each reused weight's variant (mm, MKL-packed, oneDNN) measured at first use per shape; "
          "`bench` prints the choices")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, available backends")
    p_verify = sub.add_parser("verify", help="every available backend against the float64 reference")
    p_verify.add_argument("--backend", action="append", help="only these backends (repeatable)")
    p_verify.add_argument("--seed", type=int, default=0)
    p_bench = sub.add_parser("bench", help="benchmark table vs nn.LSTM (also written as JSON)")
    p_bench.add_argument("--out", default="bench-results", help="folder for the JSON (and plot)")
    p_bench.add_argument("--quick", action="store_true", help="fewer steps and repeats (smoke run)")
    p_bench.add_argument("--case", action="append", help="only these cases (repeatable)")
    p_bench.add_argument("--threads", type=int, help="intra-op threads (default: the machine's, as torch picks them)")
    p_bench.add_argument("--gpu-check", metavar="JSON", help="a gpu-check.json whose measured µs per step the "
                         "report shows beside the modelled ones")
    sub.add_parser("compile-check", add_help=False,
                   help="compile every Triton kernel for sm_80/sm_90 (no GPU needed); --help for its options")
    sub.add_parser("gpu-check", add_help=False,
                   help="on a CUDA machine: correctness, graphs, compile, determinism, timings -> gpu-check.json "
                        "(--dry-run: the same at tiny sizes on CPU); --help for its options")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("compile-check", "gpu-check"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        return _info(args)
    if args.command == "verify":
        from hyperkern.verify import main as verify_main

        return verify_main(backends=args.backend, seed=args.seed)
    if args.command == "bench":
        from hyperkern.bench import main as bench_main

        return bench_main(out=args.out, quick=args.quick, cases=args.case, gpu_check=args.gpu_check, threads=args.threads)
    if args.command == "compile-check":
        from hyperkern.compile_check import main as cc_main

        return cc_main(rest)
    if args.command == "gpu-check":
        from hyperkern.gpu_check import main as gc_main

        return gc_main(rest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
