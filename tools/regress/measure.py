"""Measuring a regression case: its bundle (compiled, or reused when its inputs hash the same), its FP
reference samples (cached by a hash of what produced them), and each metric with its own noise.

Noise (one standard deviation of the measured value):
- latency and memory ratios: the spread of the ratio over repeated rounds in this run (1.4826 · MAD with
  ≥ 3 rounds, half the range with 2);
- PSNR: the 95 % bootstrap interval over the samples / 3.92;
- FD: the standard deviation of FD over bootstrap resamples of the samples;
- accuracy: the binomial standard error with the Agresti–Coull estimate (k + 1) / (n + 2).
None of these include the spread between calibration seeds, which a change of the calibration also draws.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from runtime.errors import ConfigError, DqcError
from tools.regress.spec import Case, Spec

CODE_PACKAGES = ("calibration", "exporter", "runtime")


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_fingerprint(packages=CODE_PACKAGES) -> str:
    """sha256 over the source of the packages that compile and run a bundle: a changed compiler or runtime
    never reuses a bundle or an FP file made by another."""
    import importlib

    h = hashlib.sha256()
    for name in packages:
        root = Path(importlib.import_module(name).__file__).parent
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root.parent)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def model_dir(spec: Spec, case: Case) -> Path | str:
    """The case's model directory: the shipped reference model, the tiny model (built in code, seeded, saved
    once into the cache), or the given directory."""
    from tools.reference.model import resolve_model

    cache = spec.cache
    if case.model == "tiny":
        out = cache / "models" / "tiny"
        if not (out / "unet" / "config.json").is_file():
            from tools.bench.synthetic import build_unet, save_pipeline

            tmp = cache / "models" / ".tiny.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_pipeline(build_unet("tiny", seed=0), tmp)
            tmp.rename(out)
        return out
    return resolve_model(case.model) if case.model == "reference" else spec.resolve(case.model)


def load_case_model(spec: Spec, case: Case):
    from calibration.model_io import load_model

    if case.model is None:
        return None
    path = model_dir(spec, case)
    if not Path(path).is_dir():
        raise ConfigError(f"cases.{case.name}.model = {case.model!r}: not a model directory; use reference, tiny "
                          "or a diffusers save_pretrained directory")  # fmt: skip
    return load_model(path)


def compile_config(case: Case, device: str = "cpu"):
    from calibration.config import CalibrationConfig

    opts = {k: v for k, v in case.compile.items() if k != "ptqd_samples"}
    s = case.sample
    return CalibrationConfig.for_method(opts.pop("method", "lp"), steps=s["steps"], eta=s["eta"],
                                        guidance=s["guidance"], device=device, **opts)  # fmt: skip


def case_bundle(spec: Spec, case: Case, model, code: str, progress: bool) -> tuple[Path, bool]:
    """(bundle directory, whether it was compiled in this run). A case's own bundle is checked against its
    model; otherwise the bundle of these inputs (model weights, compile options, sampler, code) is reused
    or compiled."""
    from runtime.bundle import load_bundle
    from tools.deploy.pipeline import compile_model

    if case.bundle is not None:
        path = spec.resolve(case.bundle)
        bundle = load_bundle(path)
        have = bundle.manifest["model"].get("weight_sha256")
        if model is not None and have != model.weight_sha256:
            raise ConfigError(f"cases.{case.name}.bundle = {case.bundle!r}: compiled from model weights sha256 "
                              f"{str(have)[:16]}…, but cases.{case.name}.model = {case.model!r} has "
                              f"{model.weight_sha256[:16]}…; point the case at that model's bundle")  # fmt: skip
        return path, False
    cfg = compile_config(case)
    key = _sha({"model": model.weight_sha256, "compile": case.compile, "calibration": cfg.__dict__, "code": code})
    out = spec.cache / "bundles" / key[:16]  # cases of the same inputs share it
    if (out / "manifest.json").is_file():
        try:
            load_bundle(out)
            return out, False
        except DqcError:  # a damaged cached bundle: compile it again
            shutil.rmtree(out, ignore_errors=True)
    compile_model(model, out, cfg, overwrite=True, ptqd_samples=case.compile.get("ptqd_samples") or None,
                  progress=progress)  # fmt: skip
    return out, True


def fp_samples(case: Case, model, cache: Path, code: str, progress: bool) -> Path:
    """The FP model's samples at the case's sampling settings, cached by a hash of what produced them."""
    from tools.deploy.pipeline import sample_to_file

    s = case.sample
    what = {k: s[k] for k in ("n", "steps", "eta", "guidance", "seed", "batch_size")}
    key = _sha({"model": model.weight_sha256, "sample": what, "code": code})
    out = cache / "fp" / key[:16] / "samples.npz"
    if not out.is_file():
        sample_to_file(model.source, out, n=s["n"], steps=s["steps"], eta=s["eta"], sampler="ddim", seed=s["seed"],
                       guidance=s["guidance"], batch_size=s["batch_size"], progress=progress)  # fmt: skip
    return out


def _robust_sd(values: list[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return 0.0
    if len(v) == 2:
        return float(abs(v[1] - v[0]) / 2)
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def latency_ratio(bundle: Path, fp32: Path, spec, backend: str, batch: int, rounds: int, reps: int,
                  engines_of=None) -> dict:  # fmt: skip
    """Bundle / FP32 per-step latency, all engines interleaved in each round; the round ratios' median and
    spread. `engines_of(bundle_engine_set)` may wrap the bundle's engines (how the tests plant a slower one)."""
    from tools.bench.speed import interleaved_latency, open_engine

    ours = open_engine(backend, str(bundle))
    if engines_of is not None:
        ours = engines_of(ours)
    engines = {"bundle": ours, "fp32": open_engine("ort", str(fp32), spec)}
    groups = sorted(set(ours.group_of_t.tolist()))
    timesteps = [int(np.flatnonzero(ours.group_of_t == g)[0]) for g in groups]  # every group's engine runs
    per_round = []
    for _ in range(rounds):
        lat = interleaved_latency(engines, spec, timesteps, batch, reps)
        per_round.append(lat["bundle"]["median_ms"] / lat["fp32"]["median_ms"])
    return {"value": float(np.median(per_round)), "noise": _robust_sd(per_round), "rounds": per_round,
            "noise_basis": f"spread of the ratio over {rounds} interleaved rounds × {reps} calls"}  # fmt: skip


