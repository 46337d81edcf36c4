"""The memory's nearest-neighbour search (raad_kernels.nearest) against its torch peer, on the
shape `raad score` runs: 8 images × 32×32 stride-4 cells, 24 standardised channels, a 2048-cell
coreset bank. pytest-benchmark, one group; the peer (torch GEMM then min, `torch.cdist` then min)
in the same run:

    .venv/bin/python -m pytest benchmarks/test_bench_nearest.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from raad_kernels import nearest as N

M, BANK, C = 8 * 32 * 32, 2048, 24


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    queries = [torch.randn(M, C, generator=g) for _ in range(2)]   # two sets, alternated
    bank = torch.randn(BANK, C, generator=g)
    return queries, bank, N.prepare_bank(bank), N.prepare_bank_int8(bank)


VARIANTS = {
    "torch_cdist_min": lambda q, b, pf, pi: torch.cdist(q, b).min(1).values,
    "torch_gemm_min": lambda q, b, pf, pi: N.nearest_sq_distance_reference(q, b),
    "kernel_fp32": lambda q, b, pf, pi: N.nearest_sq_distance(q, b, pf),
    "kernel_int8": lambda q, b, pf, pi: N.nearest_sq_distance_int8(q, b, pi),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_memory_search_speed(benchmark, problem, name):
    if name == "kernel_fp32" and N._FUSED_KERNEL is None or name == "kernel_int8" and N._INT8_KERNEL is None:
        pytest.skip("the CPU extension's kernel is not available here")
    queries, bank, pf, pi = problem
    benchmark.group = f"nearest {M}x{BANK}x{C}"
    benchmark.extra_info["threads"] = torch.get_num_threads()
    state = {"i": 0}

    def step():
        state["i"] ^= 1
        VARIANTS[name](queries[state["i"]], bank, pf, pi)

    benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=2)
