"""Issue 23: a text bundle sampled on OpenVINO with one compiled model for all groups and with one per group (same
seeds, N held-out-template prompts, DDIM 100, guidance 1.5); PSNR of the first against the second.
Usage: PYTHONPATH=<checkout> python docs/issue23/openvino_one/quality.py BUNDLE OUT_DIR N"""

import json
import sys
import time
from pathlib import Path

from tools.deploy import pipeline
from tools.reference.metrics import evaluate
from tools.reference.prompts import prompts_for

bundle, out, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
prompts = prompts_for("held-out", n)[0]
files = {}
for mode in ("per-group", "one"):
    files[mode] = out / f"ov_{mode}.npz"
    st = time.perf_counter()
    pipeline.sample_to_file(
        bundle,
        files[mode],
        n=n,
        steps=100,
        eta=0.0,
        seed=0,
        guidance=1.5,
        batch_size=100,
        backend="openvino",
        ort_engines=mode,
        prompts=prompts,
        progress=False,
    )
    print(mode, "sampled in", round(time.perf_counter() - st, 1), "s", flush=True)
r = evaluate(files["one"], reference=files["per-group"])
keys = (
    "fd",
    "accuracy",
    "psnr_vs_reference",
    "psnr_ci95",
    "psnr_pooled_vs_reference",
    "psnr_pooled_ci95",
    "mse_vs_reference",
)
rep = {k: r.get(k) for k in keys}
print(rep)
(out / "quality.json").write_text(json.dumps(rep, indent=1))
