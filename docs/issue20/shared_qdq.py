"""One Q/DQ per tensor, measured: two bundles of one model compiled alike, A before the change (a Q/DQ per
layer) and B after it (one per tensor). Prints their Q/DQ counts (as exported and after ONNX Runtime's
optimizer), the largest output difference on seeded inputs, and per-step latency interleaved in one process.

    PYTHONPATH=<checkout> python docs/issue20/shared_qdq.py A B [--batch 2] [--reps 40]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from exporter.bundle_writer import ort_optimized_op_counts
from runtime.bundle import load_bundle
from runtime.engine import example_cond


def counts(bundle: Path) -> dict:
    graph = bundle / "group_0.onnx"
    ops = collections.Counter(n.op_type for n in onnx.load(str(graph), load_external_data=False).graph.node)
    with tempfile.TemporaryDirectory() as tmp:
        optimized = ort_optimized_op_counts(graph, Path(tmp) / "o.onnx")
    keep = (
        "QuantizeLinear",
        "DequantizeLinear",
        "QLinearConv",
        "MatMulIntegerToFloat",
        "QGemm",
        "DynamicQuantizeLinear",
    )
    return {"exported": {k: ops.get(k, 0) for k in keep[:2]}, "optimized": {k: optimized.get(k, 0) for k in keep}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=40)
    args = p.parse_args()
    bundles = [load_bundle(args.a), load_bundle(args.b)]
    spec = bundles[0].spec
    engines = [b.engines(backend="ort", single=False) for b in bundles]
    rng = np.random.default_rng(0)
    diff = 0.0
    for t in (50, 500, 950):
        x = rng.standard_normal((args.batch, *spec.sample_shape)).astype(np.float32)
        c = example_cond(spec, args.batch, rng)
        ts = np.full(args.batch, t)
        ya, yb = (e.for_timestep(t).infer(x, ts, c) for e in engines)
        diff = max(diff, float(np.abs(ya - yb).max()))
    x = rng.standard_normal((args.batch, *spec.sample_shape)).astype(np.float32)
    c, ts = example_cond(spec, args.batch, rng), np.full(args.batch, 500)
    times: list[list[float]] = [[], []]
    for _ in range(3):  # warm-up
        for e in engines:
            e.for_timestep(500).infer(x, ts, c)
    for _ in range(args.reps):
        for i, e in enumerate(engines):
            start = time.perf_counter()
            e.for_timestep(500).infer(x, ts, c)
            times[i].append(1e3 * (time.perf_counter() - start))
    med = [statistics.median(t) for t in times]
    report = {
        "a": {"bundle": args.a, **counts(Path(args.a)), "ms_per_call_median": round(med[0], 3)},
        "b": {
            "bundle": args.b,
            **counts(Path(args.b)),
            "ms_per_call_median": round(med[1], 3),
            "shared_input_qdq": len(bundles[1].manifest.get("shared_input_qdq", {})),
        },
        "b_over_a_latency": round(med[1] / med[0], 4),
        "max_abs_output_difference": diff,
        "batch": args.batch,
        "reps": args.reps,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
