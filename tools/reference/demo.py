"""`dqc demo`: on the shipped reference model, compile a W8A8 bundle (APQ-DM timestep groups, PTQD
statistics), sample it (PTQD corrections on) and the full-precision model (FP32 ONNX Runtime) with
identical seeds and labels, and print per-step latency, FD, accuracy and PSNR in one table; write both
sample files, a side-by-side PNG and a JSON report. `--text` does the same on the text-to-image pipeline
`reference-text`, calibrated on its training prompts and sampled on its held-out prompts, which neither
training nor calibration saw."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from runtime.bundle import load_bundle
from runtime.engine import EngineSet
from runtime.errors import ConfigError
from runtime.sampler import SamplerConfig, sample
from tools.deploy import pipeline


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
    n: int = 200,
    steps: int = 100,
    eta: float = 0.0,
    guidance: float | None = None,
    calib_samples: int = 32,
    groups: int = 8,
    group_epochs: int = 4,
    ptqd_samples: int = 256,
    seed: int = 0,
    progress: bool = True,
    text: bool = False,
) -> dict:
    from calibration.config import CalibrationConfig
    from calibration.model_io import load_model
    from runtime.text import read_prompts
    from tools.reference.metrics import evaluate, fd_floor
    from tools.reference.model import KEYWORD, TEXT_KEYWORD, card_guidance, default_calib_prompts, reference_dir

    out = Path(out)
    name = TEXT_KEYWORD if text else KEYWORD
    guidance = card_guidance(name) if guidance is None else guidance
    model_dir = reference_dir(name)
    calib_prompts = tuple(read_prompts(default_calib_prompts(name), "--calib-prompts")) if text else ()
    model = load_model(model_dir, prompts=calib_prompts)
    params = sum(p.numel() for p in model.unet.parameters())
    if model.text is not None:  # the pipeline's text encoder is part of what the demo compiles
        params += sum(p.numel() for p in model.text.encoder.parameters())
    calib_timesteps = min(20, steps)
    if not 1 <= groups <= calib_timesteps:
        raise ConfigError(f"--groups {groups}: between 1 and the {calib_timesteps} calibrated steps")
    what = f"{groups} timestep groups" if groups > 1 else "one scale set"
    kind = (
        "text-to-image pipeline (UNet2DConditionModel + CLIP text encoder)" if text else "class-conditional UNet2DModel"
    )
    print(
        f"dqc demo: the shipped model {name!r} ({params / 1e6:.2f} M-parameter {kind} trained on the scikit-learn "
        f"digits; {model_dir / 'README.md'}) → W8A8 bundle ({what}{', PTQD' if ptqd_samples else ''}) for ONNX "
        "Runtime CPU"
    )
    start = time.perf_counter()
    # groups: APQ-DM's search over uniformly spaced calibrated steps; one group: L_p weight ranges, min-max activations
    cfg = CalibrationConfig.for_method(
        "apqdm" if groups > 1 else "lp", bits="W8A8", steps=steps, eta=eta, guidance=guidance,
        calib_samples=calib_samples, calib_timesteps=calib_timesteps, seed=seed, groups=groups,
        group_epochs=group_epochs, timestep_selection="uniform",
    )  # fmt: skip
    bundle = pipeline.compile_model(model, out / "bundle", cfg, overwrite=True, ptqd_samples=ptqd_samples or None,
                                    progress=progress)  # fmt: skip
    compile_s = time.perf_counter() - start
    loaded = load_bundle(bundle)
    q_engines, tables = loaded.engines(), loaded.ptqd()
    # the yardstick runs like the quantized sessions: a multi-group set's sessions do not spin-wait
    fp_engine = pipeline.fp32_engine(model, out, spin=q_engines.for_timestep(0).spin)
    scfg = SamplerConfig("ddim", steps, eta, guidance)
    prompts = None
    if text:  # the held-out prompts, encoded once by the bundle's FP32 text encoder for both engines
        from runtime.text import PromptEncoder
        from tools.reference.prompts import prompts_for

        prompts, digits = prompts_for("held-out", n)
        labels = np.asarray(digits, np.int64)
        encoder = PromptEncoder(loaded.root, loaded.manifest["components"])
        cond, null_cond = encoder.encode(prompts), encoder.encode([""])[0]
    else:
        labels = pipeline.parse_labels(None, n, model.spec.num_class_embeds)
        cond, null_cond = labels, model.null_cond
    files, samples, runs = {}, {}, {}
    for engine, engines, ptqd in (("fp32", EngineSet.single(fp_engine), None), ("w8a8", q_engines, tables)):
        runs[engine] = run = sample(
            engines, model.schedule, scfg, n=n, seed=seed, cond=cond, null_cond=null_cond,
            batch_size=50, progress=progress, ptqd=ptqd,
        )  # fmt: skip
        files[engine] = out / f"samples_{engine}.npz"
        samples[engine] = np.clip(run.samples, -1, 1).astype(np.float32)
        meta = {"source": f"{name} ({engine})", "seed": seed, "sampler": "ddim", "steps": steps, "eta": eta,
                "guidance": guidance, "ptqd": run.ptqd} | ({"prompts": prompts} if text else {})  # fmt: skip
        pipeline.save_samples(files[engine], samples[engine], labels, meta)
    evals = {"fp32": evaluate(files["fp32"]), "w8a8": evaluate(files["w8a8"], reference=files["fp32"])}
    # one denoising step of one image with guidance is one engine call on 2 rows (conditional + null class)
    lat = pipeline.latency_ratio({"fp32": fp_engine, "w8a8": q_engines.for_timestep(0)}, model.spec, batch=2)
    q = runs["w8a8"]
    report = {
        "model": f"{name} ({model_dir})",
        "parameters": params,
        "n": n,
        "seed": seed,
        "sampler": {"name": "ddim", "steps": steps, "eta": eta, "guidance": guidance},
        "compile_seconds": round(compile_s, 1),
        "groups": len(loaded.manifest["groups"]),
        "ptqd": q.ptqd,
        "ptqd_notes": q.ptqd_notes,
        "ptqd_share_of_engine_time": q.ptqd_seconds / max(q.engine_seconds, 1e-12),
        "latency_ms_per_step": lat,
        "latency_note": "median of interleaved ORT calls on 2 rows (one image, conditional + null class); "
        f"worker threads spin-wait: {'yes' if fp_engine.spin else 'no'}, both engines",
        "speedup_w8a8_vs_fp32": lat["fp32"]["median_ms"] / lat["w8a8"]["median_ms"],
        "fp32": {k: evals["fp32"][k] for k in ("fd", "accuracy")},
        "w8a8": {k: evals["w8a8"][k] for k in ("fd", "accuracy", "psnr_vs_reference", "mse_vs_reference")},
        "fd_floor_test_vs_train": fd_floor(),
        "bundle": str(bundle),
    } | ({"prompts": "held-out templates (never in training or calibration)", "calibration_prompts": "training "
          "templates"} if text else {})  # fmt: skip
    _comparison_png(out / "comparison.png", samples["fp32"], samples["w8a8"], labels)
    pipeline.write_json(out / "report.json", report)
    print()
    print(f"{'engine':<10}{'ms/step':>10}{'FD':>9}{'accuracy':>10}{'PSNR vs FP32':>14}")
    for engine, label in (("fp32", "FP32 ORT"), ("w8a8", "W8A8 ORT")):
        e = report[engine]
        ps = f"{e['psnr_vs_reference']:.2f} dB" if "psnr_vs_reference" in e else "—"
        print(f"{label:<10}{lat[engine]['median_ms']:>10.3f}{e['fd']:>9.3f}{e['accuracy']:>10.1%}{ps:>14}")
    print(
        f"speed-up W8A8 / FP32: {report['speedup_w8a8_vs_fp32']:.2f}×. N = {n}, seed {seed}, DDIM {steps} steps, "
        f"eta {eta}, guidance {guidance}. FD (classifier features vs the 360 held-out digits; floor: test vs "
        f"train split = {report['fd_floor_test_vs_train']:.3f}) is biased at small N: compare equal N and seeds."
    )
    if q.ptqd:
        print(f"PTQD corrections {','.join(q.ptqd)} on every W8A8 step: {report['ptqd_share_of_engine_time']:.2%} "
              "of the engine time" + "".join(f"; {note}" for note in q.ptqd_notes))  # fmt: skip
    rows = "digits, prompts from the held-out templates" if text else "classes"
    print(f"wrote {out / 'report.json'}, {out / 'comparison.png'} (rows: {rows}; left FP32, right W8A8)")
    return report
