"""The SD-1.5-shaped UNet's CPU peers: ONNX Runtime's `quantize_static` (QDQ, MinMax) and OpenVINO + NNCF INT8,
calibrated on the inputs our compile recorded (`record_trajectories` with the bundle's calibration settings),
then per-step latency with guidance (batch 2) against ORT FP32 and our bundle on ORT and OpenVINO, interleaved
in one process. Each peer is built in its own child process (one 3.4 GB FP32 graph in memory at a time).

    PYTHONPATH=<checkout> python docs/issue20/sd15_peers.py PIPELINE_DIR BUNDLE WORKDIR [--reps 7]

WORKDIR must hold fp32.onnx (+ .data) from docs/issue20/sd15_step.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def build(peer: str, pipeline: str, bundle: str, work: Path) -> dict:
    from calibration.collect import record_trajectories
    from calibration.config import CalibrationConfig
    from calibration.model_io import load_model
    from runtime.bundle import load_bundle
    from tools.bench.peer import nncf_peer, quantize_static_peer

    man = load_bundle(bundle).manifest
    prompts = tuple(man["components"]["calibration_prompts"])
    cal = man["calibration"]
    cfg = CalibrationConfig.for_method("naive", bits="W8A8", steps=cal["steps"], guidance=cal["guidance"],
                                       calib_samples=cal["samples"], calib_timesteps=cal["timesteps"])  # fmt: skip
    model = load_model(pipeline, prompts=prompts)
    data = record_trajectories(model, cfg, False)
    del model
    start = time.perf_counter()
    if peer == "ort-static":
        quantize_static_peer(work / "fp32.onnx", work / "ort_static.onnx", data, batch=2)
    else:
        nncf_peer(work / "fp32.onnx", work / "ov_nncf.xml", data, batch=2, progress=False)
    return {"seconds": round(time.perf_counter() - start, 1), "inputs": len(data)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("pipeline")
    p.add_argument("bundle")
    p.add_argument("workdir")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--build", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.workdir)
    if args.build:
        print(json.dumps(build(args.build, args.pipeline, args.bundle, work)))
        return
    report: dict = {"build": {}}
    for peer in ("ov-nncf", "ort-static"):
        done = subprocess.run([sys.executable, __file__, args.pipeline, args.bundle, args.workdir, "--build", peer],
                              capture_output=True, text=True)  # fmt: skip
        report["build"][peer] = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                                 else {"error": done.stderr.strip().splitlines()[-1:]})  # fmt: skip
        print(peer, report["build"][peer], flush=True)
    from runtime.bundle import load_bundle
    from runtime.engine import OrtEngine
    from runtime.openvino import OpenVinoEngine
    from tools.deploy.pipeline import latency_ratio

    bundle = load_bundle(args.bundle)
    engines = {"ort-fp32": OrtEngine(work / "fp32.onnx", bundle.spec, spin=False)}
    if (work / "ort_static.onnx").is_file():
        engines["ort-static"] = OrtEngine(work / "ort_static.onnx", bundle.spec, spin=False)
    if (work / "ov_nncf.xml").is_file():
        engines["ov-nncf"] = OpenVinoEngine(work / "ov_nncf.xml", bundle.spec)
    engines["ours-ort"] = bundle.engines(backend="ort", spin=False).for_timestep(500)
    engines["ours-openvino"] = bundle.engines(backend="openvino").for_timestep(500)
    report["latency_batch2"] = latency_ratio(engines, bundle.spec, batch=2, reps=args.reps)
    fp = report["latency_batch2"]["ort-fp32"]["median_ms"]
    report["speedup_vs_ort_fp32"] = {k: round(fp / v["median_ms"], 3) for k, v in report["latency_batch2"].items()}
    print(json.dumps(report, indent=1))
    (work / "sd15_peers.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
