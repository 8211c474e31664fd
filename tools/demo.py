"""`dqc demo`: compile a model to a W8A8 bundle, sample it and its full-precision twin with identical
seeds, and print latency and fidelity in one table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from runtime.engine import EngineSet
from runtime.sampler import SamplerConfig, sample
from tools import pipeline


def _comparison_png(path: Path, fp: np.ndarray, q: np.ndarray, labels: np.ndarray | None) -> None:
    """One row per class: full-precision samples on the left, quantized on the right."""
    if labels is None:
        labels = np.zeros(len(fp), np.int64)
    classes = np.unique(labels)
    per = min(int(np.min([np.sum(labels == c) for c in classes])), 8)
    rows = []
    for c in classes:
        idx = np.flatnonzero(labels == c)[:per]
        blank = np.ones_like(fp[:1])
        rows.append(np.concatenate([fp[idx], blank, q[idx]]))
    pipeline.save_grid_png(path, np.concatenate(rows), columns=2 * per + 1)


def run_demo(
    out: str | Path = "dqc-demo",
    *,
    n: int = 20,
    steps: int = 50,
    calib_samples: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    from calibration.config import CalibrationConfig
    from calibration.model_io import load_model
    from tools.synthetic import SHAPES, build_unet, save_pipeline

    out = Path(out)
    unet = build_unet("tiny")
    params = sum(p.numel() for p in unet.parameters())
    print(
        f"dqc demo: no reference model is shipped yet, so this demo compiles a small UNet2DModel it builds "
        f"itself (shape 'tiny': {SHAPES['tiny']['block_out_channels']} channels, {params / 1e6:.2f} M "
        "parameters, RANDOM weights). Its samples are noise-like: the table shows the engine's latency and "
        "its fidelity to full precision, not image quality."
    )
    model_dir = save_pipeline(unet, out / "model")
    cfg = CalibrationConfig(
        bits="W8A8", steps=steps, calib_samples=calib_samples, calib_timesteps=min(10, steps), seed=seed
    )
    bundle = pipeline.compile_model(model_dir, out / "bundle", cfg, overwrite=True, progress=progress)
    model = load_model(model_dir)
    fp_engine = pipeline.fp32_engine(model, out)
    q_engines = pipeline.open_engines(bundle)[0]
    scfg = SamplerConfig("ddim", steps, 0.0, 1.0)
    labels = pipeline.parse_labels(None, n, model.spec.num_class_embeds)
    runs = {}
    for name, engines in (("fp32", EngineSet.single(fp_engine)), ("w8a8", q_engines)):
        runs[name] = sample(
            engines, model.schedule, scfg, n=n, seed=seed, labels=labels, null_class=model.null_class, progress=progress
        )
    fp, q = (np.clip(runs[k].samples, -1, 1) for k in ("fp32", "w8a8"))
    lat = pipeline.latency_ratio({"fp32": fp_engine, "w8a8": q_engines.for_timestep(0)}, model.spec, batch=1)
    report = {
        "model": "synthetic tiny UNet2DModel, random weights (no reference model shipped yet)",
        "n": n,
        "seed": seed,
        "sampler": "ddim",
        "steps": steps,
        "eta": 0.0,
        "latency_ms_batch1": lat,
        "speedup_vs_fp32": lat["fp32"]["median_ms"] / lat["w8a8"]["median_ms"],
        "psnr_w8a8_vs_fp32_db": pipeline.psnr(q, fp),
        "mse_w8a8_vs_fp32": float(np.mean((q - fp) ** 2)),
        "bundle": str(bundle),
    }
    pipeline.save_npz(out / "samples_fp32.npz", samples=fp, labels=labels)
    pipeline.save_npz(out / "samples_w8a8.npz", samples=q, labels=labels)
    _comparison_png(out / "comparison.png", fp, q, labels)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print()
    print(f"{'engine':<10}{'ms/step (batch 1)':>20}{'PSNR vs FP32 (dB)':>20}")
    print(f"{'fp32 ORT':<10}{lat['fp32']['median_ms']:>20.2f}{'—':>20}")
    print(f"{'W8A8 ORT':<10}{lat['w8a8']['median_ms']:>20.2f}{report['psnr_w8a8_vs_fp32_db']:>20.2f}")
    print(f"speed-up W8A8 / FP32: {report['speedup_vs_fp32']:.2f}×   (N = {n}, seed {seed}, DDIM {steps} steps, eta 0)")
    print(f"wrote {out / 'report.json'}, {out / 'comparison.png'} (rows: classes; left FP32, right W8A8)")
    return report