def memory_ratio(bundle: Path, fp32: Path, spec, backend: str, batch: int, rounds: int) -> dict:
    from tools.bench.speed import measure_memory

    ratios = []
    for _ in range(rounds):
        ours = measure_memory(backend, str(bundle), spec, batch)["rss_mb"]
        ref = measure_memory("ort", str(fp32), spec, batch)["rss_mb"]
        ratios.append(ours / max(ref, 1e-6))
    return {"value": float(np.median(ratios)), "noise": _robust_sd(ratios), "rounds": ratios,
            "noise_basis": f"spread of the ratio over {rounds} fresh-process measurements"}  # fmt: skip


def quality(samples: Path, reference: Path, boot: int, seed: int = 0) -> dict:
    """FD, accuracy and PSNR of the samples, each with its noise (see the module docstring)."""
    from tools.reference.digits import load_digits_split
    from tools.reference.metrics import evaluate, features, frechet_distance, load_classifier, read_samples

    r = evaluate(samples, reference=reference)
    x, _ = read_samples(samples)
    net = load_classifier()
    f, real = features(net, x), features(net, load_digits_split()[1].images)
    rng = np.random.default_rng(seed)
    fds = [frechet_distance(f[rng.integers(0, len(f), len(f))], real) for _ in range(boot)]
    n, acc = r["n"], r["accuracy"]
    out = {
        "fd": {
            "value": r["fd"],
            "noise": float(np.std(fds)),
            "noise_basis": f"bootstrap over {n} samples, {boot} resamples",
        }
    }
    if acc is not None:
        p = (acc * n + 1) / (n + 2)
        out["accuracy"] = {"value": acc, "noise": float(np.sqrt(p * (1 - p) / n)),
                           "noise_basis": f"binomial standard error at n = {n}"}  # fmt: skip
    lo, hi = r["psnr_ci95"]
    out["psnr"] = {"value": r["psnr_vs_reference"], "noise": (hi - lo) / 3.92,
                   "noise_basis": f"95 % bootstrap over {n} samples / 3.92",
                   "pooled": r["psnr_pooled_vs_reference"]}  # fmt: skip
    return out


