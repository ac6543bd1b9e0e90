"""Cost of one LayerMerge DP solve (issue 6: 400 rows and a few thousand latency units, well under a second).

    python benchmarks/bench_dp.py [--rows 400] [--units 1000,3000,10000] [--repeats 5]

Random rows over 80 positions (segments of up to 5 convs), latencies 0.1-1.0 ms, importances <= 0;
the budget is 70% of the original latency split into the given number of units. Median of repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnxprune.planning.dp import Row, pareto, solve  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--units", default="1000,3000,10000")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    positions = 80
    rows = [Row(s, s + 1, float(rng.uniform(1e-4, 1e-3)), 0.0) for s in range(positions)]
    while len(rows) < args.rows:
        s = int(rng.integers(0, positions - 1))
        e = int(min(positions, s + rng.integers(1, 6)))
        rows.append(Row(s, e, float(rng.uniform(1e-4, 1e-3)) * (e - s) * 0.6, -float(rng.exponential(0.05))))
    original = sum(r.latency for r in rows[:positions])
    budget = 0.7 * original
    print(f"| rows | units | solve s (median of {args.repeats}) | Pareto curve s (one table) | chosen latency / budget |")
    print("| --- | --- | --- | --- | --- |")
    for units in (int(u) for u in args.units.split(",")):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            solution = solve(rows, positions, budget, budget / units)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pareto(rows, positions, original, original / units)
        curve = time.perf_counter() - t0
        print(f"| {len(rows)} | {units} | {statistics.median(times):.3f} | {curve:.3f} | "
              f"{solution.latency / budget:.4f} |", flush=True)


if __name__ == "__main__":
    main()
