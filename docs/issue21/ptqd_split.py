"""Issue 21: which PTQD correction carries the "+ PTQD" row. Samples one PTQD bundle of the method table
(`dqc bench reference-text --methods M --bits B -n 1000 --with-ptqd --out DIR`: DIR/M_B_ptqd/bundle) with the
table's seeds, prompts and sampler, once per set of corrections, and evaluates each against the table's FP samples.

Usage: PYTHONPATH=<checkout> python docs/issue21/ptqd_split.py TABLE_DIR CELL OUT.json [--sets none,bc,cnc]
(the 2026-12-03 g figures: TABLE_DIR /work/runs/t21, CELL qdiffusion_W4A8_ptqd; the sets none on both prompt
sets, bc and cnc on the held-out one)."""

import argparse
import json
from pathlib import Path

from tools.deploy import pipeline
from tools.reference.metrics import evaluate
from tools.reference.prompts import prompts_for

SETS = {"none": (), "bc": ("bc",), "cnc": ("cnc",), "all": ("cnc", "bc", "vsc")}
KEYS = ("fd", "accuracy", "psnr_vs_reference", "psnr_ci95", "psnr_pooled_vs_reference", "psnr_pooled_ci95")

p = argparse.ArgumentParser()
p.add_argument("table_dir")
p.add_argument("cell")
p.add_argument("out")
p.add_argument("--sets", default="none,bc,cnc")
p.add_argument("--prompt-sets", default="held-out")
a = p.parse_args()
root = Path(a.table_dir)
report = {}
for name in a.sets.split(","):
    for ps in a.prompt_sets.split(","):
        samples = root / f"split_{name}_{ps}.npz"
        pipeline.sample_to_file(root / a.cell / "bundle", samples, n=1000, steps=100, eta=0.0, seed=0, guidance=1.5,
                                batch_size=250, backend="ort", prompts=prompts_for(ps, 1000)[0], ptqd=SETS[name],
                                progress=False)  # fmt: skip
        r = evaluate(samples, reference=root / "fp" / f"samples_{ps}.npz")
        report[f"{name} ({ps})"] = {k: r.get(k) for k in KEYS}
        print(name, ps, report[f"{name} ({ps})"], flush=True)
Path(a.out).write_text(json.dumps(report, indent=1))
