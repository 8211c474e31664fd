"""Issue 23 on OpenVINO: one compiled model for all groups (runtime.openvino_single) against one per group and
against G = 1. Per model, compile a W8A8 bundle with one scale set (G1) and one with 8 groups (G8) on `dqc
bench`'s calibration settings (reused when OUT already holds them), then at batch 1 and 8 (guidance doubles the
engine batch of a class model):
- resident memory of G1, G8 one model and G8 per-group models, each in a fresh process;
- per-call latency, the three interleaved over the 100 calibrated steps (group switches included);
- quality: 64 samples (seed 0, DDIM 100, the model's guidance) of G8 on the one model, on per-group models and on
  ONNX Runtime: PSNR of one model vs per group, and of each vs ONNX Runtime (what switching the backend moves).
Usage: PYTHONPATH=<checkout> python docs/issue23/openvino_memory.py OUT_DIR [reference,cifar10]"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from calibration.config import CalibrationConfig
from calibration.model_io import load_model
from runtime.bundle import load_bundle
from runtime.sampler import SamplerConfig, sample
from tools.bench.speed import interleaved_latency, measure_memory, open_engine
from tools.bench.synthetic import build_unet, save_pipeline
from tools.deploy import pipeline
from tools.reference.model import REFERENCE_GUIDANCE, resolve_model

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["reference"]
report = {}
CONFIGS = {"G1": ("openvino", "G1"), "G8 one model": ("openvino", "G8"), "G8 per group": ("openvino-pergroup", "G8")}
for name in names:
    trained = name == "reference"
    source = resolve_model("reference") if trained else out / "cifar10"
    if not trained and not (source / "unet").is_dir():
        save_pipeline(build_unet("cifar10"), source)
    guidance = REFERENCE_GUIDANCE if trained else 1.0
    common = dict(bits="W8A8", steps=100, guidance=guidance, batch_size=16, calib_samples=32 if trained else 8,
                  calib_timesteps=16 if trained else 8)  # fmt: skip
    cfgs = {
        "G1": CalibrationConfig.for_method("lp", **common),
        "G8": CalibrationConfig.for_method(
            "apqdm", **common, groups=8, timestep_selection="uniform", group_epochs=2 if trained else 1
        ),  # fmt: skip
    }
    paths = {}
    for k, cfg in cfgs.items():
        paths[k] = out / f"{name}_{k}"
        if not (paths[k] / "manifest.json").is_file():
            start = time.perf_counter()
            pipeline.compile_model(load_model(source), paths[k], cfg, overwrite=True, progress=False)
            print(f"{name} {k}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
    g8 = load_bundle(paths["G8"])
    spec, rows = g8.spec, {"groups_used": len({int(g) for g in g8.group_of_t})}
    steps = [int(t) for t in g8.schedule.timesteps(100)]
    for batch in (1, 8):
        calls = batch * (2 if spec.num_class_embeds is not None else 1)
        mem = {k: measure_memory(b, str(paths[p]), spec, calls)["rss_mb"] for k, (b, p) in CONFIGS.items()}
        engines = {k: open_engine(b, str(paths[p])) for k, (b, p) in CONFIGS.items()}
        lat = interleaved_latency(engines, spec, steps, calls, 200)
        median = {k: v["median_ms"] for k, v in lat.items()}
        rows[batch] = {"engine_batch": calls, "memory_mb": mem, "latency": lat,
                       "memory_vs_G1": {k: round(v / mem["G1"], 3) for k, v in mem.items()},
                       "latency_vs_G1": {k: round(v / median["G1"], 3) for k, v in median.items()}}  # fmt: skip
        print(name, batch, json.dumps({k: rows[batch][k] for k in ("memory_mb", "memory_vs_G1", "latency_vs_G1")}),
              flush=True)  # fmt: skip
    runs = {}
    for label, backend, single in (("one model", "openvino", None), ("per group", "openvino", False),
                                   ("onnxruntime", "ort", False)):  # fmt: skip
        es = g8.engines(backend=backend, single=single)
        labels = np.arange(64) % 10 if spec.num_class_embeds is not None else None
        run = sample(es, g8.schedule, SamplerConfig("ddim", 100, 0.0, guidance), n=64, seed=0, cond=labels,
                     null_cond=g8.null_class, batch_size=16, progress=False)  # fmt: skip
        runs[label] = np.clip(run.samples, -1, 1).astype(np.float64)
    rows["quality"] = {}
    for a, b in (("one model", "per group"), ("per group", "onnxruntime"), ("one model", "onnxruntime")):
        d = runs[a] - runs[b]  # the second is the reference; ONNX Runtime vs OpenVINO is the floor a backend sets
        mse_i = np.mean(d.reshape(len(d), -1) ** 2, axis=1)
        per_sample = 10 * np.log10(4 / np.maximum(mse_i, 1e-30))
        rows["quality"][f"{a} vs {b}"] = {
            "n": 64, "max_abs_diff": float(np.abs(d).max()),
            "psnr_pooled_db": None if not mse_i.mean() else float(10 * np.log10(4 / mse_i.mean())),
            "psnr_mean_per_sample_db": float(np.mean(per_sample))}  # fmt: skip
    print(name, "quality", rows["quality"], flush=True)
    report[name] = rows
pipeline.write_json(out / "openvino_memory.json", report)
print(f"wrote {out / 'openvino_memory.json'}")
