"""Cross-attention K/V once per request: per-step latency with guidance (batch 2) of a text bundle with the
prompt part cut out of its step graph (`prompt_cache=True`, runtime.prompt_cache) and without, interleaved in
one process (ONNX Runtime sessions without spin-waiting, so that the idle one does not slow the other), on
each CPU backend given; the outputs of both; the prompt part's own time (once per request and
group); the resident memory each engine adds.

    PYTHONPATH=<checkout> python docs/issue20/kv_step.py BUNDLE OUT.json [--backends ort,openvino] [--reps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bundle")
    p.add_argument("out")
    p.add_argument("--backends", default="ort")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    from runtime.bundle import load_bundle
    from runtime.engine import example_cond
    from tools.deploy.pipeline import latency_ratio

    bundle = load_bundle(args.bundle)
    spec = bundle.spec
    spec_t = spec.num_train_timesteps // 2
    rng = np.random.default_rng(1)
    x = rng.standard_normal((args.batch, *spec.sample_shape), dtype=np.float32)
    ts = np.full(args.batch, spec_t, np.int64)
    cond = example_cond(spec, args.batch, rng)
    report: dict = {"bundle": args.bundle, "batch": args.batch, "reps": args.reps, "resident_mb": {}, "outputs": {},
                    "prompt_part_ms": {}}  # fmt: skip
    engines = {}
    for backend in args.backends.split(","):
        outs = {}
        for cached in (False, True):
            name = f"{backend}-{'kv-once' if cached else 'whole'}"
            before = rss_mb()
            engine = bundle.engines(backend=backend, prompt_cache=cached, single=False, spin=False).for_timestep(spec_t)
            outs[cached] = engine.infer(x, ts, cond)
            report["resident_mb"][name] = round(rss_mb() - before, 1)
            engines[name] = engine
            if cached:  # the prompt part alone, as it runs once per request and group
                feeds = {"encoder_hidden_states": example_cond(spec, args.batch, np.random.default_rng(2))}
                times = []
                for _ in range(5):
                    engine.prompt.clear()
                    start = time.perf_counter()
                    engine.prompt.substitute(dict(feeds))
                    times.append(time.perf_counter() - start)
                report["prompt_part_ms"][name] = round(1e3 * float(np.median(times)), 2)
        diff = np.abs(outs[True] - outs[False])
        report["outputs"][backend] = {"max_abs_diff": float(diff.max()), "equal": bool((diff == 0).all())}
    report["latency"] = latency_ratio(engines, spec, batch=args.batch, reps=args.reps)
    for backend in args.backends.split(","):
        lat = report["latency"]
        report[f"{backend}_whole_over_kv_once"] = round(
            lat[f"{backend}-whole"]["median_ms"] / lat[f"{backend}-kv-once"]["median_ms"], 3
        )
    print(json.dumps(report, indent=1))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
