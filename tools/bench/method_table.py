"""`dqc bench --methods …`: quality of calibration methods × bit-widths on the engines that ship.

Each cell compiles the model with one method preset at one bit-width (and, when asked, one group count,
timestep strategy and calibration-set size: APQ-DM's Tables 1 and 2), samples N images from the bundle
(ONNX Runtime, same seeds as the full-precision row), and evaluates FD, accuracy and PSNR against the
full-precision samples. On the text pipeline `reference-text` every cell is calibrated on its training
prompts and sampled twice, on prompts from the training templates and from the held-out templates (one row
each, column `prompts`). Cells live in `<out>/<method>[_G<g>][_<strategy>][_n<size>]_<bits>/` (bundle/,
samples.npz, eval.json) and are reused when present and made with the same settings, so an interrupted
table resumes; delete a cell to recompute it. A `--with-ptqd` cell (suffix _ptqd) whose cell without PTQD is
present and matches reuses that calibration and only gathers the PTQD statistics. The table is written as
table.json and table.md, the FD-vs-bits plot as fd_vs_bits.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from runtime.errors import ConfigError
from tools.deploy import pipeline

# overrides that only apply to methods that learn by reconstruction
_RECONSTRUCTION_KEYS = ("adaround_iters", "act_iters", "recon_batch")
# the settings that define a cell: a bundle made with other values is recompiled
_CELL_KEYS = (
    "attention_products", "steps", "guidance", "seed", "calib_samples", "calib_timesteps", "adaround_iters",
    "act_iters", "recon_batch",
    "groups", "group_epochs", "timestep_selection", "fresh_trajectories", "activation_error", "group_search",
    "group_alpha_lr", "group_alpha_bias", "group_refine_epochs", "loss_weighting", "gac_tau", "gac_val_share",
    "gac_groups", "gac_meta_steps", "gac_inner_lr", "gac_outer_lr", "gac_gm_weight", "gac_match",
)  # fmt: skip


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _bundle_matches(bundle: Path, method: str, bits: str, fields: dict) -> bool:
    manifest = _load_json(bundle / "manifest.json")
    if manifest is None or manifest.get("bits") != bits or manifest["calibration"].get("method") != method:
        return False
    cal = manifest["calibration"]
    config = cal.get("config", {})
    for key, value in fields.items():
        have = config.get(key, cal.get(key))
        if have is not None and have != value:
            return False
    return True


def _samples_match(path: Path, n: int, seed: int, steps: int, eta: float, guidance: float) -> bool:
    import numpy as np

    if not path.is_file():
        return False
    with np.load(path) as data:
        meta = json.loads(str(data["meta"])) if "meta" in data else {}
        count = len(data["samples"])
    have = (count, meta.get("seed"), meta.get("steps"), meta.get("eta"), meta.get("guidance"))
    return have == (n, seed, steps, eta, guidance)


def _add_ptqd(base: Path, bundle: Path, source, cfg, calib_prompts, *, samples: int, progress: bool) -> None:
    """The PTQD cell of an already calibrated cell: a copy of its bundle `base` with PTQD statistics gathered
    as `dqc compile --ptqd` gathers them (the calibration prompts, seed and sampler of `cfg`), written beside
    `bundle` and moved into place when complete."""
    import os
    import shutil

    from calibration.model_io import load_model
    from runtime.text import read_prompts

    prompts = () if calib_prompts is None else tuple(read_prompts(calib_prompts, "--calib-prompts"))
    tmp = bundle.with_name(bundle.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bundle.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base, tmp)
    try:
        pipeline.gather_ptqd(tmp, load_model(source, prompts=prompts), cfg.sampler_config, samples=samples,
                             seed=cfg.seed, batch_size=cfg.batch_size, progress=progress)  # fmt: skip
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(bundle, ignore_errors=True)
    os.replace(tmp, bundle)


def run_method_table(
    model: str = "reference",
    *,
    methods: list[str],
    bits: list[str],
    out_dir: str | Path,
    n: int = 500,
    steps: int = 100,
    eta: float = 0.0,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 250,
    calibration: dict | None = None,
    groups: list[str] | None = None,
    timesteps: list[str] | None = None,
    calib_sizes: list[int] | None = None,
    backend: str = "ort",
    ptqd_samples: int | None = None,
    progress: bool = True,
) -> dict:
    from calibration.config import METHODS, CalibrationConfig, parse_bits
    from runtime.schedule import load_schedule
    from tools.plots import line_chart_png
    from tools.reference.metrics import evaluate, psnr_cells
    from tools.reference.model import TEXT_KEYWORD, card_guidance, default_calib_prompts, resolve_model
    from tools.reference.prompts import TEMPLATE_SETS, prompts_for

    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"--methods: unknown method {m!r}; use some of {sorted(METHODS)}")
    bits = [str(parse_bits(b)) for b in bits]
    if n < 2:
        raise ConfigError(f"-n {n}: FD needs at least 2 samples")
    if guidance is None:
        guidance = card_guidance(model) or 1.0
    source = resolve_model(model)
    text = (Path(source) / "text_encoder").is_dir()
    if text and model != TEXT_KEYWORD:
        raise ConfigError(f"--methods on {model}: quality tables judge digits named by prompts; of the text-to-image "
                          f"pipelines only {TEXT_KEYWORD} has them")  # fmt: skip
    prompt_sets = list(TEMPLATE_SETS) if text else [None]
    flow = getattr(load_schedule(Path(source) / "scheduler"), "kind", None) == "flow"
    sampler = "euler" if flow else "ddim"  # the model's own solver: the Euler flow for flow-matching models
    calib_prompts = default_calib_prompts(model)
    calibration = {k: v for k, v in (calibration or {}).items() if v is not None}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # every cell samples on one backend (ONNX Runtime unless asked), so the cells compare calibrations only
    sample_args = dict(n=n, steps=steps, eta=eta, seed=seed, guidance=guidance, batch_size=batch_size, backend=backend)

    def samples_of(cell: Path, prompt_set: str | None) -> Path:
        return cell / ("samples.npz" if prompt_set is None else f"samples_{prompt_set}.npz")

    def sample_and_eval(cell: Path, engine_source: Path, prompt_set: str | None, reference: bool) -> dict:
        samples = samples_of(cell, prompt_set)
        if not _samples_match(samples, n, seed, steps, eta, guidance):
            on = sample_args if pipeline.is_bundle(engine_source) else sample_args | {"backend": "auto"}  # FP: torch
            if prompt_set is not None:
                on = on | {"prompts": prompts_for(prompt_set, n)[0]}
            pipeline.sample_to_file(engine_source, samples, progress=progress, **on)
        report = evaluate(samples, reference=samples_of(fp_cell, prompt_set) if reference else None)
        pipeline.write_json(samples.with_name(samples.name.replace("samples", "eval").replace(".npz", ".json")), report)
        return report

    fp_cell = out / "fp"
    fp_cell.mkdir(exist_ok=True)
    rows, fp_fd = [], {}
    for ps in prompt_sets:
        fp = sample_and_eval(fp_cell, source, ps, reference=False)
        fp_fd[ps] = fp["fd"]
        rows.append({"method": "fp", "bits": "FP32", "prompts": ps, "fd": fp["fd"], "accuracy": fp.get("accuracy"),
                     "psnr_db": None, "calibration_seconds": None, "device": None})  # fmt: skip
    for method, g, strategy, size, b in cells(methods, groups, timesteps, calib_sizes, bits):
        suffix = ("_attnq" if calibration.get("attention_products") else "") + ("_ptqd" if ptqd_samples else "")
        cell = out / (cell_name(method, g, strategy, size, b) + suffix)
        bundle = cell / "bundle"
        preset = CalibrationConfig.for_method(method)
        given = {k: v for k, v in calibration.items() if preset.reconstructs or k not in _RECONSTRUCTION_KEYS}
        fields = dict(steps=steps, guidance=guidance, seed=seed, **given)
        if strategy is not None:
            fields["timestep_selection"] = strategy
        if size is not None:
            per = fields.get("calib_samples", preset.calib_samples)
            if size % per:
                raise ConfigError(f"--calib-sizes {size}: not a multiple of --calib-samples {per}")
            fields["calib_timesteps"] = size // per
        if g is not None:
            fields["groups"] = fields.get("calib_timesteps", preset.calib_timesteps) if g == "per-step" else int(g)
        matches = _bundle_matches(bundle, method, b, {k: v for k, v in fields.items() if k in _CELL_KEYS})
        if matches and bool(ptqd_samples) != bool((_load_json(bundle / "manifest.json") or {}).get("ptqd")):
            matches = False
        base = out / (cell_name(method, g, strategy, size, b) + suffix.removesuffix("_ptqd")) / "bundle"
        if not matches and ptqd_samples and _bundle_matches(base, method, b, {k: v for k, v in fields.items()
                                                                                if k in _CELL_KEYS}):  # fmt: skip
            cfg = CalibrationConfig.for_method(method, bits=b, sampler=sampler, **fields)
            if not (_load_json(base / "manifest.json") or {}).get("ptqd"):
                start = time.perf_counter()
                _add_ptqd(base, bundle, source, cfg, calib_prompts, samples=ptqd_samples, progress=progress)
                print(f"{cell.name}: reused the calibration of {base.parent.name}, PTQD statistics gathered in "
                      f"{time.perf_counter() - start:.1f} s")  # fmt: skip
                for ps in prompt_sets:
                    samples_of(cell, ps).unlink(missing_ok=True)
                matches = True
        if not matches:
            cfg = CalibrationConfig.for_method(method, bits=b, sampler=sampler, **fields)
            cell.mkdir(exist_ok=True)
            start = time.perf_counter()
            pipeline.compile_model(source, bundle, cfg, overwrite=True, progress=progress, calib_prompts=calib_prompts,
                                   ptqd_samples=ptqd_samples)  # fmt: skip
            print(f"{cell.name}: compiled in {time.perf_counter() - start:.1f} s")
            for ps in prompt_sets:
                samples_of(cell, ps).unlink(missing_ok=True)
        manifest = json.loads((bundle / "manifest.json").read_text())
        stats = manifest["calibration"]["stats"]
        errors = stats.get("activation_error", {})
        config = manifest["calibration"].get("config", {})
        for ps in prompt_sets:
            report = sample_and_eval(cell, bundle, ps, reference=True)
            rows.append(
                {
                    "method": method + (" + PTQD" if ptqd_samples else ""),
                    "bits": b,
                    "prompts": ps,
                    "series": cell.name.replace(f"_{b}", "") + ("" if ps is None else f" ({ps})"),
                    "groups": len(manifest["groups"]),
                    "groups_asked": g,
                    "timesteps": config.get("timestep_selection"),
                    "calibration_inputs": stats.get("calibration_inputs"),
                    "fd": report["fd"],
                    "accuracy": report.get("accuracy"),
                    **psnr_cells(report),
                    "c_error": errors.get("c_error"),
                    "g_error": errors.get("g_error"),
                    "calibration_seconds": stats.get("total_seconds"),
                    "device": stats.get("device_name", stats.get("device")),
                }
            )
    table = {
        "model": str(model),
        "n": n,
        "seed": seed,
        "sampler": sampler,
        "steps": steps,
        "eta": eta,
        "guidance": guidance,
        "calibration_overrides": calibration,
        "prompts": None if not text else {"calibration": "training templates", "sets": prompt_sets},
        "rows": rows,
    }
    pipeline.write_json(out / "table.json", table)
    (out / "table.md").write_text(markdown_table(rows))
    quantized = [r for r in rows if r["method"] != "fp"]
    labels = list(dict.fromkeys(r["series"] for r in quantized))
    series = {k: [next((r["fd"] for r in quantized if r["series"] == k and r["bits"] == b), None) for b in bits]
              for k in labels}  # fmt: skip
    line_chart_png(
        out / "fd_vs_bits.png",
        bits,
        series,
        title=f"FD vs bit-width ({model}, N={n}, {sampler} {steps}, eta {eta:g}; lower is better)",
        y_label="FD",
        x_label="weight / activation bits",
        hline=("full precision", fp_fd[prompt_sets[0]]),
    )
    print(markdown_table(rows), end="")
    print(f"wrote {out / 'table.json'}, {out / 'table.md'}, {out / 'fd_vs_bits.png'}")
    return table


def cells(methods, groups, timesteps, sizes, bits):
    """(method, groups, strategy, size, bits) of every cell; None where the axis was not asked for."""
    import itertools

    return itertools.product(methods, groups or [None], timesteps or [None], sizes or [None], bits)


def cell_name(method: str, groups, strategy, size, bits: str) -> str:
    parts = [method]
    if groups is not None:
        parts.append(f"G{groups}")
    if strategy is not None:
        parts.append(strategy)
    if size is not None:
        parts.append(f"n{size}")
    return "_".join([*parts, bits])


def markdown_table(rows: list[dict]) -> str:
    from tools.reference.metrics import format_psnr

    def fmt(v, spec):
        return "—" if v is None else format(v, spec)

    prompts = any(r.get("prompts") for r in rows)  # a text pipeline's table: which templates the prompts came from
    lines = [
        "| method | bits | "
        + ("prompts | " if prompts else "")
        + "groups | timesteps | calib inputs | FD ↓ | accuracy "
        "| PSNR vs FP (dB): mean / pooled | C-Error | G-Error | calibration (s) | device |",
        "|---|---|" + ("---|" if prompts else "") + "---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['bits']} | "
            + (f"{r.get('prompts')} | " if prompts else "")
            + f"{fmt(r.get('groups'), 'd')} | {r.get('timesteps') or '—'} | "
            f"{fmt(r.get('calibration_inputs'), 'd')} | {fmt(r['fd'], '.3f')} | {fmt(r['accuracy'], '.1%')} | "
            f"{format_psnr(r)} | {fmt(r.get('c_error'), '.4f')} | {fmt(r.get('g_error'), '.4f')} | "
            f"{fmt(r['calibration_seconds'], '.0f')} | {r['device'] or '—'} |"
        )
    return "\n".join(lines) + "\n"
