"""`dqc bench BUNDLE --ptqd-checks`: PTQD's statistical checks on a bundle's shipped engines: is the
residual quantization noise Gaussian at every step (normaltest), is k_t mostly positive, how much of
Δε is correlated with ε_FP (Pearson's R)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.bundle import load_bundle
from runtime.errors import ConfigError


def run_ptqd_checks(
    bundle_dir: str | Path,
    *,
    model_dir: str | Path | None = None,
    n: int = 256,
    keep: int = 1000,
    seed: int = 1,
    batch_size: int = 64,
    alpha: float = 0.01,
    json_out: str | Path | None = None,
    progress: bool = True,
) -> dict:
    from calibration.model_io import load_model
    from calibration.ptqd import residual_checks
    from runtime.sampler import SamplerConfig
    from tools.deploy.pipeline import write_json
    from tools.reference.model import resolve_model

    bundle = load_bundle(bundle_dir)
    routed = bundle.ptqd()
    if routed is None:
        raise ConfigError(f"{bundle_dir}: no PTQD statistics; compile it with --ptqd")
    source = resolve_model(model_dir) if model_dir else bundle.manifest["model"].get("source")
    model = load_model(source)
    if model.weight_sha256 != bundle.manifest["model"]["weight_sha256"]:
        raise ConfigError(f"{source}: not the model {bundle_dir} was compiled from (weight hash differs); pass --fp")
    meta = next(iter(bundle.manifest["ptqd"].values()))
    cfg = SamplerConfig(meta["sampler"], meta["steps"], meta["eta"], bundle.manifest["calibration"]["guidance"])
    report = {"bundle": str(bundle_dir), "n": n, "seed": seed, "alpha": alpha, "precisions": {}}
    for bits in routed.tables:
        tables = routed.tables[bits]
        engines = bundle.engines(route=bundle.route(precision=bits))
        checks = residual_checks(model, engines, tables, cfg, n=n, seed=seed, batch_size=batch_size, keep=keep,
                                 progress=progress)  # fmt: skip
        p = np.asarray(checks["normaltest_p"])
        checks |= {
            "k": tables.k.tolist(),
            "k_positive_share": float((tables.k > 0).mean()),
            "gaussian_share": float((p >= alpha).mean()),
        }
        report["precisions"][bits] = checks
        r = np.asarray(checks["pearson_r"])
        print(
            f"{bits}: residual Gaussian (normaltest p ≥ {alpha}, {checks['elements_per_step']} elements per step) at "
            f"{int((p >= alpha).sum())}/{len(p)} steps; |skew| ≤ {np.max(np.abs(checks['skew'])):.3f}, excess kurtosis "
            f"{np.min(checks['excess_kurtosis']):.3f}…{np.max(checks['excess_kurtosis']):.3f}; k_t > 0 at "
            f"{checks['k_positive_share']:.0%} of steps; Pearson R of Δε with ε_FP {r.min():.3f}…{r.max():.3f}"
        )
    if json_out:
        write_json(json_out, report)
        print(f"wrote {json_out}")
    return report
