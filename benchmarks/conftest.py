"""The benchmark suites' thread count: the machine's (torch's default) unless
``HYPERKERN_BENCH_THREADS`` says otherwise — set for each benchmark and restored after, never at
import — and recorded in every result's ``extra_info``."""
import os

import pytest
import torch


@pytest.fixture(autouse=True)
def bench_threads(benchmark):
    n = torch.get_num_threads()
    want = int(os.environ.get("HYPERKERN_BENCH_THREADS", "0")) or n
    torch.set_num_threads(want)
    benchmark.extra_info["threads"] = want
    yield want
    torch.set_num_threads(n)
