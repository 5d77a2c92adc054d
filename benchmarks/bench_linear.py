# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Why the decode linears take `few_rows_linear`: F.linear vs W @ x^T for a few rows, on this machine.

    python benchmarks/bench_linear.py --threads 2            # appends a table to benchmarks/RESULTS.md

Decode steps multiply 1-3 positions per row by every weight matrix, so each product should cost one read of the
weight. The table gives milliseconds per product (median of --repeats) for the backbone's MLP and attention shapes.
"""

import argparse
import datetime
import statistics
import time

import torch
import torch.nn.functional as F

from results_file import RESULTS, append_section

SHAPES = [(8192, 2048), (2048, 8192), (2048, 2048)]  # (out, in): backbone gate/up, down, q/o
ROWS = [1, 2, 3, 8, 24, 64]


def median_ms(fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [f"\n## {datetime.date.today()} · linear with few rows, CPU, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads): ms per product, F.linear / W @ x^T\n",
             "| dtype | weight (out x in) | " + " | ".join(f"{r} rows" for r in ROWS) + " |",
             "|---|---|" + "---|" * len(ROWS)]
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for out_features, in_features in SHAPES:
            weight = torch.randn(out_features, in_features, dtype=dtype)
            cells = []
            for rows in ROWS:
                x = torch.randn(rows, in_features, dtype=dtype)
                plain = median_ms(lambda: F.linear(x, weight), args.repeats)
                transposed = median_ms(lambda: torch.mm(weight, x.t()).t().contiguous(), args.repeats)
                cells.append(f"{plain:.2f} / {transposed:.2f}")
            lines.append(f"| {dtype_name} | {out_features} x {in_features} | " + " | ".join(cells) + " |")
    append_section(args.results, lines)


if __name__ == "__main__":
    main()
