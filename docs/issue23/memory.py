"""Issue 23: one engine for every timestep group. Per model (the shipped reference model; the CIFAR-10-shaped
UNet with random weights), compile a W8A8 bundle with one scale set (G = 1) and one with 8 groups (G = 8) on the
same calibration settings as `dqc bench`, then at batch 1 and 8:
- ONNX Runtime: `dqc bench G8 --groups-vs G1` (resident memory of each engine configuration in a fresh process,
  per-step latency over the 100 calibrated steps with group switches);
- OpenVINO: resident memory of G8 and G1 (fresh processes; one compiled model per group) and interleaved latency;
- quality: the reference G8 bundle sampled by the one engine and by per-group sessions (same seeds).
Usage: PYTHONPATH=<checkout> python docs/issue23/memory.py OUT_DIR [reference,cifar10]"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from calibration.config import CalibrationConfig
from calibration.model_io import load_model
from runtime import openvino
from runtime.bundle import load_bundle
from tools.bench.group_bench import run_group_bench
from tools.bench.speed import interleaved_latency, measure_memory, open_engine
from tools.bench.synthetic import build_unet, save_pipeline
from tools.deploy import pipeline
from tools.reference.model import REFERENCE_GUIDANCE, resolve_model

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["reference", "cifar10"]
report = {}
for name in names:
    trained = name == "reference"
    source = resolve_model("reference") if trained else out / "cifar10"
    if not trained and not (source / "unet").is_dir():
        save_pipeline(build_unet("cifar10"), source)
    model = load_model(source)
    guidance = REFERENCE_GUIDANCE if trained else 1.0
    common = dict(
        bits="W8A8",
        steps=100,
        guidance=guidance,
        batch_size=16,
        calib_samples=32 if trained else 8,
        calib_timesteps=16 if trained else 8,
    )
    cfgs = {
        "G1": CalibrationConfig.for_method("lp", **common),
        "G8": CalibrationConfig.for_method(
            "apqdm", **common, groups=8, timestep_selection="uniform", group_epochs=2 if trained else 1
        ),
    }
    paths = {}
    for k, cfg in cfgs.items():
        paths[k] = out / f"{name}_{k}"
        if not (paths[k] / "manifest.json").is_file():
            start = time.perf_counter()
            pipeline.compile_model(model, paths[k], cfg, overwrite=True, progress=False)
            print(f"{name} {k}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
    spec = load_bundle(paths["G8"]).spec
    rows = {}
    for batch in (1, 8):
        calls = batch * (2 if spec.num_class_embeds is not None else 1)  # guidance doubles the engine batch
        r = {"ort": run_group_bench(str(paths["G8"]), str(paths["G1"]), batch=calls, reps=5, progress=False)}
        if openvino.available():
            mem = {k: measure_memory("openvino", str(paths[k]), spec, calls) for k in ("G1", "G8")}
            engines = {k: open_engine("openvino", str(paths[k])) for k in ("G1", "G8")}
            steps = [int(t) for t in load_bundle(paths["G8"]).schedule.timesteps(100)]
            lat = interleaved_latency(engines, spec, steps, calls, 200)
            r["openvino"] = {
                "memory_mb": mem,
                "latency": lat,
                "memory_ratio": mem["G8"]["rss_mb"] / mem["G1"]["rss_mb"],
                "latency_ratio": lat["G8"]["median_ms"] / lat["G1"]["median_ms"],
            }
        rows[batch] = r
        print(json.dumps({name: {batch: r.get("openvino", {})}}, default=str)[:600], flush=True)
    report[name] = rows
    if trained:
        b = load_bundle(paths["G8"])
        runs = {}
        for single in (None, False):
            from runtime.sampler import SamplerConfig, sample

            es = b.engines(single=single)
            run = sample(
                es,
                b.schedule,
                SamplerConfig("ddim", 100, 0.0, guidance),
                n=64,
                seed=0,
                cond=np.arange(64) % 10,
                null_cond=b.null_class,
                batch_size=16,
                progress=False,
            )
            runs["single" if single is None else "per-group"] = np.clip(run.samples, -1, 1)
        diff = runs["single"] - runs["per-group"]
        mse = float(np.mean(diff.astype(np.float64) ** 2))
        report["quality"] = {
            "n": 64,
            "max_abs_diff": float(np.abs(diff).max()),
            "mse": mse,
            "psnr_db": None if mse == 0 else float(10 * np.log10(4 / mse)),
        }
        print("quality", report["quality"], flush=True)
pipeline.write_json(out / "memory.json", report)
print(f"wrote {out / 'memory.json'}")
