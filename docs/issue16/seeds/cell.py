"""cell.py OUT SEED [key=value ...]: qdiffusion W4A8 (1000/200 iters) calibrated with SEED, sampled with seed 0."""

import json
import sys
import time
from pathlib import Path

from calibration.config import CalibrationConfig
from tools.deploy import pipeline
from tools.reference.metrics import evaluate
from tools.reference.model import resolve_model  # noqa

out, seed = Path(sys.argv[1]), int(sys.argv[2])
extra = {k: (type(getattr(CalibrationConfig, k))(v)) for k, v in (a.split("=") for a in sys.argv[3:])}
out.mkdir(parents=True, exist_ok=True)
cfg = CalibrationConfig.for_method(
    "qdiffusion", bits="W4A8", steps=100, guidance=1.5, seed=seed, adaround_iters=1000, act_iters=200, **extra
)
t = time.time()
pipeline.compile_model(resolve_model("reference"), out / "bundle", cfg, overwrite=True, progress=False)
t = time.time() - t
pipeline.sample_to_file(
    out / "bundle", out / "samples.npz", n=500, steps=100, eta=0.0, seed=0, guidance=1.5, batch_size=250, progress=False
)
r = evaluate(out / "samples.npz", reference=Path("/work/runs/fp_eta0_500.npz"))
r["compile_seconds"] = t
json.dump(r, open(out / "eval.json", "w"), indent=1)
print(
    out,
    seed,
    extra,
    "fd",
    r["fd"],
    "psnr",
    r.get("psnr_vs_reference"),
    r.get("psnr_ci95"),
    r.get("psnr_pooled_vs_reference"),
)
