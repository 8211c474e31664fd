"""Two checks on the text reference pipeline, on held-out-protocol prompts:

1. Cross-attention K/V once per request (the runtime's default, runtime.prompt_cache) against whole step graphs: the
   same bundle sampled both ways on the same seeds and prompts; the samples' max |Δ|.
2. The text encoder quantized W8A8 against FP32: two bundles compiled alike but for `--text-encoder`, each sampled on
   training-template and held-out-template prompts, judged against the FP pipeline's samples of the same seeds.

    PYTHONPATH=<checkout> python docs/issue21/checks.py BUNDLE_FP32_TE BUNDLE_W8A8_TE FP_DIR OUT.json [-n 1000]

FP_DIR holds the FP pipeline's samples_<set>.npz (a `dqc bench reference-text --methods` table's fp/ cell).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def kv_outputs(bundle_dir: str, n: int, steps: int, guidance: float, seed: int) -> dict:
    from runtime.bundle import load_bundle
    from runtime.sampler import SamplerConfig, sample
    from runtime.text import PromptEncoder
    from tools.reference.prompts import prompts_for

    bundle = load_bundle(bundle_dir)
    encoder = PromptEncoder(bundle.root, bundle.manifest["components"])
    prompts, _ = prompts_for("held-out", n)
    cond, null = encoder.encode(prompts), encoder.encode([""])[0]
    cfg = SamplerConfig("ddim", steps, 0.0, guidance)
    out, seconds = {}, {}
    for cached in (True, False):
        engines = bundle.engines(prompt_cache=cached)
        start = time.perf_counter()
        run = sample(engines, bundle.schedule, cfg, n=n, seed=seed, cond=cond, null_cond=null, batch_size=250,
                     progress=False, ptqd=bundle.ptqd())  # fmt: skip
        seconds[cached] = time.perf_counter() - start
        out[cached] = run.samples
    d = np.abs(out[True] - out[False])
    return {"n": n, "prompts": "held-out", "max_abs_diff": float(d.max()), "identical": bool((d == 0).all()),
            "seconds_kv_once": seconds[True], "seconds_whole": seconds[False]}  # fmt: skip


def encoder_cells(bundles: dict[str, str], fp_dir: Path, n: int, steps: int, guidance: float, seed: int) -> list:
    from tools.deploy.pipeline import sample_to_file
    from tools.reference.metrics import evaluate, psnr_cells
    from tools.reference.prompts import TEMPLATE_SETS, prompts_for

    rows = []
    for name, bundle in bundles.items():
        for ps in TEMPLATE_SETS:
            out = Path(bundle).parent / f"samples_{ps}.npz"
            if not out.is_file():
                sample_to_file(bundle, out, n=n, steps=steps, eta=0.0, seed=seed, guidance=guidance, batch_size=250,
                               prompts=prompts_for(ps, n)[0], backend="ort", progress=False)  # fmt: skip
            r = evaluate(out, reference=fp_dir / f"samples_{ps}.npz")
            rows.append({"text_encoder": name, "prompts": ps, "fd": r["fd"], "accuracy": r["accuracy"]} | psnr_cells(r))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bundle_fp32_te")
    p.add_argument("bundle_w8a8_te")
    p.add_argument("fp_dir")
    p.add_argument("out")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-n", type=int, default=100)
    args = p.parse_args()
    from tools.reference.model import REFERENCE_TEXT_GUIDANCE as g

    report = {
        "sampler": {"name": "ddim", "steps": args.steps, "eta": 0.0, "guidance": g, "seed": args.seed},
        "kv_once_vs_whole": kv_outputs(args.bundle_fp32_te, args.kv_n, args.steps, g, args.seed),
        "text_encoder": encoder_cells(
            {"fp32": args.bundle_fp32_te, "w8a8": args.bundle_w8a8_te},
            Path(args.fp_dir),
            args.n,
            args.steps,
            g,
            args.seed,
        ),  # fmt: skip
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
