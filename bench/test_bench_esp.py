"""pytest-benchmark variant of bench/bench_esp.py (run with `make bench`). Setup (restoring the
frames, a fresh replay window) is outside the timed call; each case has its baselines in the same
run: the OpenSSL raw GCM ceiling (C) and the per-packet Python AESGCM loop."""
from __future__ import annotations

import pytest
from bench_esp import BATCH, SIZES, SUITES, make_case, time_ceiling, time_python


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("op", ["decrypt", "encrypt"])
@pytest.mark.parametrize("suite", list(SUITES))
def test_esp_batch(benchmark, suite, op, size):
    case = make_case(suite, size, op)
    try:
        result = benchmark.pedantic(case.run, setup=case.restore, rounds=300, warmup_rounds=10)
        assert result == BATCH
        pps = BATCH / benchmark.stats.stats.mean
        benchmark.extra_info.update(pps=round(pps))
        if suite == "gcm128":
            ceiling = time_ceiling(size, 0.2)
            python = time_python(size, op, 0.2)
            benchmark.extra_info.update(ceiling_pps=round(ceiling), python_pps=round(python),
                                        ratio_ceiling=round(pps / ceiling, 3),
                                        ratio_python=round(pps / python, 2))
    finally:
        case.close()
