"""`dqc bench MODEL --ptqd-ablation`: PTQD's ablation (its supplement's Table B) on the engines that ship.

For each bit-width and deployment sampler (e.g. DDIM eta 1, DDPM, DDIM eta 0) one bundle is compiled with
the base calibration method and PTQD statistics gathered for that sampler. N images are sampled from it
with the corrections added one at a time — baseline (none), +CNC, +CNC+VSC, +CNC+VSC+BC — on the
full-precision row's seeds, and judged by FD, accuracy and PSNR against the full-precision samples.
With `mixed_bits`, the first bit-width's bundle at the first sampler also holds that cheaper precision,
and three more rows compare the PTQD switch between the two with all-high and all-low precision (all
corrections on).
With `reuse_calibration`, the samplers after the first do not calibrate again: their cells copy the first
sampler's bundle of the same bit-width and gather its PTQD statistics anew along their own trajectories
(`regather_samples` of them), so the ablation isolates the correction from the calibration.

Cells live in `<out>/<bits>_<sampler>/` (bundle/, one samples_<row>.npz each) and `<out>/fp_<sampler>/`,
and are reused when made with the same settings, so an interrupted table resumes; delete a cell to
recompute it. The table goes to table.json and table.md.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ConfigError
from runtime.sampler import SamplerConfig
from tools.bench.method_table import _bundle_matches, _samples_match
from tools.deploy import pipeline

# (row name, PTQD components): each adds one correction to the row before (supplement Table B's order)
# PTQD supplement Table B's rows (CNC with our guard), then CNC as the paper applies it (no guard) and the
# minimum-error gain in its place
ABLATION_ROWS = (("baseline", ()), ("+CNC", ("cnc",)), ("+CNC+VSC", ("cnc", "vsc")),
                 ("+CNC+VSC+BC", ("cnc", "vsc", "bc")), ("+CNC-all+VSC+BC", ("cnc-all", "vsc", "bc")),
                 ("+gain", ("gain",)), ("+gain+VSC+BC", ("gain", "vsc", "bc")))  # fmt: skip
_SAMPLER = re.compile(r"^(ddpm|ddim)(?:-eta([0-9]*\.?[0-9]+))?$")
# the settings that define a cell's bundle: one made with other values is recompiled
_CELL_KEYS = ("sampler", "steps", "eta", "guidance", "seed", "calib_samples", "calib_timesteps", "adaround_iters",
              "act_iters", "recon_batch", "groups", "group_epochs")  # fmt: skip


@dataclass(frozen=True)
class SamplerSpec:
    """A deployment sampler as the ablation names it: ddpm, or ddim-eta<η>."""

    name: str
    eta: float

    @classmethod
    def parse(cls, text: str) -> SamplerSpec:
        m = _SAMPLER.match(text.strip().lower())
        if not m or (m[1] == "ddpm" and m[2] is not None):
            raise ConfigError(f"--samplers {text!r}: use ddpm or ddim-eta<eta>, e.g. ddim-eta1,ddpm,ddim-eta0")
        return cls(m[1], float(m[2]) if m[2] is not None else (1.0 if m[1] == "ddim" else 0.0))

    @property
    def label(self) -> str:
        return "ddpm" if self.name == "ddpm" else f"ddim-eta{self.eta:g}"


def run_ptqd_ablation(
    model: str = "reference",
    *,
    bits: list[str],
    samplers: list[str],
    out_dir: str | Path,
    method: str = "qdiffusion",
    mixed_bits: str | None = None,
    n: int = 250,
    steps: int = 100,
    guidance: float | None = None,
    seed: int = 0,
    ptqd_samples: int = 512,
    reuse_calibration: bool = False,
    regather_samples: int | None = None,
    batch_size: int = 250,
    calibration: dict | None = None,
    backend: str = "ort",
    progress: bool = True,
) -> dict:
    from calibration.config import METHODS, CalibrationConfig, parse_bits
    from tools.reference.metrics import evaluate, psnr_cells
    from tools.reference.model import card_guidance, resolve_model

    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: use one of {sorted(METHODS)}")
    bits = [str(parse_bits(b)) for b in bits]
    specs = [SamplerSpec.parse(s) for s in samplers]
    if not bits or not specs:
        raise ConfigError("--ptqd-ablation: give at least one --bits and one --samplers entry")
    if n < 2:
        raise ConfigError(f"-n {n}: FD needs at least 2 samples")
    if ptqd_samples < 2:
        raise ConfigError(f"--ptqd-samples {ptqd_samples}: the statistics need at least 2 trajectories")
    regather_samples = ptqd_samples if regather_samples is None else regather_samples
    if regather_samples < 2:
        raise ConfigError(f"--regather-samples {regather_samples}: the statistics need at least 2 trajectories")
    guidance = (card_guidance(model) or 1.0) if guidance is None else guidance
    source = resolve_model(model)
    given = {k: v for k, v in (calibration or {}).items() if v is not None}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def sampled(path: Path, src: Path, spec: SamplerSpec, reference: Path | None, **kw) -> dict:
        if not _samples_match(path, n, seed, steps, spec.eta, guidance):
            args = dict(n=n, steps=steps, sampler=spec.name, eta=spec.eta, seed=seed, guidance=guidance)
            on = backend if pipeline.is_bundle(src) else "auto"  # the FP model runs on torch
            run = pipeline.sample_to_file(src, path, batch_size=batch_size, progress=progress, backend=on, **args, **kw)
            timing = {"ptqd_share": run.ptqd_seconds / max(run.engine_seconds, 1e-12), "notes": run.ptqd_notes}
            pipeline.write_json(path.with_suffix(".timing.json"), timing)
        report = evaluate(path, reference=reference)
        timing = _load(path.with_suffix(".timing.json")) or {}
        return {"fd": report["fd"], "accuracy": report.get("accuracy"), **psnr_cells(report),
                "ptqd_share": timing.get("ptqd_share"), "notes": timing.get("notes", [])}  # fmt: skip

    rows = []
    for spec in specs:
        fp_cell = out / f"fp_{spec.label}"
        fp_cell.mkdir(exist_ok=True)
        fp_samples = fp_cell / "samples.npz"
        rows.append({"sampler": spec.label, "bits": "FP32", "row": "full precision",
                     **sampled(fp_samples, source, spec, None)})  # fmt: skip
        for b in bits:
            mixed = mixed_bits if (b, spec) == (bits[0], specs[0]) else None
            cell = out / f"{b}_{spec.label}"
            bundle = cell / "bundle"
            fields = dict(sampler=spec.name, eta=spec.eta, steps=steps, guidance=guidance, seed=seed, **given)
            first = out / f"{b}_{specs[0].label}" / "bundle"
            if reuse_calibration and spec != specs[0]:
                same = (_load(bundle / "manifest.json") or {}).get("calibration") == (
                    _load(first / "manifest.json") or {}).get("calibration")  # fmt: skip
                if not (same and _ptqd_matches(bundle, regather_samples, None, spec=spec)):
                    _regather(first, bundle, source, spec, fields, samples=regather_samples, progress=progress)
                    print(f"{cell.name}: PTQD statistics regathered on {first.parent.name}'s calibration")
                    for stale in cell.glob("samples_*"):
                        stale.unlink()
            elif not (_bundle_matches(bundle, method, b, {k: v for k, v in fields.items() if k in _CELL_KEYS})
                      and _ptqd_matches(bundle, ptqd_samples, mixed)):  # fmt: skip
                cfg = CalibrationConfig.for_method(method, bits=b, **fields)
                cell.mkdir(exist_ok=True)
                start = time.perf_counter()
                pipeline.compile_model(source, bundle, cfg, overwrite=True, ptqd_samples=ptqd_samples,
                                       mixed_bits=mixed, progress=progress)  # fmt: skip
                print(f"{cell.name}: compiled with PTQD statistics in {time.perf_counter() - start:.1f} s")
                for stale in cell.glob("samples_*"):
                    stale.unlink()
            precision = b if mixed or len((_load(bundle / "manifest.json") or {}).get("precisions", ())) > 1 else None
            for name, components in ABLATION_ROWS:
                path = cell / f"samples_{_slug(name)}.npz"
                got = sampled(path, bundle, spec, fp_samples, ptqd=components, precision=precision)
                rows.append({"sampler": spec.label, "bits": b, "row": name, **got})
            if mixed:
                variants = ((f"mixed {mixed}/{b} (PTQD switch)", None), (f"all {b}", b), (f"all {mixed}", mixed))
                for name, prec in variants:
                    path = cell / f"samples_mixed_{_slug(prec or 'plan')}.npz"
                    rows.append({"sampler": spec.label, "bits": f"{mixed}+{b}", "row": name,
                                 **sampled(path, bundle, spec, fp_samples, precision=prec)})  # fmt: skip
                from runtime.bundle import load_bundle

                plan = load_bundle(bundle).manifest["precision_plan"]
                rows[-3]["plan"] = {k: plan[k] for k in ("low", "high", "switch_t", "steps", "bop_saving")}
    table = {"model": str(model), "method": method, "n": n, "seed": seed, "steps": steps, "guidance": guidance,
             "ptqd_samples": ptqd_samples, "calibration_overrides": given,
             "reused_calibration": {s.label: specs[0].label for s in specs[1:]} if reuse_calibration else {},
             "regather_samples": regather_samples if reuse_calibration else None, "rows": rows}  # fmt: skip
    pipeline.write_json(out / "table.json", table)
    (out / "table.md").write_text(markdown_table(rows))
    print(markdown_table(rows), end="")
    print(f"wrote {out / 'table.json'}, {out / 'table.md'}")
    return table


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "baseline"


def _load(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ptqd_matches(bundle: Path, samples: int, mixed: str | None, spec: SamplerSpec | None = None) -> bool:
    manifest = _load(bundle / "manifest.json") or {}
    ptqd = manifest.get("ptqd") or {}
    if not ptqd or any(meta.get("samples") != samples for meta in ptqd.values()):
        return False
    if spec is not None:  # a regathered cell: statistics of this sampler for every precision the bundle holds
        return all((m.get("sampler"), m.get("eta")) == (spec.name, spec.eta) for m in ptqd.values()) and set(
            ptqd) == set(manifest.get("precisions", ()))  # fmt: skip
    return (mixed in ptqd) if mixed else len(ptqd) == 1


def _regather(src: Path, dst: Path, source: Path, spec: SamplerSpec, fields: dict, *, samples: int,
              progress: bool) -> None:  # fmt: skip
    """A cell that reuses another sampler's calibrated bundle: a copy of `src` with the PTQD statistics
    gathered again along `spec`'s trajectories; written beside `dst` and moved into place when complete."""
    import shutil

    from calibration.model_io import load_model

    if not (src / "manifest.json").is_file():
        raise ConfigError(f"--reuse-calibration: {src} has no bundle; run the first sampler's cell first")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    cfg = SamplerConfig(spec.name, fields["steps"], spec.eta, fields["guidance"])
    pipeline.gather_ptqd(tmp, load_model(source), cfg, samples=samples, seed=fields["seed"],
                         batch_size=32, progress=progress)  # fmt: skip
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def markdown_table(rows: list[dict]) -> str:
    from tools.reference.metrics import format_psnr

    def fmt(v, spec):
        return "—" if v is None else format(v, spec)

    lines = ["| sampler | bits | row | FD ↓ | accuracy | PSNR vs FP (dB): mean / pooled | PTQD host / engine time |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        share = fmt(r.get("ptqd_share") or None, ".2%")
        lines.append(f"| {r['sampler']} | {r['bits']} | {r['row']} | {fmt(r['fd'], '.3f')} | "
                     f"{fmt(r['accuracy'], '.1%')} | {format_psnr(r)} | {share} |")  # fmt: skip
    notes = dict.fromkeys(f"{r['sampler']} {r['bits']}: {note}" for r in rows for note in r.get("notes", []))
    for r in rows:
        if "plan" in r:
            p = r["plan"]
            notes[f"{r['sampler']} mixed precision: {p['low']} at t >= {p['switch_t']} ({p['steps'][p['low']]} steps), "
                  f"{p['high']} below ({p['steps'][p['high']]} steps); {p['bop_saving']:.1%} fewer bit operations "
                  f"than {p['high']} at every step"] = None  # fmt: skip
    return "\n".join(lines + ([""] + [f"- {note}" for note in notes] if notes else [])) + "\n"


__all__ = ["ABLATION_ROWS", "SamplerConfig", "SamplerSpec", "run_ptqd_ablation"]
