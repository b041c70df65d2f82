"""Command line: ``python -m hyperkern {info,verify,bench,compile-check}``."""
from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    import platform

    import torch

    import hyperkern
    from hyperkern.ops.hyper_lstm import available_backends

    print(f"hyperkern {hyperkern.__version__}")
    print(f"python    {platform.python_version()} ({platform.machine()})")
    print(f"torch     {torch.__version__} (threads: {torch.get_num_threads()})")
    try:
        import triton

        print(f"triton    {triton.__version__}")
    except Exception as e:  # noqa: BLE001
        print(f"triton    not importable ({type(e).__name__}: {e})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"device    cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB)")
    else:
        print("device    cpu only (no CUDA device visible)")
    print("backends:")
    for name, (ok, why) in available_backends().items():
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
    sub.add_parser("compile-check", add_help=False,
                   help="compile every Triton kernel for sm_80/sm_90 (no GPU needed); --help for its options")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "compile-check":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        return _info(args)
    if args.command == "verify":
        from hyperkern.verify import main as verify_main

        return verify_main(backends=args.backend, seed=args.seed)
    if args.command == "bench":
        from hyperkern.bench import main as bench_main

        return bench_main(out=args.out, quick=args.quick, cases=args.case)
    if args.command == "compile-check":
        from hyperkern.compile_check import main as cc_main

        return cc_main(rest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
