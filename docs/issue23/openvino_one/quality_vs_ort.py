"""The yardstick for quality.py: ONNX Runtime (per-group sessions) on the same seeds and prompts, against both
OpenVINO forms. Usage: PYTHONPATH=<checkout> python docs/issue23/openvino_one/quality_vs_ort.py BUNDLE OUT_DIR N
(after quality.py, same OUT_DIR)"""

import json
import sys
import time
from pathlib import Path

from tools.deploy import pipeline
from tools.reference.metrics import evaluate
from tools.reference.prompts import prompts_for

bundle, out, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
prompts = prompts_for("held-out", n)[0]
f = out / "ort_per-group.npz"
st = time.perf_counter()
pipeline.sample_to_file(
    bundle,
    f,
    n=n,
    steps=100,
    eta=0.0,
    seed=0,
    guidance=1.5,
    batch_size=100,
    backend="ort",
    ort_engines="per-group",
    prompts=prompts,
    progress=False,
)
print("ort sampled in", round(time.perf_counter() - st, 1), "s", flush=True)
keys = ("psnr_vs_reference", "psnr_ci95", "psnr_pooled_vs_reference", "psnr_pooled_ci95")
rep = {}
for mode in ("per-group", "one"):
    r = evaluate(out / f"ov_{mode}.npz", reference=f)
    rep[f"openvino {mode} vs ort per-group"] = {k: r.get(k) for k in keys}
print(json.dumps(rep, indent=1))
(out / "quality_vs_ort.json").write_text(json.dumps(rep, indent=1))
