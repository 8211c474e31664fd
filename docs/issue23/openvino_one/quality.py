"""Issue 23: a text bundle sampled on OpenVINO with one compiled model for all groups and with one per group, and on
ONNX Runtime (per-group sessions) as the yardstick; same seeds, N held-out-template prompts, DDIM 100, guidance 1.5.
Writes PSNR of the one model against the per-group models (quality.json) and of both OpenVINO forms against ONNX
Runtime (quality_vs_ort.json). Usage: PYTHONPATH=<checkout> python docs/issue23/openvino_one/quality.py BUNDLE OUT N"""

import json
import sys
import time
from pathlib import Path

from tools.deploy import pipeline
from tools.reference.metrics import evaluate
from tools.reference.prompts import prompts_for

KEYS = ("fd", "accuracy", "psnr_vs_reference", "psnr_ci95", "psnr_pooled_vs_reference", "psnr_pooled_ci95",
        "mse_vs_reference")  # fmt: skip
bundle, out, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
prompts = prompts_for("held-out", n)[0]
files = {}
for backend, mode in (("openvino", "per-group"), ("openvino", "one"), ("ort", "per-group")):
    name = f"{'ov' if backend == 'openvino' else 'ort'}_{mode}"
    files[name] = out / f"{name}.npz"
    start = time.perf_counter()
    pipeline.sample_to_file(bundle, files[name], n=n, steps=100, eta=0.0, seed=0, guidance=1.5, batch_size=100,
                            backend=backend, ort_engines=mode, prompts=prompts, progress=False)  # fmt: skip
    print(name, "sampled in", round(time.perf_counter() - start, 1), "s", flush=True)


def compare(a: str, b: str) -> dict:
    r = evaluate(files[a], reference=files[b])
    return {k: r.get(k) for k in KEYS}


one = compare("ov_one", "ov_per-group")
print(one)
(out / "quality.json").write_text(json.dumps(one, indent=1))
vs_ort = {f"openvino {m} vs ort per-group": compare(f"ov_{m}", "ort_per-group") for m in ("per-group", "one")}
print(json.dumps(vs_ort, indent=1))
(out / "quality_vs_ort.json").write_text(json.dumps(vs_ort, indent=1))
