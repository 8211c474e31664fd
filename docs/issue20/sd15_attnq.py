"""Does quantizing the attention score/value products close OpenVINO + NNCF's lead on the SD-1.5-shaped UNet?
Per-step latency with guidance (batch 2), interleaved in one process: NNCF's model (WORKDIR/ov_nncf.xml from
docs/issue20/sd15_peers.py), our bundle and our bundle compiled with --quantize-attention, both on OpenVINO.

    PYTHONPATH=<checkout> python docs/issue20/sd15_attnq.py BUNDLE BUNDLE_ATTNQ WORKDIR [--reps 7]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bundle")
    p.add_argument("bundle_attnq")
    p.add_argument("workdir")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    from runtime.bundle import load_bundle
    from runtime.openvino import OpenVinoEngine
    from tools.deploy.pipeline import latency_ratio

    bundle, work = load_bundle(args.bundle), Path(args.workdir)
    engines = {
        "ov-nncf": OpenVinoEngine(work / "ov_nncf.xml", bundle.spec),
        "ours-openvino": bundle.engines(backend="openvino").for_timestep(500),
        "ours-openvino-attnq": load_bundle(args.bundle_attnq).engines(backend="openvino").for_timestep(500),
    }
    report = {"latency_batch2": latency_ratio(engines, bundle.spec, batch=2, reps=args.reps)}
    nncf = report["latency_batch2"]["ov-nncf"]["median_ms"]
    report["nncf_speedup_over"] = {k: round(v["median_ms"] / nncf, 3) for k, v in report["latency_batch2"].items()}
    print(json.dumps(report, indent=1))
    (work / "sd15_attnq.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
