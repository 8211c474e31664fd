"""Which Q/DQ placement runs fastest on which CPU backend: cifar10-shaped W8A8 lp bundles, ort-cpu vs trt-fp32."""

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from calibration.config import CalibrationConfig
from calibration.model_io import load_model
from runtime.bundle import load_bundle
from tools.bench.synthetic import build_unet, save_pipeline
from tools.deploy import pipeline

root = Path(tempfile.mkdtemp())
model = load_model(save_pipeline(build_unet("cifar10"), root / "m"))
engines = {}
for target in ("ort-cpu", "trt-fp32"):
    cfg = CalibrationConfig.for_method("lp", bits="W8A8", steps=100, calib_samples=8, calib_timesteps=8, target=target)
    b = pipeline.compile_model(model, root / target, cfg, overwrite=True, progress=False)
    for backend in ("ort", "openvino"):
        engines[f"{target}/{backend}"] = load_bundle(b).engines(backend=backend, spin=False).for_timestep(500)
    engines[f"{target}/openvino-bf16"] = load_bundle(b).engines(backend="openvino", hint="bf16").for_timestep(500)
out = {}
for batch in (1, 8):
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    t = np.full(batch, 500)
    times = {k: [] for k in engines}
    for r in range(16):
        for k, e in engines.items():
            s = time.perf_counter()
            e.infer(x, t)
            if r:
                times[k].append(time.perf_counter() - s)
    out[batch] = {k: round(1e3 * float(np.median(v)), 2) for k, v in times.items()}
    print(batch, out[batch], flush=True)
x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
ref = {k: e.infer(x, np.full(4, 500)) for k, e in engines.items()}
base = {k: ref[k.split("/")[0] + "/ort"] for k in ref}
out["eps_rel_diff_vs_ort"] = {k: float(np.linalg.norm(v - base[k]) / np.linalg.norm(base[k])) for k, v in ref.items()}
print(out["eps_rel_diff_vs_ort"], flush=True)
json.dump(out, open("/work/runs/placement.json", "w"), indent=1)