def fp32_graph(model, cache: Path) -> Path:
    from exporter.large_model import save
    from exporter.onnx_export import export_float

    out = cache / "fp32" / f"{model.weight_sha256[:16]}.onnx"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        save(export_float(model), tmp)
        tmp.rename(out)
    return out


def measure_case(spec: Spec, case: Case, *, code: str | None = None, progress: bool = True,
                 engines_of=None) -> dict:  # fmt: skip
    """Every metric of one case: {metric: {value, noise, noise_basis, ...}} plus what ran."""
    from runtime.bundle import load_bundle
    from tools.deploy.pipeline import sample_to_file

    cache, code = spec.cache, code or code_fingerprint()
    settings = spec.settings
    model = load_case_model(spec, case)
    bundle, compiled = case_bundle(spec, case, model, code, progress)
    b = load_bundle(bundle)
    if model is None:  # a ready bundle without a model: its recorded source must still be readable
        from calibration.model_io import load_model

        model = load_model(b.manifest["model"]["source"])
    s = case.sample
    wanted = set(case.metrics)
    out: dict = {"bundle": str(bundle), "compiled": compiled, "metrics": {}}
    if wanted & {"fd", "accuracy", "psnr"}:
        if tuple(b.spec.sample_shape) != (1, 8, 8):
            bad = sorted(wanted & {"fd", "accuracy"})
            if bad:
                raise ConfigError(f"cases.{case.name}.metrics.{bad[0]}: needs the digits classifier (1×8×8 samples); "
                                  f"this model draws {tuple(b.spec.sample_shape)}")  # fmt: skip
        ref = fp_samples(case, model, cache, code, progress)
        run_dir = cache / "runs" / case.name
        run_dir.mkdir(parents=True, exist_ok=True)
        samples = run_dir / "samples.npz"
        sample_to_file(bundle, samples, n=s["n"], steps=s["steps"], eta=s["eta"], seed=s["seed"],
                       guidance=s["guidance"], batch_size=s["batch_size"], backend=s["backend"],
                       ptqd=tuple(v for v in s["ptqd"].split(",") if v), progress=progress)  # fmt: skip
        q = quality(samples, ref, settings.get("bootstrap", 200))
        out["metrics"] |= {k: v for k, v in q.items() if k in wanted}
    if wanted & {"latency_ratio", "memory_ratio"}:
        fp32 = fp32_graph(model, cache)
        batch = s["latency_batch"] * (2 if b.spec.num_class_embeds is not None and s["guidance"] != 1 else 1)
        if "latency_ratio" in wanted:
            out["metrics"]["latency_ratio"] = latency_ratio(
                bundle, fp32, b.spec, s["backend"], batch, settings.get("latency_rounds", 5),
                settings.get("latency_reps", 20), engines_of=engines_of)  # fmt: skip
        if "memory_ratio" in wanted:
            out["metrics"]["memory_ratio"] = memory_ratio(bundle, fp32, b.spec, s["backend"], batch,
                                                          settings.get("memory_rounds", 2))  # fmt: skip
    return out
