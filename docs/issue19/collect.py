"""Collect issue 19's cells (dqc bench --methods output directories) into docs/issue19: each cell's eval.json
and the calibration record, and print the table rows. Usage: python docs/issue19/collect.py RUN_DIR"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np

run, here = Path(sys.argv[1]), Path(__file__).parent
rows = []
for cell in sorted(run.glob("*/*_W4A*")):
    if not (cell / "eval.json").is_file():
        continue
    name = f"{cell.parent.name}/{cell.name}"
    ev = json.loads((cell / "eval.json").read_text())
    man = json.loads((cell / "bundle" / "manifest.json").read_text())
    stats = man["calibration"]["stats"]
    out = here / cell.parent.name / cell.name
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(cell / "eval.json", out / "eval.json")
    gac = stats.get("reconstruction", {}).get("gac")
    omega = ""
    if gac:
        ratio = np.array([np.array(v["mass"]) / np.array(v["uniform_mass"]) for v in gac.values()])
        ent = [v["entropy"] for v in gac.values()]
        omega = f"H {min(ent):.3f}–{max(ent):.3f}, mass/uniform {ratio.min():.2f}–{ratio.max():.2f}"
        (out / "gac_record.json").write_text(json.dumps(gac, indent=1))
    cfg = man["calibration"].get("config", {})
    rows.append(
        f"| {name} | {len(man['groups'])} | {ev['fd']:.3f} | {ev['accuracy']:.1%} | "
        f"{ev['psnr_vs_reference']:.2f} [{ev['psnr_ci95'][0]:.2f}, {ev['psnr_ci95'][1]:.2f}] / "
        f"{ev['psnr_pooled_vs_reference']:.2f} [{ev['psnr_pooled_ci95'][0]:.2f}, {ev['psnr_pooled_ci95'][1]:.2f}] | "
        f"{stats['total_seconds']:.0f} | tau {cfg.get('gac_tau')}, share {cfg.get('gac_val_share')} | {omega} |"
    )
print("\n".join(rows))
