"""The SD-1.5-shaped UNet (random weights, 3.4 GB in FP32, past protobuf's 2 GiB): per-step latency with
guidance (batch 2) of the FP32 graph on ONNX Runtime and of our W8A8 bundle on ONNX Runtime and OpenVINO,
interleaved in one process, and the resident memory each adds. The pipeline and bundle come from
`docs/issue20/sd15.sh`.

    PYTHONPATH=<checkout> python docs/issue20/sd15_step.py PIPELINE_DIR BUNDLE WORKDIR [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("pipeline")
    p.add_argument("bundle")
    p.add_argument("workdir")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    from calibration.model_io import load_model
    from runtime.bundle import load_bundle
    from tools.deploy.pipeline import fp32_engine, latency_ratio

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"resident_mb": {}}
    if not (work / "fp32.onnx").is_file():
        model = load_model(args.pipeline, prompts=("a photo of a cat",))
        start = time.perf_counter()
        fp32_engine(model, work)  # export through the > 2 GiB path, saved with external data
        report["fp32_export_seconds"] = round(time.perf_counter() - start, 1)
        del model
    from runtime.engine import OrtEngine

    bundle = load_bundle(args.bundle)
    engines = {}
    before = rss_mb()
    engines["ort-fp32"] = OrtEngine(work / "fp32.onnx", bundle.spec)
    latency_ratio({"ort-fp32": engines["ort-fp32"]}, bundle.spec, batch=2, reps=1)
    report["resident_mb"]["ort-fp32"] = round(rss_mb() - before, 1)
    for name, backend in (("ours-ort", "ort"), ("ours-openvino", "openvino")):
        before = rss_mb()
        engines[name] = bundle.engines(backend=backend).for_timestep(500)
        latency_ratio({name: engines[name]}, bundle.spec, batch=2, reps=1)
        report["resident_mb"][name] = round(rss_mb() - before, 1)
    report["latency_batch2"] = latency_ratio(engines, bundle.spec, batch=2, reps=args.reps)
    fp = report["latency_batch2"]["ort-fp32"]["median_ms"]
    report["speedup_vs_ort_fp32"] = {k: round(fp / v["median_ms"], 3) for k, v in report["latency_batch2"].items()}
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(report, indent=1))
    (work / "sd15_step.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
