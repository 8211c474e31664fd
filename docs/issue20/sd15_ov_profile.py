"""Where OpenVINO + NNCF INT8 gains over our W8A8 bundle on OpenVINO on the SD-1.5-shaped UNet: OpenVINO's
per-node counters of both at batch 2 (guidance), summed by node type and kernel, with each side's time in int8
kernels and in float ones. The NNCF model comes from docs/issue20/sd15_peers.py (WORKDIR/ov_nncf.xml).

    PYTHONPATH=<checkout> python docs/issue20/sd15_ov_profile.py BUNDLE WORKDIR [--runs 5]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np


def summary(profile: dict) -> dict:
    ops = profile["ops"]
    by_type, precision = collections.Counter(), collections.Counter()
    for key, v in ops.items():
        node, kernel = key.split(" / ", 1)
        by_type[node] += v["ms"]
        precision["int8" if kernel.lower().endswith(("_i8", "_u8")) else "other"] += v["ms"]
    return {"run_ms": profile["run_ms"], "kernel_ms": profile["kernel_ms"],
            "by_node_type_ms": {k: round(v, 2) for k, v in by_type.most_common()},
            "int8_vs_other_ms": {k: round(v, 2) for k, v in precision.items()}, "kernels": ops}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bundle")
    p.add_argument("workdir")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    from runtime.bundle import load_bundle
    from runtime.engine import example_cond
    from runtime.openvino import OpenVinoEngine

    bundle = load_bundle(args.bundle)
    work = Path(args.workdir)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *bundle.spec.sample_shape)).astype(np.float32)
    cond, t = example_cond(bundle.spec, 2, rng), np.full(2, 500, np.int64)
    report = {}
    for name, engine in (("ov-nncf", OpenVinoEngine(work / "ov_nncf.xml", bundle.spec)),
                         ("ours-openvino", bundle.engines(backend="openvino").for_timestep(500))):  # fmt: skip
        report[name] = summary(engine.profile(x, t, cond, runs=args.runs))
        del engine
        print(name, json.dumps({k: v for k, v in report[name].items() if k != "kernels"}), flush=True)
    a, b = report["ov-nncf"]["by_node_type_ms"], report["ours-openvino"]["by_node_type_ms"]
    diff = {k: round(b.get(k, 0) - a.get(k, 0), 2) for k in set(a) | set(b)}
    report["ours_minus_nncf_ms"] = dict(sorted(diff.items(), key=lambda kv: -abs(kv[1])))
    print("ours - nncf by node type (ms):", json.dumps(report["ours_minus_nncf_ms"]))
    (work / "sd15_ov_profile.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
